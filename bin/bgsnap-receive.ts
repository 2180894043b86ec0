#!/usr/bin/env node
// bgsnap-receive -o IMAGE: reads a bgsnap or raw QEMU migration stream on stdin
// and writes a fixed-size image. Exits 0 only if the image is complete.
import { Command } from 'commander';
import { ImageWriter } from '../receiver/image';
import { receive } from '../receiver/receive';
import { main, writeStats } from './common';

const prog = new Command('bgsnap-receive')
  .description('receive a snapshot stream (bgsnap or QEMU migration) from stdin into a fixed-size image')
  .requiredOption('-o, --output <image>', 'image directory to create')
  .option('--force', 'replace an existing image')
  .option('--stats <file>', 'write a JSON summary to this file')
  .option('-q, --quiet', 'print nothing on success')
  .parse();

const opts = prog.opts<{ output: string; force?: boolean; stats?: string; quiet?: boolean }>();

main('bgsnap-receive', async () => {
  const sink = await ImageWriter.create(opts.output, { force: opts.force });
  const summary = await receive(process.stdin, sink);
  writeStats(opts.stats, summary);
  if (summary.status !== 'complete') {
    process.stderr.write(`bgsnap-receive: image ${opts.output} is INCOMPLETE: ${summary.reason}\n`);
    return 2;
  }
  if (!opts.quiet) {
    const mb = (n: number) => (n / 1048576).toFixed(1);
    process.stderr.write(
      `bgsnap-receive: ${opts.output} complete: ${summary.uniquePages} pages (${summary.dataPages} data, ${summary.zeroPages} zero), ` +
        `${summary.duplicatePages} duplicates dropped, stream ${mb(summary.streamBytes)} MiB -> ${mb(summary.imageBytes)} MiB on disk, ${summary.seconds.toFixed(2)} s\n`,
    );
  }
});
