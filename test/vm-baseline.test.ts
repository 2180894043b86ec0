// Baseline for everything that snapshots VMs: boots the real test guest, takes a
// background snapshot with QEMU's own stream (no bgsnap receiver involved) while
// the guest keeps writing memory, restores it in a fresh QEMU and checks that
// the guest resumes from the snapshot point with its memory invariant intact.
// Later tests put the receiver/converter between the capture and the restore.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { openQemuSnapshot } from '../capture/qemu-source';
import { ensureGuest, type Guest } from './helpers/guest';
import { bounded, incomingFromFile, sleep, snapshotTicking, startVm, waitForResume, type SnapshotRun, type Vm, type VmOptions } from './helpers/vm';
import { tmpDir } from './helpers/net';

type Caps = { capability: string; state: boolean }[];

const ctx: { guest?: Guest; source?: Vm; restored?: Vm; run?: SnapshotRun<number>; dir?: string } = {};
const timings: string[] = [];

function vmOptions(): VmOptions {
  const g = ctx.guest!;
  return { kernel: g.kernel, initrd: g.initrd, memMb: 256, guestMb: 48 };
}

async function writeFile(stream: Readable, file: string): Promise<number> {
  await pipeline(stream, fs.createWriteStream(file));
  return fs.statSync(file).size;
}

test.before(async () => {
  const start = Date.now();
  ctx.guest = await ensureGuest();
  timings.push(`guest ${ctx.guest.built ? `built in ${ctx.guest.buildMs} ms` : 'from cache'} (${ctx.guest.kernelVersion})`);
  ctx.dir = tmpDir('baseline');
  timings.push(`ensureGuest ${Date.now() - start} ms`);
});

test.after(async () => {
  await ctx.source?.kill();
  await ctx.restored?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
  process.stderr.write(`vm-baseline timings: ${timings.join('; ')}\n`);
});

test('guest boots under TCG, reports ready, then ticks with an intact pattern', async () => {
  const start = Date.now();
  ctx.source = await startVm(vmOptions());
  await ctx.source.waitForLine(/^ready pages=12288 /, 90_000);
  timings.push(`boot to ready ${Date.now() - start} ms`);
  const ticks = await ctx.source.waitForTicks(3, 30_000);
  assert.ok(ticks.every((t) => t.ok), ticks.map((t) => t.line.text).join('\n'));
  assert.equal(ticks.map((t) => t.n), [1, 2, 3]);
  assert.ok(ticks[2].gen > ticks[0].gen, 'the guest keeps writing memory');
});

test('background snapshot: the guest keeps running, QEMU settings are put back', async () => {
  const vm = ctx.source!;
  const capsBefore = await vm.qmp.execute<Caps>('query-migrate-capabilities');
  const file = path.join(ctx.dir!, 'qemu-stream.bin');
  ctx.run = await snapshotTicking(vm, (s) => writeFile(s, file));
  const { result, during, consumed } = ctx.run;
  timings.push(`snapshot ${ctx.run.ms} ms, ${consumed} bytes, downtime ${result.downtimeMs} ms, ` +
    `total-time ${result.totalTimeMs} ms, ticks ${ctx.run.lastBefore}..${ctx.run.lastEnd}`);
  assert.ok(consumed > 48 << 20, `stream of ${consumed} bytes cannot hold the 48 MiB pattern`);
  assert.ok(during.length >= 1, `no tick while the snapshot ran for ${ctx.run.ms} ms: was the VM paused?`);
  assert.ok(during.every((t) => t.ok), 'the live guest stays consistent during the snapshot');
  assert.is(result.runStateAfter, 'running');
  assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  assert.equal(await vm.qmp.execute<Caps>('query-migrate-capabilities'), capsBefore);
  assert.ok(result.downtimeMs !== null && result.downtimeMs < 1000, `downtime ${result.downtimeMs} ms`);
  const after = await vm.waitForTicks(2, 10_000, vm.lines().length);
  assert.ok(after.every((t) => t.ok) && after[0].n > ctx.run.lastEnd - 1);
  assert.not.ok(vm.lines().some((l) => /check=FAIL/.test(l.text)), 'no check failure on the live guest');
});

// QEMU 7.2 leaves a vCPU blocked for good if a background snapshot of a busy
// guest stops early (migrate_cancel or a broken socket), so an abort must drain.
test('abort while the reader stalls: the guest stalls, then runs on after the abort', async () => {
  const vm = ctx.source!;
  const snap = await openQemuSnapshot(vm.qmpPath);
  await sleep(1500); // nobody reads: QEMU blocks, and so do guest writes to unsaved pages
  const from = vm.lines().length;
  await bounded(snap.abort('stalled reader'), 30_000, 'abort');
  assert.match((await snap.done.catch((e: Error) => e)).toString(), /aborted: stalled reader/);
  const ticks = await vm.waitForTicks(2, 15_000, from);
  assert.ok(ticks.every((t) => t.ok), ticks.map((t) => t.line.text).join('\n'));
  assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  // Free the CPU for the restore: 2 cores are shared.
  await vm.kill();
  ctx.source = undefined;
});

test('restore in a fresh QEMU resumes at the snapshot point with check=ok', async () => {
  const run = ctx.run!;
  const start = Date.now();
  const file = path.join(ctx.dir!, 'qemu-stream.bin');
  ctx.restored = await startVm({ ...vmOptions(), incoming: incomingFromFile(file) });
  const ticks = await waitForResume(ctx.restored, run, 3, 60_000);
  timings.push(`restore to first tick ${ticks[0].line.at - start} ms, resumed at tick ${ticks[0].n}`);
  // Background snapshot saves memory as it was when the snapshot started.
  assert.ok(ticks[0].n <= run.lastBefore + 2, `resumed at ${ticks[0].n}, snapshot started after tick ${run.lastBefore}`);
  assert.is((await ctx.restored.qmp.execute<{ status: string }>('query-status')).status, 'running');
  assert.not.ok(ctx.restored.lines().some((l) => /check=FAIL/.test(l.text)));
  await ctx.restored.kill();
  ctx.restored = undefined;
});

// Without this the baseline could pass with a check that never fails.
test('the guest check catches a torn copy and a damaged page', async () => {
  for (const fault of [1, 2]) {
    const vm = await startVm({ ...vmOptions(), guestMb: 8, append: `bgsnap.fault=${fault} bgsnap.fault_at=2` });
    try {
      const injected = await vm.waitForLine(new RegExp(`^fault ${fault} injected`), 60_000);
      const [bad] = await vm.waitForTicks(1, 10_000, injected.index + 1);
      assert.not.ok(bad.ok, `fault ${fault} went unnoticed: ${bad.line.text}`);
      assert.is(bad.n, 3);
      if (fault === 1) assert.match(bad.line.text, /sum=\d+ want=\d+ bad=0 /);
      else assert.match(bad.line.text, /bad=1 /);
    } finally {
      await vm.kill();
    }
  }
});

test.run();
