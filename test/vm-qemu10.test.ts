// bgsnap against Debian 13's QEMU 10.0 (installed into the test cache by
// helpers/qemu10.ts), with the same real TCG guest as the 7.2 tests:
// - a background snapshot of a pc-i440fx-10.0 guest through `bgsnap-capture
//   --qmp | bgsnap-receive`, converted and restored into QEMU 10 (check=ok);
// - `--pid` capture of the running QEMU 10 process: one instant of the guest;
// - QEMU 10's own precopy (which adds a SWITCHOVER_START command before the ram
//   END section) into bgsnap-receive: the image holds exactly the RAM and device
//   state QEMU sent (independent reading of the teed stream) and loads back;
// - a QEMU 7.2 snapshot restored into QEMU 10 (same machine type);
// - capture refusing the capabilities QEMU 10 added that change the RAM layout;
// - the same background snapshot round trip on pc-q35-10.0.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { ensureQemu10, type QemuBinary } from './helpers/qemu10';
import { sleep, startVm, waitForResume, type Vm, type VmOptions, type TickWindow } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { checkGuestPattern } from './helpers/guest-pattern';
import { lastCopyRam } from './helpers/qemu-ram-oracle';
import { tmpDir } from './helpers/net';

const MEM_MB = 128;
const GUEST_MB = 32;
const ctx: { guest?: Guest; qemu?: QemuBinary; vms: Vm[]; dir?: string } = { vms: [] };

const t0 = Date.now();
function mark(what: string): void {
  if (process.env.BGSNAP_TIMING) process.stderr.write(`  [${((Date.now() - t0) / 1000).toFixed(1)} s] ${what}\n`);
}

async function vm10(extra: Partial<VmOptions> = {}): Promise<Vm> {
  const g = ctx.guest!;
  const vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: MEM_MB, guestMb: GUEST_MB, qemu: ctx.qemu, ...extra });
  ctx.vms.push(vm);
  return vm;
}

test.before(async () => {
  [ctx.guest, ctx.qemu] = await Promise.all([ensureGuest(), ensureQemu10()]);
  ctx.dir = tmpDir('qemu10');
});

