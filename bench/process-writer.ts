// What the target's writers feel: their progress while a capture runs, and how
// long a write to a not-yet-saved page waits (p50/p99/max fault wait), on a
// 2 GiB target of 4 KiB pages and one of THP, three busy writers each. Side by
// side in one invocation, writer progress (transfers/s, all threads) is measured
//   - undisturbed, over a window as long as the capture;
//   - during a plain process_vm_readv copy of the same memory (a control: on
//     2 cores, any copier takes CPU from the writers, protected or not);
//   - during the capture (in-process, pages dropped as they come, 64 MiB of
//     buffers), from the first freeze until every page is saved.
//   node dist/bench/process-writer.js [--mib 2048] [--runs 3]
import * as os from 'node:os';
import { captureProcess, type ProcessCaptureStats } from '../capture/process-source';
import { startTarget, type Mode, type Target } from '../test/process-target';
import { arg, machine, plainCopy, range } from './process-common';

async function transfers(t: Target): Promise<number> {
  return (await t.command('counts')).replace(/^counts /, '').split(' ').map(Number).reduce((a, b) => a + b, 0);
}

// Transfers per second while `work` runs; returns its result too.
async function rateDuring<T>(t: Target, work: () => Promise<T> | T): Promise<{ rate: number; seconds: number; result: T }> {
  const c0 = await transfers(t);
  const t0 = process.hrtime.bigint();
  const result = await work();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c1 = await transfers(t);
  return { rate: (c1 - c0) / seconds, seconds, result };
}

async function drainCapture(pid: number): Promise<ProcessCaptureStats> {
  const cap = captureProcess(pid, { bufferMb: 64, zeroCopy: true });
  for await (const ev of cap.events) if (ev.type === 'pages') cap.release(ev.batch);
  return cap.stats();
}

interface Result { idle: number[]; plain: number[]; capture: number[]; stats: ProcessCaptureStats[] }

async function measure(mode: Mode, mib: number, runs: number): Promise<Result> {
  const t = await startTarget(mode, mib, 3);
  const r: Result = { idle: [], plain: [], capture: [], stats: [] };
  try {
    await new Promise((res) => setTimeout(res, 500));
    for (let i = 0; i < runs; i++) {
      const cap = await rateDuring(t, () => drainCapture(t.pid));
      const idle = await rateDuring(t, () => new Promise((res) => setTimeout(res, cap.seconds * 1000)));
      const plain = await rateDuring(t, () => plainCopy(t.pid, t.base, t.size));
      r.capture.push(cap.rate);
      r.idle.push(idle.rate);
      r.plain.push(plain.rate);
      r.stats.push(cap.result);
    }
  } finally {
    t.kill();
  }
  return r;
}

function report(mode: Mode, mib: number, r: Result): void {
  const ratio = (xs: number[]) => xs.map((x, i) => (100 * x) / r.idle[i]);
  console.log(`${mode.padEnd(4)} ${mib} MiB, 3 busy writers:`);
  console.log(`  writer progress undisturbed        ${range(r.idle.map((x) => x / 1000), 0)} k transfers/s`);
  console.log(`  during a plain copy (control)      ${range(ratio(r.plain), 0)} % of undisturbed`);
  console.log(`  during the capture                 ${range(ratio(r.capture), 0)} % of undisturbed ` +
    `(capture ${range(r.stats.map((s) => s.seconds), 2)} s, pause ${range(r.stats.map((s) => s.pauseMs), 2)} ms)`);
  console.log(`  fault wait p50 ${range(r.stats.map((s) => s.faultWaitP50Ms), 2)} ms, p99 ${range(r.stats.map((s) => s.faultWaitP99Ms), 2)} ms, ` +
    `max ${range(r.stats.map((s) => s.faultWaitMaxMs), 1)} ms over ${range(r.stats.map((s) => s.faults), 0)} faults ` +
    `(${range(r.stats.map((s) => (100 * s.pagesByFault) / (s.pagesByFault + s.pagesByScan)), 0)} % of pages saved on a fault)`);
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '2048'));
  const runs = Number(arg('--runs', '3'));
  console.log(`machine: ${machine()}`);
  for (const mode of ['anon', 'thp'] as Mode[]) report(mode, mib, await measure(mode, mib, runs));
  console.log(`after the runs: load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
}

main().catch((e) => { console.error(e); process.exit(1); });
