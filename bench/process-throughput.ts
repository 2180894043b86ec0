// Capture throughput: `bgsnap-capture --pid | bgsnap-receive -o IMAGE`, whole
// pipe until the image is durable, on a 2 GiB target (default) nearly idle and
// under three busy writers, next to baselines in the same invocation:
//   - plain copy: process_vm_readv of the same memory into /dev/null
//     (bench/pvmcopy.c; no freeze, no protection, not point-in-time);
//   - QEMU's own background snapshot of a TCG guest with the same RAM size,
//     `bgsnap-capture --qmp | bgsnap-receive` (bandwidth limit lifted), and
//     `bgsnap-capture --pid` of that same QEMU process.
// MB/s is the captured mappings' size (the guest's RAM size for QEMU) over the
// pipe's wall time, and the plain copy's over its command's wall time too
// (start-up included on both sides; bench/capture-side.js also compares each
// program's own clock). Every --pid image of the test target is checked against
// its invariant.
//   node dist/bench/process-throughput.js [--mib 2048] [--runs 3] [--no-qemu] [--guest-mb 1536]
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { startTarget } from '../test/process-target';
import { ensureGuest } from '../test/helpers/guest';
import { startVm } from '../test/helpers/vm';
import { arg, imageInvariant, machine, pipeCapture, plainCopyTimed, range } from './process-common';

interface Line {
  name: string;
  mbps: number[];
  extra: string[];
}

function line(rows: Line[], name: string): Line {
  let l = rows.find((r) => r.name === name);
  if (!l) rows.push((l = { name, mbps: [], extra: [] }));
  return l;
}

async function processTarget(mib: number, writers: number, runs: number, dir: string): Promise<Line[]> {
  const rows: Line[] = [];
  const t = await startTarget('anon', mib, writers);
  try {
    await new Promise((r) => setTimeout(r, 500));
    for (let i = 0; i < runs; i++) {
      line(rows, 'plain copy (process_vm_readv > /dev/null), wall').mbps.push(t.size / 1e6 / plainCopyTimed(t.pid, t.base, t.size).wall);
      // The receiver stores the image durably; this is what the disk under it allows.
      line(rows, 'dd of the same size to a file, fsync (disk baseline)').mbps.push(t.size / 1e6 / ddToFile(t.size, dir));
      const run = pipeCapture(['--pid', String(t.pid), '--buffer-mb', '64'], dir);
      const inv = await imageInvariant(run.image, t.base, t.size);
      fs.rmSync(run.image, { recursive: true, force: true });
      const l = line(rows, 'bgsnap-capture --pid | bgsnap-receive');
      l.mbps.push((run.stats.capturedBytes ?? 0) / 1e6 / run.seconds);
      l.extra.push(`pause ${run.stats.pauseMs?.toFixed(2)} ms, capture ${run.stats.seconds?.toFixed(2)} s, invariant ${inv.ok ? 'ok' : `BROKEN ${inv.detail}`}`);
      // The capture side alone, to tell the engine's rate from the receiver's.
      const n = pipeCapture(['--pid', String(t.pid), '--buffer-mb', '64'], dir, true);
      line(rows, 'bgsnap-capture --pid > /dev/null (capture side alone)').mbps.push((n.stats.capturedBytes ?? 0) / 1e6 / n.seconds);
    }
  } finally {
    t.kill();
  }
  return rows;
}

function ddToFile(bytes: number, dir: string): number {
  const out = path.join(dir, 'dd.out');
  const start = process.hrtime.bigint();
  execFileSync('dd', ['if=/dev/zero', `of=${out}`, 'bs=4M', `count=${Math.ceil(bytes / (4 << 20))}`, 'conv=fsync', 'status=none']);
  const s = Number(process.hrtime.bigint() - start) / 1e9;
  fs.rmSync(out);
  return s;
}

async function qemuGuest(mib: number, guestMb: number, busy: boolean, runs: number, dir: string): Promise<Line[]> {
  const rows: Line[] = [];
  const g = await ensureGuest();
  const vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: mib, guestMb, tickMs: 1000, append: busy ? '' : 'bgsnap.rate=20', startTimeoutMs: 60_000 });
  try {
    await vm.waitForLine(/^ready pages=/, 600_000);
    await vm.waitForTicks(1, 60_000);
    for (let i = 0; i < runs; i++) {
      const q = pipeCapture(['--qmp', vm.qmpPath, '--max-bandwidth', '100000'], dir);
      fs.rmSync(q.image, { recursive: true, force: true });
      line(rows, `QEMU background snapshot (--qmp) of a ${mib} MiB guest`).mbps.push(mib * 2 ** 20 / 1e6 / q.seconds);
      const p = pipeCapture(['--pid', String(vm.pid), '--buffer-mb', '64'], dir);
      fs.rmSync(p.image, { recursive: true, force: true });
      const l = line(rows, 'bgsnap-capture --pid of that QEMU process');
      l.mbps.push((p.stats.capturedBytes ?? 0) / 1e6 / p.seconds);
      l.extra.push(`${((p.stats.capturedBytes ?? 0) / 2 ** 20).toFixed(0)} MiB of mappings, pause ${p.stats.pauseMs?.toFixed(2)} ms`);
    }
  } finally {
    await vm.kill();
  }
  return rows;
}

function report(title: string, rows: Line[]): void {
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const base = rows[0] ? med(rows[0].mbps) : 1;
  console.log(title);
  for (const r of rows) {
    console.log(`  ${r.name.padEnd(52)} ${range(r.mbps, 0).padStart(24)} MB/s  ${(med(r.mbps) / base).toFixed(2)}x plain`);
    for (const e of r.extra) console.log(`      ${e}`);
  }
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '2048'));
  const runs = Number(arg('--runs', '3'));
  const guestMb = Number(arg('--guest-mb', String(Math.floor(mib * 0.75))));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-bench-tp-'));
  console.log(`machine: ${machine()}`);
  try {
    for (const writers of [0, 3]) {
      const rows = await processTarget(mib, writers, runs, dir);
      report(`${mib} MiB target, ${writers ? `${writers} busy writers` : 'idle (only a sleeper and a reader, ~4k writes/s)'}:`, rows);
      if (process.argv.includes('--no-qemu')) continue;
      const q = await qemuGuest(mib, guestMb, writers > 0, runs, dir);
      const plain = rows[0];
      report(`  same size QEMU guest (TCG, ${guestMb} MiB of it written by its workload, ${writers ? 'writing flat out' : '20 transfers/s'}):`, [plain, ...q]);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`after the runs: load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
}

main().catch((e) => { console.error(e); process.exit(1); });
