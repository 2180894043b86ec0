// What reading /proc/PID/smaps costs (for MADV_DONTDUMP: its VmFlags "dd"),
// against reading /proc/PID/maps, the freeze's own read, in the same run: smaps
// walks every page table to count residency, maps does not. The capture reads
// smaps before the freeze and inside it only when the layout changed
// (capture/native/uffd_capture.cc ReadSmaps); the last column is a real
// capture's pause for scale, with the smaps read it made outside it.
//
//   node dist/bench/smaps-cost.js [--sizes 256,1024,4096] [--reps 20]
import * as fs from 'node:fs';
import { execFileSync } from 'node:child_process';
import { arg, BIN, machine, range } from './process-common';
import { startTarget } from '../test/process-target';

function timeRead(file: string, reps: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    fs.readFileSync(file);
    out.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  return out;
}

// One capture, its stats: the pause and the smaps read before it.
function captureStats(pid: number): { pauseMs: number; smapsMs: number; reread: boolean } {
  const stats = `/tmp/bgsnap-smaps-cost-${process.pid}.json`;
  execFileSync(process.execPath, [BIN.capture, '--pid', String(pid), '-o', '/dev/null', '--stats', stats], { stdio: ['ignore', 'ignore', 'inherit'] });
  const s = JSON.parse(fs.readFileSync(stats, 'utf8')) as { pauseMs: number; smaps: { ms: number; reread: boolean } };
  fs.rmSync(stats);
  return { pauseMs: s.pauseMs, smapsMs: s.smaps.ms, reread: s.smaps.reread };
}

async function main(): Promise<void> {
  const sizes = arg('--sizes', '256,1024,4096').split(',').map(Number);
  const reps = Number(arg('--reps', '20'));
  console.log(machine());
  console.log('target MiB | maps read ms | smaps read ms | smaps / maps | capture pause ms | its smaps ms (reread in freeze)');
  for (const mib of sizes) {
    const t = await startTarget('anon', mib, 2);
    try {
      const maps = timeRead(`/proc/${t.pid}/maps`, reps), smaps = timeRead(`/proc/${t.pid}/smaps`, reps);
      const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
      const cap = [captureStats(t.pid), captureStats(t.pid), captureStats(t.pid)];
      console.log(`${mib} | ${range(maps, 3)} | ${range(smaps, 3)} | ${(med(smaps) / med(maps)).toFixed(0)}x | ` +
        `${range(cap.map((c) => c.pauseMs))} | ${range(cap.map((c) => c.smapsMs), 2)} (${cap.filter((c) => c.reread).length}/3)`);
    } finally {
      t.kill();
    }
  }
}

void main();