test.after(async () => {
  for (const vm of ctx.vms) await vm.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

// capture --qmp | receive on a ticking guest; returns the image and its tick window.
async function captureQmp(vm: Vm, name: string): Promise<{ image: string; window: TickWindow }> {
  await vm.waitForTicks(2, 90_000);
  mark(`${name}: guest ticking`);
  const lastBefore = vm.ticks().at(-1)!.n;
  const from = vm.lines().length;
  const image = path.join(ctx.dir!, `${name}.img`);
  const cap = path.join(ctx.dir!, `${name}-cap.json`);
  const r = await sh(`${BIN.capture} --qmp '${vm.qmpPath}' --stats '${cap}' | ${BIN.receive} -q -o '${image}'`, 120_000);
  assert.is(r.code, 0, r.stderr);
  assert.is(JSON.parse(fs.readFileSync(cap, 'utf8')).runStateAfter, 'running');
  assert.ok(vm.ticks(from).length >= 1, 'the guest printed ticks during the capture: it was not paused');
  mark(`${name}: captured`);
  return { image, window: { lastBefore, lastEnd: vm.ticks().at(-1)!.n } };
}

async function restoreChecks(image: string, window: TickWindow, machine: string): Promise<void> {
  const info = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout);
  assert.is(info.status, 'complete');
  assert.is(info.label, machine);
  const vm = await vm10({ machine, incoming: `exec:${BIN.convert} '${image}' --to qemu -o -` });
  const ticks = await waitForResume(vm, window, 3, 120_000);
  assert.ok(ticks.every((t) => t.ok));
  mark(`${machine}: restored, ${ticks.length} ticks ok`);
  await vm.kill();
}

test('QEMU 10 pc-i440fx-10.0: capture --qmp while it runs, then --pid, and the --qmp image restores into QEMU 10 with check=ok', async () => {
  const vm = await vm10();
  const { image, window } = await captureQmp(vm, 'i440fx');
  await pidCapture(vm);
  await vm.kill();
  await restoreChecks(image, window, ctx.qemu!.machine);
});

// Like process-qemu.test.ts: the guest RAM mapping of the QEMU 10 process holds
// one instant of the guest, while a plain copy read meanwhile is torn.
async function pidCapture(vm: Vm): Promise<void> {
  const image = path.join(ctx.dir!, 'pid.img');
  const from = vm.lines().length;
  const r = await sh(`${BIN.capture} --pid ${vm.pid} | ${BIN.receive} -q -o '${image}'`, 120_000);
  assert.is(r.code, 0, r.stderr);
  const after = await vm.waitForTicks(2, 30_000, from);
  assert.ok(after.every((t) => t.ok), 'the live guest stays consistent');
  type Block = { name: string; length: number; address: number };
  const blocks = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout).blocks as Block[];
  const ram = blocks.filter((b) => !b.name.split(' ')[1].includes('x')).reduce((a, b) => (b.length > a.length ? b : a));
  assert.ok(ram.length >= MEM_MB << 20, `largest mapping ${ram.name} is ${ram.length} bytes, not the guest RAM`);
  const out = path.join(ctx.dir!, 'pid-ram.raw');
  const c = await run(BIN.convert, [image, '--to', 'raw', '--block', ram.name, '-o', out]);
  assert.is(c.code, 0, c.stderr);
  const npages = (GUEST_MB << 20) / 4096;
  const check = checkGuestPattern(fs.readFileSync(out), npages);
  assert.ok(check.consistent, `--pid snapshot: ${JSON.stringify(check)}`);
  const torn = Buffer.alloc(ram.length);
  const fd = fs.openSync(`/proc/${vm.pid}/mem`, 'r');
  try {
    for (let off = 0; off < torn.length; off += 65536) fs.readSync(fd, torn, off, 65536, ram.address + off);
  } finally {
    fs.closeSync(fd);
  }
  const control = checkGuestPattern(torn, npages);
  assert.is(control.found, npages);
  assert.not.ok(control.consistent, `control: a copy read while the guest runs passed the check: ${JSON.stringify(control)}`);
  fs.rmSync(out);
  fs.rmSync(image, { recursive: true, force: true });
  mark('pid capture checked');
}

type Info = { status?: string };

async function migrateAndWait(vm: Vm, uri: string): Promise<string> {
  await vm.qmp.execute('migrate', { uri });
  for (let i = 0; i < 600; i++) {
    const { status } = await vm.qmp.execute<Info>('query-migrate');
    if (!['setup', 'active', 'device'].includes(status ?? '')) return status ?? '';
    await sleep(200);
  }
  return 'timeout';
}

test('QEMU 10 precopy into bgsnap-receive: exactly the RAM and device state it sent, and it loads back into QEMU 10', async () => {
  const src = await vm10();
  await src.waitForTicks(2, 90_000);
  mark('precopy: guest ticking');
  const raw = path.join(ctx.dir!, 'precopy.qemu');
  const image = path.join(ctx.dir!, 'precopy.img');
  const stats = path.join(ctx.dir!, 'precopy.json');
  await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 20_000 });
  const lastBefore = src.ticks().at(-1)!.n;
  assert.is(await migrateAndWait(src, `exec:tee '${raw}' | ${BIN.receive} -q -o '${image}' --stats '${stats}'`), 'completed');
  const window = { lastBefore, lastEnd: src.ticks().at(-1)!.n };
  await src.kill();
  mark('precopy: migrated');
  for (let i = 0; i < 100 && !fs.existsSync(stats); i++) await sleep(100);
  assert.is(JSON.parse(fs.readFileSync(stats, 'utf8')).status, 'complete');
  const stream = fs.readFileSync(raw);
  fs.rmSync(raw);
  const cmdAfterRam = Buffer.from([0x7e, 0, 0, 0, 1, 0x08, 0, 11, 0, 0]);
  assert.ok(stream.includes(cmdAfterRam), 'QEMU 10 sent SWITCHOVER_START right after a ram section');
  const oracle = lastCopyRam(stream, 'pc.ram', MEM_MB << 20);
  const devices = stream.subarray(oracle.tail);
  assert.ok(devices.length > 1000 && devices[0] === 0x04, 'the stream ends with device sections');
  const ramOut = path.join(ctx.dir!, 'precopy-ram.raw');
  const r = await run(BIN.convert, [image, '--to', 'raw', '-o', ramOut]);
  assert.is(r.code, 0, r.stderr);
  assert.ok(fs.readFileSync(ramOut).equals(oracle.ram), 'image RAM equals the last copy of every page in the stream');
  fs.rmSync(ramOut);
  const conv = path.join(ctx.dir!, 'precopy-conv.qemu');
  const c = await run(BIN.convert, [image, '--to', 'qemu', '-o', conv]);
  assert.is(c.code, 0, c.stderr);
  const again = fs.readFileSync(conv);
  fs.rmSync(conv);
  assert.ok(again.subarray(again.length - devices.length).equals(devices), 'the image gives back the device state byte for byte');
  assert.not.ok(again.includes(cmdAfterRam), 'the command is dropped, not replayed');
  mark('precopy: checked against the stream');
  await loadBack(image, oracle.ram, window);
  mark('precopy: loaded back');
});

