// Process capture pause: how long the target is stopped, for 256 MiB / 1 GiB /
// 2 GiB / 4 GiB targets of 4 KiB pages and a 2 GiB THP target, each with three
// busy writer threads (plus one in nanosleep, one in read), next to two
// baselines on the same target in the same invocation:
//   - "before": the same engine protecting everything inside one freeze
//     (preProtect: false), as it did until write-protection moved ahead of it;
//   - gcore's wall time (the target is stopped for all of it).
// Every capture is checked page by page against the target's invariant (a torn
// snapshot breaks it), including the 4 GiB one.
//   node dist/bench/process-capture.js [--runs 3] [--gcore-runs 1] [--max-mib 4096]
import * as os from 'node:os';
import type { ProcessCaptureStats } from '../capture/process-source';
import { startTarget, type Mode } from '../test/process-target';
import { arg, checkedCapture, gcoreSeconds, machine, range } from './process-common';

interface Row {
  after: ProcessCaptureStats[];
  before: ProcessCaptureStats[];
  gcore: number[];
  ok: number;
  runs: number;
  notes: string[];
}

async function measure(mode: Mode, mib: number, runs: number, gcoreRuns: number): Promise<Row> {
  const t = await startTarget(mode, mib, 3);
  const row: Row = { after: [], before: [], gcore: [], ok: 0, runs: 0, notes: [] };
  try {
    await new Promise((r) => setTimeout(r, 500));
    for (let i = 0; i < runs; i++) {
      for (const preProtect of [true, false]) {
        const { stats, inv } = await checkedCapture(t.pid, t.base, t.size, { preProtect });
        (preProtect ? row.after : row.before).push(stats);
        row.runs++;
        if (inv.ok) row.ok++; else row.notes.push(inv.detail);
      }
    }
    for (let i = 0; i < gcoreRuns; i++) row.gcore.push(gcoreSeconds(t.pid));
  } finally {
    t.kill();
  }
  return row;
}

function report(mode: Mode, mib: number, r: Row): void {
  const gib = mib / 1024;
  const pause = r.after.map((s) => s.pauseMs);
  const before = r.before.map((s) => s.pauseMs);
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  console.log(`${mode.padEnd(4)} ${String(mib).padStart(5)} MiB  pause ${range(pause, 2)} ms = ${range(pause.map((x) => x / gib), 2)} ms/GiB`);
  console.log(`      stops: arm ${range(r.after.map((s) => s.pause.armMs), 2)} + snapshot ${range(r.after.map((s) => s.pause.snapshotMs), 2)} ms ` +
    `(seize ${range(r.after.map((s) => s.pause.seizeMs), 2)}, scan ${range(r.after.map((s) => s.pause.pagemapMs), 2)}, ` +
    `re-protect ${range(r.after.map((s) => s.pause.protectMs), 2)} ms for ${range(r.after.map((s) => s.pause.reprotectPages), 0)} pages)`);
  console.log(`      running in between: pre-protect ${range(r.after.map((s) => s.pause.preProtectMs), 1)} ms, ` +
    `writer faults let through ${range(r.after.map((s) => s.pause.preFaults), 0)}`);
  console.log(`      before (protect inside the freeze): ${range(before, 2)} ms (protect ${range(r.before.map((s) => s.pause.protectMs), 2)} ms) ` +
    `= ${(med(before) / med(pause)).toFixed(1)}x the pause now`);
  if (r.gcore.length) console.log(`      gcore wall time ${range(r.gcore, 2)} s = ${(med(r.gcore) * 1000 / med(pause)).toFixed(0)}x the pause`);
  console.log(`      copy after the pause ${range(r.after.map((s) => s.seconds), 2)} s; fault wait p50 ${range(r.after.map((s) => s.faultWaitP50Ms), 2)} ` +
    `p99 ${range(r.after.map((s) => s.faultWaitP99Ms), 2)} max ${range(r.after.map((s) => s.faultWaitMaxMs), 1)} ms`);
  console.log(`      invariant exact in ${r.ok}/${r.runs} snapshots${r.notes.length ? `: ${r.notes.join('; ')}` : ''}`);
}

async function main(): Promise<void> {
  const runs = Number(arg('--runs', '3'));
  const gcoreRuns = Number(arg('--gcore-runs', '1'));
  const maxMib = Number(arg('--max-mib', '4096'));
  console.log(`machine: ${machine()}`);
  console.log(`targets: 3 busy writers + 1 sleeper + 1 reader; ${runs} runs per variant, alternating; ranges min-max (median)`);
  const cases: [Mode, number][] = [['anon', 256], ['anon', 1024], ['anon', 2048], ['anon', 4096], ['thp', 2048]];
  let failed = false;
  for (const [mode, mib] of cases) {
    if (mib > maxMib) continue;
    if (mib * 2 ** 20 * 1.5 > os.freemem()) { console.log(`${mode} ${mib} MiB: skipped, not enough free memory`); continue; }
    const r = await measure(mode, mib, runs, gcoreRuns);
    report(mode, mib, r);
    failed ||= r.ok !== r.runs;
  }
  console.log(`after the runs: load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
  if (failed) process.exitCode = 1;
}

main().catch((e) => { console.error(e); process.exit(1); });
