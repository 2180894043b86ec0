#!/usr/bin/env node
// bgsnap-capture --qmp SOCKET | --domain NAME | --pid PID: a live point-in-time snapshot of a
// running QEMU VM (RAM, devices and every writable drive) or any Linux process as a bgsnap stream on stdout (or -o FILE).
// The target keeps running throughout; if this program dies, it is released.
import { Command } from 'commander';
import { emitStream, type EmitProgress } from '../capture/emit';
import { captureProcess, type ProcessCaptureOptions } from '../capture/process-source';
import { addNetOptions, NetOutput, type NetFlags } from '../net/client';
import type { CaptureSource } from '../capture/source';
import type { PageBatch } from '../format/events';
import { Output } from '../io/output';
import { StreamSink, fastEncoder } from '../io/stream-sink';
import { main, parseIntArg, writeStats } from './common';

const prog = new Command('bgsnap-capture')
  .description('take a live point-in-time memory snapshot and write it as a bgsnap stream')
  .option('--qmp <socket>', 'QMP socket of a running QEMU VM')
  .option('--domain <name>', 'a running libvirt domain (name, id or UUID), through libvirt\'s own interfaces')
  .option('--connect <uri>', 'with --domain: libvirt connection URI (default: virsh\'s, e.g. qemu:///system)')
  .option('--pid <pid>', 'any running process', parseIntArg('--pid'))
  .option('--buffer-mb <MiB>', 'process only: capture buffer memory; faulting writers wait when it is full', parseIntArg('--buffer-mb'), 64)
  .option('--rate-limit <MBps>', 'process only: pace the linear scan', parseIntArg('--rate-limit'))
  .option('--allow-nondumpable', 'process only: capture a target that made itself non-dumpable (ssh-agent, gpg-agent: it holds keys)')
  .option('-o, --output <file>', 'write the stream to a file instead of stdout (created 0600; an existing file only with --force)', '-')
  .option('--force', 'replace an existing -o file (never a symbolic link)')
  .option('--include-dontdump', 'process only: keep MADV_DONTDUMP ranges, which are left out by default as in kernel core dumps')
  .option('--compress [level]', 'zstd-compress page batches (level -7 to 19, default 3; a fast, negative level as --compress=-3)')
  .option('--no-disks', 'QEMU only: leave the drives out (by default every writable drive is captured at the same instant as RAM)')
  .option('--disks', 'QEMU only: every writable drive; the default, accepted for older scripts')
  .option('--disk <id>', 'QEMU only: capture only this drive (its -drive id; with --domain its target, e.g. vda); repeatable', (v: string, l: string[] = []) => [...l, v])
  .option('--max-bandwidth <MBps>', 'QEMU only: migration bandwidth for this snapshot, MB/s', parseIntArg('--max-bandwidth'))
  .option('--every <seconds>', 'process only: a chain of generations, one every SECONDS (README, "Snapshot chains")', parseFloat)
  .option('--count <n>', 'with --every: stop after N generations (default: until SIGINT/SIGTERM)', parseIntArg('--count'))
  .option('--precopy', 'process only: pre-copy passes while the kernel tracks writes (no writer waits on bgsnap), then a short stop saves the rest, or protects it for a finish with faults (README, "Pre-copy")')
  .option('--precopy-passes <n>', 'with --precopy: passes at most before the snapshot (default 8)', parseIntArg('--precopy-passes'))
  .option('--precopy-final-pages <n>', 'with --precopy: the snapshot comes once at most N pages were written since the last pass; its stop saves them (default 4096)', parseIntArg('--precopy-final-pages'))
  .option('--precopy-move-mb <n>', 'with --precopy: a finish with faults moves anonymous memory to synchronous write-protection N MiB per short stop, before the snapshot\'s stop (default 64)', parseIntArg('--precopy-move-mb'))
  .option('--stats <file>', 'write a JSON summary to this file');
addNetOptions(prog).parse();

type Opts = {
  qmp?: string; domain?: string; connect?: string; pid?: number; output: string; compress?: string | boolean; maxBandwidth?: number; stats?: string;
  every?: number; count?: number; precopy?: boolean; precopyPasses?: number; precopyFinalPages?: number; precopyMoveMb?: number;
  bufferMb: number; rateLimit?: number; allowNondumpable?: boolean; force?: boolean; includeDontdump?: boolean; disks?: boolean; disk?: string[];
} & NetFlags;
const opts = prog.opts<Opts>();