// A fresh QEMU 10 loads the converted image (-S: it waits paused), and migrated
// out again gives back exactly the image's RAM; continued, the guest resumes
// where the source stopped, with its check intact.
async function loadBack(image: string, ram: Buffer, window: TickWindow): Promise<void> {
  const vm = await vm10({ incoming: `exec:${BIN.convert} '${image}' --to qemu -o -`, extraArgs: ['-S'] });
  let status = '';
  for (let i = 0; i < 300 && status !== 'paused'; i++) {
    await sleep(200);
    status = (await vm.qmp.execute<{ status: string }>('query-status')).status;
  }
  assert.is(status, 'paused', 'the destination loaded the stream and waits paused (-S)');
  const out = path.join(ctx.dir!, 'back.qemu');
  assert.is(await migrateAndWait(vm, `exec:cat > '${out}' && touch '${out}.done'`), 'completed');
  for (let i = 0; i < 100 && !fs.existsSync(`${out}.done`); i++) await sleep(100);
  assert.ok(lastCopyRam(fs.readFileSync(out), 'pc.ram', MEM_MB << 20).ram.equals(ram), 'the restored VM holds exactly the RAM of the image');
  fs.rmSync(out);
  await vm.qmp.execute('cont');
  const ticks = await waitForResume(vm, window, 3, 60_000);
  assert.ok(ticks.every((t) => t.ok));
  await vm.kill();
}

// The upgrade path: a snapshot taken on the system QEMU 7.2 restores into QEMU
// 10 running the same machine type.
test('a QEMU 7.2 snapshot (pc-i440fx-7.2) restores into QEMU 10 with check=ok', async () => {
  const g = ctx.guest!;
  const vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: MEM_MB, guestMb: GUEST_MB });
  ctx.vms.push(vm);
  const { image, window } = await captureQmp(vm, 'from72');
  await vm.kill();
  await restoreChecks(image, window, 'pc-i440fx-7.2');
});

test('QEMU 10: capture --qmp refuses mapped-ram and x-ignore-shared by name before touching the VM', async () => {
  const vm = await startVm({ memMb: 64, qemu: ctx.qemu }); // SeaBIOS alone is enough
  ctx.vms.push(vm);
  const caps = [{ capability: 'mapped-ram', state: true }, { capability: 'x-ignore-shared', state: true }];
  await vm.qmp.execute('migrate-set-capabilities', { capabilities: caps });
  const before = await vm.qmp.execute('query-migrate-capabilities');
  const r = await sh(`${BIN.capture} --qmp '${vm.qmpPath}' > /dev/null`, 30_000);
  assert.is.not(r.code, 0);
  assert.match(r.stderr, /'mapped-ram', 'x-ignore-shared'.*migrate_set_capability mapped-ram off/s);
  assert.equal(await vm.qmp.execute('query-migrate-capabilities'), before, 'capabilities untouched');
  assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  await vm.kill();
});

test('QEMU 10 pc-q35-10.0: capture --qmp while it runs, restored into QEMU 10 with check=ok', async () => {
  const machine = ctx.qemu!.q35;
  const vm = await vm10({ machine });
  const { image, window } = await captureQmp(vm, 'q35');
  await vm.kill();
  await restoreChecks(image, window, machine);
});

test.run();
