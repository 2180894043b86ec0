// Process capture benchmark: the target's pause (freeze) and the copy rate for
// 256 MiB / 1 GiB / 2 GiB targets of 4 KiB pages and a 2 GiB THP target, each
// with 3 writer threads running, next to a plain (torn) copy of the same memory
// through /proc/PID/mem and gcore's wall time, measured in the same run.
//   node dist/bench/process-capture.js [--gcore]
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { captureProcess } from '../capture/process-source';
import { collect, startTarget, tornCopy, type Mode } from '../test/process-target';

async function one(mode: Mode, mib: number, gcore: boolean): Promise<void> {
  const t = await startTarget(mode, mib, 3);
  try {
    await new Promise((r) => setTimeout(r, 500));
    const t0 = process.hrtime.bigint();
    tornCopy(t.pid, t.base, t.size);
    const plainMBps = t.size / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
    const cap = captureProcess(t.pid, { bufferMb: 64 });
    await collect(cap.events, t.base, t.size);
    const s = cap.stats();
    let gcoreS = '';
    if (gcore) {
      const out = path.join(os.tmpdir(), `bench-core-${t.pid}`);
      const g0 = Date.now();
      execFileSync('gcore', ['-o', out, String(t.pid)], { stdio: 'ignore' });
      gcoreS = ` | gcore ${((Date.now() - g0) / 1000).toFixed(2)} s`;
      fs.rmSync(`${out}.${t.pid}`, { force: true });
    }
    console.log(`${mode.padEnd(5)} ${String(mib).padStart(5)} MiB | pause ${s.pauseMs.toFixed(2)} ms (seize ${s.pause.seizeMs.toFixed(2)}, ` +
      `inject ${s.pause.injectMs.toFixed(2)}, protect ${s.pause.protectMs.toFixed(2)}, pagemap ${s.pause.pagemapMs.toFixed(2)}) | ` +
      `copy ${s.seconds.toFixed(2)} s = ${s.throughputMBps.toFixed(0)} MB/s (fault ${s.pagesByFault}, scan ${s.pagesByScan}, ` +
      `wait p50 ${s.faultWaitP50Ms.toFixed(2)} p99 ${s.faultWaitP99Ms.toFixed(2)} max ${s.faultWaitMaxMs.toFixed(1)} ms) | plain copy ${plainMBps.toFixed(0)} MB/s${gcoreS}`);
  } finally {
    t.kill();
  }
}

async function main(): Promise<void> {
  const gcore = process.argv.includes('--gcore');
  console.log(`load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')} (other work on the machine skews these)`);
  for (const [mode, mib] of [['anon', 256], ['anon', 1024], ['anon', 2048], ['thp', 2048]] as [Mode, number][]) {
    await one(mode, mib, gcore);
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