function compressLevel(): number | undefined {
  if (opts.compress === undefined || opts.compress === false) return undefined;
  const level = opts.compress === true ? 3 : Number(opts.compress);
  if (!Number.isInteger(level) || level < -7 || level > 19 || level === 0) throw new Error(`--compress level must be -7..-1 or 1..19, got "${opts.compress}"`);
  return level;
}

// Tests only: BGSNAP_TEST_HOLD=AT:MS holds the engine there (printing bgsnap-hold AT) in every generation.
function testHold(): Pick<ProcessCaptureOptions, 'testHoldAt' | 'testHoldMs'> {
  const [at, ms] = (process.env.BGSNAP_TEST_HOLD ?? '').split(':');
  return at ? { testHoldAt: at as ProcessCaptureOptions['testHoldAt'], testHoldMs: Number(ms) } : {};
}

// The QEMU and chain sources load only when asked for: a --pid capture's
// start-up is part of its wall time (bench/capture-side.ts).
const qemuEvents = () => require('../capture/qemu-events') as typeof import('../capture/qemu-events');
const processChain = () => require('../capture/process-chain') as typeof import('../capture/process-chain');

function openChain(pid: number) {
  if (opts.precopy && opts.every !== undefined) throw new Error('--precopy takes one snapshot; it does not go with --every');
  if (!opts.precopy && !(opts.every! > 0)) throw new Error(`--every needs a number of seconds above 0, got ${opts.every}`);
  if (opts.count !== undefined && opts.count < 1) throw new Error('--count must be at least 1');
  return processChain().captureProcessChain(pid, {
    everyMs: (opts.every ?? 0) * 1000, count: opts.count, precopy: opts.precopy, precopyMaxPasses: opts.precopyPasses, precopyFinalPages: opts.precopyFinalPages, precopyMoveMb: opts.precopyMoveMb, bufferMb: opts.bufferMb, rateLimitMBps: opts.rateLimit, zeroCopy: true,
    allowNonDumpable: opts.allowNondumpable, includeDontDump: opts.includeDontdump, ...testHold(),
    testNoSuspendSeccomp: process.env.BGSNAP_TEST_NO_SUSPEND_SECCOMP === '1',
    onGeneration: (g) => process.stderr.write(
      `bgsnap-capture: generation ${g.generation}${opts.precopy ? (g.pass ? ' (pass)' : ' (snapshot)') : ''}: pause ${g.pauseMs.toFixed(1)} ms, ${g.pages} pages (${g.dataPages} data, ${g.zeroPages} zero), ` +
      `${g.discarded} discarded, ${g.blocksAdded} blocks added, ${g.blocksRemoved} removed, ${g.faults} faults since the last\n`),
  });
}

type Source = CaptureSource & { release?: (b: PageBatch) => void; stop?: (reason: string) => void };

async function openSource(): Promise<Source> {
  if ((opts.every !== undefined || opts.count !== undefined) && opts.pid === undefined) throw new Error('--every and --count go with --pid');
  if (opts.count !== undefined && opts.every === undefined) throw new Error('--count goes with --every');
  const given = [opts.qmp && '--qmp', opts.domain && '--domain', opts.pid !== undefined && '--pid'].filter(Boolean);
  if (given.length > 1) throw new Error(`give one of --qmp, --domain and --pid, not ${given.join(' and ')}`);
  if (opts.connect && !opts.domain) throw new Error('--connect goes with --domain');
  if (opts.qmp || opts.domain) {
    const disks = chosenDisks();
    const target = opts.domain ? { domain: opts.domain, connect: opts.connect } : opts.qmp!;
    return qemuEvents().captureQemu(target, { maxBandwidth: opts.maxBandwidth === undefined ? undefined : opts.maxBandwidth * 1e6, disks });
  }
  if (opts.precopy && opts.pid === undefined) throw new Error('--precopy goes with --pid');
  if (opts.precopyPasses !== undefined && (!opts.precopy || opts.precopyPasses < 1)) throw new Error('--precopy-passes goes with --precopy and is at least 1');
  if (opts.precopyFinalPages !== undefined && !opts.precopy) throw new Error('--precopy-final-pages goes with --precopy');
  if (opts.precopyMoveMb !== undefined && (!opts.precopy || opts.precopyMoveMb < 2)) throw new Error('--precopy-move-mb goes with --precopy and is at least 2');
  if (opts.pid !== undefined && (opts.every !== undefined || opts.precopy)) return openChain(opts.pid);
  if (opts.pid !== undefined) {
    return captureProcess(opts.pid, {
      bufferMb: opts.bufferMb, rateLimitMBps: opts.rateLimit, zeroCopy: true, allowNonDumpable: opts.allowNondumpable,
      includeDontDump: opts.includeDontdump,
      // Tests only: take the path of a tracer that cannot suspend the target's seccomp filter.
      testNoSuspendSeccomp: process.env.BGSNAP_TEST_NO_SUSPEND_SECCOMP === '1',
    });
  }
  throw new Error('say what to capture: --qmp SOCKET, --domain NAME or --pid PID');
}

