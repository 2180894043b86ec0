// The capture's own peak memory (maxRSS from --stats) while it snapshots targets
// of growing size, next to the target's size, in the same invocation: bounded
// by --buffer-mb (plus Node's own ~50-100 MiB), not by the target.
//   node dist/bench/capture-memory.js [--sizes 256,1024,4096] [--buffer-mb 64]
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startTarget } from '../test/process-target';
import { arg, machine, pipeCapture } from './process-common';

async function one(mib: number, bufferMb: string, dir: string): Promise<string> {
  const t = await startTarget('anon', mib, 3);
  try {
    await new Promise((r) => setTimeout(r, 500));
    const run = pipeCapture(['--pid', String(t.pid), '--buffer-mb', bufferMb], dir, true);
    const rss = Number(run.stats.maxRssKiB) / 1024;
    return `${String(mib).padStart(6)} MiB target   capture peak RSS ${rss.toFixed(0).padStart(5)} MiB   (${(rss / mib).toFixed(3)} of the target)`;
  } finally {
    t.kill();
  }
}

async function main(): Promise<void> {
  const sizes = arg('--sizes', '256,1024,4096').split(',').map(Number);
  const bufferMb = arg('--buffer-mb', '64');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-mem-'));
  console.log(machine());
  console.log(`bgsnap-capture --pid PID --buffer-mb ${bufferMb} > /dev/null, 3 busy writers:`);
  try {
    for (const mib of sizes) console.log(await one(mib, bufferMb, dir));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

void main();
