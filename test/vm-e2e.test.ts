// The whole pipe on a real VM: a real Linux guest writing a self-verifying memory
// pattern under TCG; `bgsnap-capture --qmp | bgsnap-receive -o IMAGE` while it
// runs; `bgsnap-convert IMAGE --to qemu -o -` fed to a fresh, unmodified QEMU with
// -incoming; the guest must resume from the snapshot point with its check intact.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { startVm, waitForResume, type Vm, type VmOptions, type TickWindow } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { tmpDir } from './helpers/net';

const ctx: { guest?: Guest; vm?: Vm; dir?: string; window?: TickWindow; image?: string } = {};

function vmOptions(extra: Partial<VmOptions> = {}): VmOptions {
  return { kernel: ctx.guest!.kernel, initrd: ctx.guest!.initrd, memMb: 256, guestMb: 48, ...extra };
}

test.before(async () => {
  ctx.guest = await ensureGuest();
  ctx.dir = tmpDir('e2e');
  ctx.image = path.join(ctx.dir, 'snap.img');
});

test.after(async () => {
  await ctx.vm?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

test('capture --qmp | receive: a complete image while the guest keeps running', async () => {
  const vm = (ctx.vm = await startVm(vmOptions()));
  await vm.waitForLine(/^ready /, 90_000);
  await vm.waitForTicks(2, 30_000);
  const lastBefore = vm.ticks().at(-1)!.n;
  const from = vm.lines().length;
  const cap = path.join(ctx.dir!, 'cap.json');
  const rcv = path.join(ctx.dir!, 'rcv.json');
  const r = await sh(`${BIN.capture} --qmp '${vm.qmpPath}' --compress 1 --stats '${cap}' | ${BIN.receive} -o '${ctx.image}' --stats '${rcv}'`, 120_000);
  assert.is(r.code, 0, r.stderr);
  ctx.window = { lastBefore, lastEnd: vm.ticks().at(-1)!.n };
  const capStats = JSON.parse(fs.readFileSync(cap, 'utf8'));
  const rcvStats = JSON.parse(fs.readFileSync(rcv, 'utf8'));
  assert.is(rcvStats.status, 'complete');
  assert.is(capStats.runStateAfter, 'running');
  assert.ok(vm.ticks(from).length >= 1, 'the guest printed ticks during the capture: it was not paused');
  assert.is(rcvStats.pagesReceived, capStats.pages);
  assert.is(rcvStats.uniquePages, (256 << 20) / 4096 + 32 + 64 + 32 + 1 + 1, 'every page of every RAM block once');
  assert.ok(rcvStats.imageBytes <= 256 << 20, `image ${rcvStats.imageBytes} bytes on disk exceeds guest RAM`);
  assert.ok(rcvStats.dataPages >= 12288, 'the 48 MiB pattern is in the image');
  assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  await vm.kill();
  ctx.vm = undefined;
});

test('inspect reports the image', async () => {
  const r = await run(BIN.inspect, [ctx.image!, '--json']);
  assert.is(r.code, 0, r.stderr);
  const d = JSON.parse(r.stdout);
  assert.is(d.status, 'complete');
  assert.is(d.source, 'qemu');
  assert.is(d.label, 'pc-i440fx-7.2');
  assert.equal(d.blocks.map((b: { name: string }) => b.name).slice(0, 1), ['pc.ram']);
  assert.ok(d.states.includes('qemu.devices'));
});

test('convert --to qemu restores in unmodified QEMU at the snapshot point, check=ok', async () => {
  const incoming = `exec:${BIN.convert} '${ctx.image}' --to qemu -o -`;
  const vm = (ctx.vm = await startVm(vmOptions({ incoming })));
  const ticks = await waitForResume(vm, ctx.window!, 3, 120_000);
  assert.ok(ticks.every((t) => t.ok));
  await vm.kill();
  ctx.vm = undefined;
});

test('convert --to raw gives the guest RAM as a flat sparse file', async () => {
  const out = path.join(ctx.dir!, 'ram.raw');
  const r = await run(BIN.convert, [ctx.image!, '--to', 'raw', '-o', out]);
  assert.is(r.code, 0, r.stderr);
  const st = fs.statSync(out);
  assert.is(st.size, 256 << 20);
  assert.ok(st.blocks * 512 < st.size, 'zero pages stay holes');
});

test.run();