// undefined: every writable drive; []: none.
function chosenDisks(): string[] | undefined {
  if (opts.disk && opts.disks === false) throw new Error('--disk ID and --no-disks contradict each other');
  if (opts.disk) return opts.disk;
  return opts.disks === false ? [] : undefined;
}

function progress(): ((p: EmitProgress) => void) | undefined {
  if (!process.stderr.isTTY) return undefined;
  let last = 0;
  return (p) => {
    if (Date.now() - last < 500) return;
    last = Date.now();
    // Page records can exceed the block table's pages (QEMU precopy resends), so cap the percentage.
    const pct = p.totalPages ? ` (${Math.min(100, (100 * p.pages) / p.totalPages).toFixed(0)}%)` : '';
    process.stderr.write(`\rbgsnap-capture: ${p.pages} of ${p.totalPages} pages${pct}, ${(p.bytesOut / 1048576).toFixed(0)} MiB out `);
  };
}

main('bgsnap-capture', async () => {
  const level = compressLevel();
  const started = Date.now();
  // Node's start and module (addon) loading, then the work itself: benchmarks
  // compare the work with a plain copy's own loop time (bench/capture-side.ts).
  const startupMs = performance.now();
  // Connected and authenticated before the target is touched: a refused capture never freezes it.
  const out = opts.to !== undefined ? await NetOutput.connect(opts) : Output.open(opts.output, { force: opts.force });
  const sink = new StreamSink(out, fastEncoder({ compressLevel: level }), opts.to ?? opts.output);
  // A signal while the source opens (QEMU: disks being set up, the VM stopped
  // for the instant) must not kill us half-way: it aborts once open.
  let source: Awaited<ReturnType<typeof openSource>> | undefined;
  let signalled: string | undefined;
  // A chain ends cleanly after the generation in flight; a single capture is aborted.
  const stop = (sig: string) => (!source ? (signalled = sig) : source.stop ? source.stop(`received ${sig}`) : void source.abort(`received ${sig}`));
  process.once('SIGINT', stop).once('SIGTERM', stop);
  source = await openSource();
  if (signalled) await (source.stop ? source.stop(`received ${signalled}`) : source.abort(`received ${signalled}`));
  let totals;
  try {
    totals = await emitStream(source.events, sink, progress(), source.release);
  } catch (err) {
    // Whatever broke (the reader went away, the network, a signal), release the
    // target before exiting: a process is un-protected and detached; a QEMU
    // snapshot is drained to its end, since QEMU 7.2 can leave a vCPU blocked
    // for good when its stream is cut.
    await source.abort((err as Error).message).catch(() => undefined);
    throw err;
  }
  // With --to, complete only once the receiver acknowledged a durable image.
  const summary = await sink.finish();
  if (summary.status !== 'complete') throw new Error(summary.reason);
  const timing = { startupMs, workMs: performance.now() - startupMs };
  const acked = opts.to !== undefined ? summary : undefined; // the receiver's summary
  const seconds = (Date.now() - started) / 1000;
  if (process.stderr.isTTY) process.stderr.write('\n');
  const stats = source.stats() as { unseenWrites?: { warnings: string[] } };
  for (const w of stats.unseenWrites?.warnings ?? []) process.stderr.write(`bgsnap-capture: warning: ${w}\n`);
  // maxRssKiB: the capture's own peak memory, which --buffer-mb bounds whatever the target's size.
  const maxRssKiB = process.resourceUsage().maxRSS;
  writeStats(opts.stats, {
    status: 'complete', ...totals, bytesOut: out.bytes, seconds, throughputMBps: out.bytes / 1e6 / seconds, maxRssKiB,
    ...stats, timing, ...(acked ? { receiver: acked } : {}),
  });
});
