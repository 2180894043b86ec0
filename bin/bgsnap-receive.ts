#!/usr/bin/env node
// bgsnap-receive -o IMAGE: reads a bgsnap or raw QEMU migration stream on stdin
// and writes a fixed-size image. Exits 0 only if the image is complete.
// bgsnap-receive --listen HOST:PORT --dir ROOT: a long-running network receiver,
// one image per capture under ROOT (receiver/server.ts, docs/security.md).
// bgsnap-receive --to tcp://HOST:PORT: relays the stream on stdin (bgsnap or
// QEMU) to such a receiver; exits 0 only once it acknowledged a complete image.
import { Command } from 'commander';
import { listen, type ListenFlags } from '../receiver/net-listen';
import { NetOutput, type NetFlags } from '../net/client';
import { StreamSink } from '../io/stream-sink';
import { ImageWriter } from '../receiver/image';
import { receive } from '../receiver/receive';
import { main, parseIntArg, stdinStream, writeStats } from './common';
import type { ReceiveSummary } from '../io/sink';

const prog = new Command('bgsnap-receive')
  .description('receive a snapshot stream (bgsnap or QEMU migration) from stdin into a fixed-size image')
  .option('-o, --output <image>', 'image directory to create (stdin mode)')
  .option('--force', 'replace an existing image')
  .option('--stats <file>', 'write a JSON summary to this file')
  .option('-q, --quiet', 'print nothing on success')
  .option('--to <url>', 'relay mode: send the stream to a receiver at tcp://HOST:PORT instead of writing an image')
  .option('--name <name>', 'relay mode: image name on the receiver (default: the snapshot id)')
  .option('--listen <host:port>', 'network mode: accept captures (bgsnap-capture --to) on this address')
  .option('--dir <root>', 'network mode: directory for the images, one per capture')
  .option('--cert <file>', 'network modes: TLS certificate (relay: client certificate)')
  .option('--key <file>', 'network modes: TLS key')
  .option('--ca <file>', 'listen: CA for client certificates (mutual TLS); relay: CA to verify the receiver')
  .option('--token-file <file>', 'network modes: shared token (or set BGSNAP_TOKEN)')
  .option('--insecure', 'network modes: allow plain TCP without TLS (loopback tests only)')
  .option('--max-streams <n>', 'network mode: concurrent captures', parseIntArg('--max-streams'), 16)
  .option('--max-image-gb <GiB>', 'network mode: refuse a capture whose image would be larger', parseIntArg('--max-image-gb'), 256)
  .option('--idle-timeout <s>', 'network mode: drop a sender silent for this long', parseIntArg('--idle-timeout'), 120)
  .parse();

const opts = prog.opts<{ output?: string; force?: boolean; stats?: string; quiet?: boolean; listen?: string; dir?: string } & Partial<ListenFlags> & NetFlags>();

main('bgsnap-receive', async () => {
  if (opts.listen !== undefined) {
    if (!opts.dir || opts.output) throw new Error('--listen needs --dir ROOT (and no -o)');
    return listen(opts as ListenFlags);
  }
  if (!opts.output === !opts.to) throw new Error('give -o IMAGE or --to tcp://HOST:PORT (stdin modes), or --listen HOST:PORT --dir ROOT');
  const sink = opts.to ? new StreamSink(await NetOutput.connect(opts)) : await ImageWriter.create(opts.output!, { force: opts.force });
  // Stopped by a signal, the image is closed as incomplete with what arrived (its
  // bitmaps written), not left half-described.
  const input = stdinStream(!opts.to);
  const stop = (sig: string) => input.destroy(new Error(`stopped by ${sig}`));
  process.once('SIGINT', stop).once('SIGTERM', stop);
  const summary = await receive(input, sink);
  writeStats(opts.stats, summary);
  if (summary.status !== 'complete') {
    process.stderr.write(`bgsnap-receive: image ${opts.output ?? `${summary.image} at ${opts.to}`} is INCOMPLETE: ${summary.reason}\n`);
    return 2;
  }
  if (!opts.quiet) {
    const mb = (n: number) => (n / 1048576).toFixed(1);
    const gens = summary.generations ? `${generationCount(summary)}, ` : '';
    process.stderr.write(
      `bgsnap-receive: ${opts.output ?? `${summary.image} at ${opts.to}`} complete: ${gens}${summary.uniquePages} pages (${summary.dataPages} data, ${summary.zeroPages} zero), ` +
        `${summary.duplicatePages} duplicates dropped, stream ${mb(summary.streamBytes)} MiB -> ${mb(summary.imageBytes)} MiB on disk, ${summary.seconds.toFixed(2)} s\n`,
    );
  }
});

// "5 generations", or with pre-copy passes "1 snapshot after 3 pre-copy passes":
// a pass is not a snapshot, so it is not counted as one.
function generationCount(s: ReceiveSummary): string {
  const passes = s.passes ?? 0;
  if (!passes) return `${s.generations} generations`;
  const snaps = (s.completeGenerations ?? 0) - passes;
  return `${snaps} snapshot${snaps === 1 ? '' : 's'} after ${passes} pre-copy pass${passes === 1 ? '' : 'es'}`;
}
