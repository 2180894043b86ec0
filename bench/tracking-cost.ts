// What tracking writes between generations costs the workload (issue 10): the
// two ways the kernel offers, side by side with no tracking, in one invocation
// (rounds interleave the methods, since the machine's load moves by the minute).
// bench/tracking-cost.c runs one method over one region; see there for the
// workload and what is measured.
//   node dist/bench/tracking-cost.js [--runs 3] [--mib 256] [--interval-ms 1000]
//        [--intervals 3] [--threads 2] [--thp both|0|1]
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { arg, machine, range } from './args';

const REPO = path.resolve(__dirname, '..', '..');
const MODES = ['none', 'sync', 'sync-fifo', 'sync-64k', 'async'] as const;

// On THP every sync handler un-protects the whole 2 MiB, so sync-64k is sync.
const modes = (thp: number) => MODES.filter((m) => !(thp && m === 'sync-64k'));

interface Result {
  mode: string; thp: number; seconds: number; intervals: number;
  randomWritesPerS: number; seqPagesPerS: number; collectMsPerInterval: number; collectMsPerGiB: number;
  foundPerInterval: number; loggedPerInterval: number; missed: number; extra: number; faultsPerInterval: number;
  firstWriteUs: { p50: number; p99: number; max: number; slowestMean: number };
  hugePagesEnd: number; writerCpuS: number; handlerCpuS: number; fullProtects: number;
}

function costBin(): string {
  const srcs = [path.join(REPO, 'bench', 'tracking-cost.c'), path.join(REPO, 'test', 'targets', 'uffdtrack.h')];
  const hash = crypto.createHash('sha256');
  for (const s of srcs) hash.update(fs.readFileSync(s));
  const out = path.join(os.tmpdir(), 'bgsnap-bench', `tracking-cost-${hash.digest('hex').slice(0, 12)}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    execFileSync('gcc', ['-O2', '-Wall', '-pthread', '-o', `${out}.${process.pid}`, srcs[0]], { stdio: 'inherit' });
    fs.renameSync(`${out}.${process.pid}`, out);
  }
  return out;
}

// Writes per CPU-second of the writers plus the handler: the cost measure
// that the other tenants of a loaded machine disturb least.
const writes = (r: Result) => (r.randomWritesPerS + r.seqPagesPerS) * r.seconds;
const perCpu = (r: Result) => writes(r) / (r.writerCpuS + r.handlerCpuS);
// CPU the tracking adds per tracked page (a first write in an interval),
// beyond what the same writes cost in the same round's baseline.
function trackUs(r: Result, base: Result): number {
  const extraCpu = r.writerCpuS + r.handlerCpuS - writes(r) / perCpu(base);
  return (extraCpu / (r.loggedPerInterval * r.intervals)) * 1e6;
}

interface Row { mode: string; rounds: { r: Result; base: Result }[] }

function table(rows: Row[]): string {
  const lines = ['| method | random writes/s (vs none) | sequential pages/s (vs none) | writes per CPU-s (vs none) | tracking CPU per page | pages per interval | collection per interval (per GiB) | faults per interval | first write p50 / p99, slowest-faults mean | missed / extra pages | huge pages at end |',
    '|---|---|---|---|---|---|---|---|---|---|---|'];
  for (const row of rows) {
    const rs = row.rounds.map((x) => x.r), m = row.mode, none = m === 'none';
    const col = (f: (x: { r: Result; base: Result }) => number, d = 0) => range(row.rounds.map(f), d);
    lines.push(`| ${m} | ${col((x) => x.r.randomWritesPerS / 1e3)}k${none ? '' : ` (${range(row.rounds.map((x) => x.r.randomWritesPerS / x.base.randomWritesPerS * 100), 0)}%)`} ` +
      `| ${col((x) => x.r.seqPagesPerS / 1e3)}k${none ? '' : ` (${range(row.rounds.map((x) => x.r.seqPagesPerS / x.base.seqPagesPerS * 100), 0)}%)`} ` +
      `| ${col((x) => perCpu(x.r) / 1e3)}k${none ? '' : ` (${range(row.rounds.map((x) => perCpu(x.r) / perCpu(x.base) * 100), 0)}%)`} ` +
      `| ${none ? '-' : `${col((x) => trackUs(x.r, x.base), 2)} µs`} | ${none ? '-' : col((x) => x.r.foundPerInterval)} ` +
      `| ${none ? '-' : `${col((x) => x.r.collectMsPerInterval, 2)} ms (${col((x) => x.r.collectMsPerGiB, 1)} ms)`} ` +
      `| ${m.startsWith('sync') ? col((x) => x.r.faultsPerInterval) : '-'} ` +
      `| ${col((x) => x.r.firstWriteUs.p50, 2)} / ${col((x) => x.r.firstWriteUs.p99, 0)} µs${m.startsWith('sync') ? `, ${col((x) => x.r.firstWriteUs.slowestMean, 1)} µs` : ''} ` +
      `| ${none ? '-' : `${rs.reduce((a, r) => a + r.missed, 0)} / ${rs.reduce((a, r) => a + r.extra, 0)}`} | ${col((x) => x.r.hugePagesEnd)} |`);
  }
  return lines.join('\n');
}

function main() {
  const runs = Number(arg('--runs', '3')), mib = arg('--mib', '256'), ms = arg('--interval-ms', '1000');
  const intervals = arg('--intervals', '3'), threads = arg('--threads', '2'), thpArg = arg('--thp', 'both');
  const bin = costBin();
  console.log(`machine: ${machine()}`);
  console.log(`workload: ${threads} threads writing 64 bytes of random pages + 1 thread rewriting whole pages in order, ${mib} MiB, ${intervals} intervals of ${ms} ms per run, ${runs} rounds`);
  const sizes = thpArg === 'both' ? [0, 1] : [Number(thpArg)];
  const rows = new Map<string, Row>();
  for (let i = 0; i < runs; i++) {
    for (const thp of sizes) {
      const byMode = new Map<string, Result>();
      for (const mode of modes(thp)) {
        const out = execFileSync(bin, [mode, mib, String(thp), ms, intervals, threads], { encoding: 'utf8', timeout: 120_000 });
        byMode.set(mode, JSON.parse(out) as Result);
      }
      for (const mode of modes(thp)) {
        const key = `${thp}:${mode}`;
        if (!rows.has(key)) rows.set(key, { mode, rounds: [] });
        rows.get(key)!.rounds.push({ r: byMode.get(mode)!, base: byMode.get('none')! });
      }
    }
    console.log(`round ${i + 1} done, load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  }
  for (const thp of sizes) {
    console.log(`\n${mib} MiB, ${thp ? 'THP (MADV_HUGEPAGE)' : '4 KiB pages (MADV_NOHUGEPAGE)'}:`);
    console.log(table(modes(thp).map((m) => rows.get(`${thp}:${m}`)!)));
  }
  const missed = [...rows.values()].flatMap((r) => r.rounds).reduce((a, x) => a + x.r.missed, 0);
  console.log(`\nload average at the end: ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}; pages missed by any method: ${missed}`);
  if (missed) process.exitCode = 1;
}

main();
