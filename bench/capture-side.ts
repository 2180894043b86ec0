// The capture side alone against a plain copy of the same memory, timed two
// ways so neither ratio flatters:
//   outside: wall time of each command (`pvmcopy ... > /dev/null` and
//            `bgsnap-capture --pid ... > /dev/null`), start-up included;
//   inside:  each program's own clock: pvmcopy's copy loop against
//            bgsnap-capture's work (stats.timing.workMs: from opening the
//            capture, freeze included, until the last byte was written), so
//            neither pays for starting (Node and its addons take ~0.1-0.2 s).
// The plain copy (bench/pvmcopy.c) reads the target's region with
// process_vm_readv into /dev/null: no freeze, no protection, not point-in-time.
// MB/s is the bytes each one covers over its time (for bgsnap, every captured
// mapping). Rounds alternate which contender goes first; load average printed
// with each round, since the machine is shared.
// --before DIR[,DIR...] adds other builds' bgsnap-capture (DIR/dist/bin, built)
// to each round, by wall time only (older builds report no work time).
//   node dist/bench/capture-side.js [--mib 2048] [--rounds 3] [--writers 0,3] [--buffer-mb 64] [--before DIR,...]
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startTarget } from '../test/process-target';
import { arg, machine, pipeCapture, plainCopyTimed, range } from './process-common';

interface Round { plainIn: number; plainWall: number; capIn: number; capWall: number; beforeWall: number[]; load: string; detail: string }

const load = () => os.loadavg().map((x) => x.toFixed(1)).join(' ');

async function rounds(mib: number, writers: number, n: number, bufferMb: string, dir: string, before: string[]): Promise<Round[]> {
  const t = await startTarget('anon', mib, writers);
  const out: Round[] = [];
  try {
    await new Promise((r) => setTimeout(r, 500));
    for (let i = 0; i < n; i++) {
      const r: Partial<Round> = { load: load(), beforeWall: [] };
      const plain = () => {
        const p = plainCopyTimed(t.pid, t.base, t.size);
        r.plainIn = t.size / 1e6 / p.inside;
        r.plainWall = t.size / 1e6 / p.wall;
      };
      const cap = () => {
        const c = pipeCapture(['--pid', String(t.pid), '--buffer-mb', bufferMb], dir, true);
        const bytes = c.stats.capturedBytes ?? 0;
        const work = (c.stats.timing as { workMs: number }).workMs / 1000;
        r.capIn = bytes / 1e6 / work;
        r.capWall = bytes / 1e6 / c.seconds;
        const st = c.stats as typeof c.stats & { timing: { startupMs: number }; smaps: { ms: number } };
        r.detail = `bgsnap: start-up ${st.timing.startupMs.toFixed(0)} ms, work ${(work * 1000).toFixed(0)} ms ` +
          `(smaps ${st.smaps.ms.toFixed(0)}, pre-protect ${st.pause?.preProtectMs.toFixed(0)}, pause ${st.pauseMs?.toFixed(1)}, ` +
          `scan waited for the output ${st.scanWaitMs?.toFixed(0)} ms), engine ${((st.seconds ?? 0) * 1000).toFixed(0)} ms, ` +
          `saver thread ${st.saver?.cpuMs.toFixed(0)} ms CPU in ${st.saver?.wallMs.toFixed(0)} ms`;
      };
      const old = () => {
        for (const b of before) {
          const c = pipeCapture(['--pid', String(t.pid), '--buffer-mb', bufferMb], dir, true, path.join(b, 'dist', 'bin', 'bgsnap-capture.js'));
          r.beforeWall!.push((c.stats.capturedBytes ?? 0) / 1e6 / c.seconds);
        }
      };
      if (i % 2 === 0) { plain(); cap(); old(); } else { old(); cap(); plain(); }
      out.push(r as Round);
    }
  } finally {
    t.kill();
  }
  return out;
}

function report(title: string, rs: Round[], before: string[]): void {
  console.log(title);
  for (const [i, r] of rs.entries()) {
    console.log(`  round ${i + 1} (${i % 2 ? 'bgsnap first' : 'plain first'}, load ${r.load}): ` +
      `inside ${r.capIn.toFixed(0)} / ${r.plainIn.toFixed(0)} MB/s = ${(r.capIn / r.plainIn).toFixed(2)}x, ` +
      `outside ${r.capWall.toFixed(0)} / ${r.plainWall.toFixed(0)} MB/s = ${(r.capWall / r.plainWall).toFixed(2)}x`);
    console.log(`      ${r.detail}`);
    r.beforeWall.forEach((w, k) => console.log(`      ${before[k]}: outside ${w.toFixed(0)} MB/s = ${(w / r.plainWall).toFixed(2)}x`));
  }
  const col = (k: 'plainIn' | 'plainWall' | 'capIn' | 'capWall') => rs.map((r) => r[k]);
  const ratio = (a: number[], b: number[]) => a.map((x, i) => x / b[i]);
  console.log(`  plain copy, inside (its loop)        ${range(col('plainIn'), 0).padStart(26)} MB/s`);
  console.log(`  plain copy, outside (wall)           ${range(col('plainWall'), 0).padStart(26)} MB/s`);
  console.log(`  bgsnap-capture --pid, inside (work)  ${range(col('capIn'), 0).padStart(26)} MB/s`);
  console.log(`  bgsnap-capture --pid, outside (wall) ${range(col('capWall'), 0).padStart(26)} MB/s`);
  console.log(`  ratio inside  (own clocks, no start-up): ${range(ratio(col('capIn'), col('plainIn')), 2)}x`);
  console.log(`  ratio outside (wall, start-up included): ${range(ratio(col('capWall'), col('plainWall')), 2)}x`);
  before.forEach((b, k) => console.log(`  ratio outside of ${b}: ${range(ratio(rs.map((r) => r.beforeWall[k]), col('plainWall')), 2)}x`));
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '2048'));
  const n = Number(arg('--rounds', '3'));
  const writers = arg('--writers', '0,3').split(',').map(Number);
  const bufferMb = arg('--buffer-mb', '64');
  const before = arg('--before', '').split(',').filter(Boolean);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-bench-side-'));
  console.log(`machine: ${machine()}`);
  try {
    for (const w of writers) {
      const rs = await rounds(mib, w, n, bufferMb, dir, before);
      report(`${mib} MiB target, ${w ? `${w} busy writers` : 'idle (a sleeper and a reader)'}, --buffer-mb ${bufferMb}:`, rs, before);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`after the runs: load average ${load()}`);
}

main().catch((e) => { console.error(e); process.exit(1); });
