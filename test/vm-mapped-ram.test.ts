// `bgsnap-convert --to qemu-mapped-ram` against QEMU 10.0 (test cache, see
// helpers/qemu10.ts):
// - the file layout equals what QEMU 10 itself writes with mapped-ram on (its
//   own file, read by an independent parser here), preamble included;
// - a live capture of a pc-i440fx-10.0 guest, converted to mapped-ram and
//   loaded with multifd: the loaded VM holds exactly the image's RAM, and
//   continued, resumes from the snapshot point with its memory check intact;
// - a QEMU 7.2 snapshot (pc-i440fx-7.2) restored the same way without multifd.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { ensureQemu10, type QemuBinary } from './helpers/qemu10';
import { sleep, startVm, waitForResume, type Vm, type VmOptions, type TickWindow } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { lastCopyRam } from './helpers/qemu-ram-oracle';
import { planMappedRam, withMappedRamCapability } from '../format/qemu-mapped-ram';
import { configEnd, parseMappedRam } from './helpers/mapped-ram';

const MEM_MB = 128;
const GUEST_MB = 32;
const ctx: { guest?: Guest; qemu?: QemuBinary; vms: Vm[]; dir?: string } = { vms: [] };

async function vm(opts: Partial<VmOptions>): Promise<Vm> {
  const g = ctx.guest!;
  const v = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: MEM_MB, guestMb: GUEST_MB, qemu: ctx.qemu, ...opts });
  ctx.vms.push(v);
  return v;
}

test.before(async () => {
  [ctx.guest, ctx.qemu] = await Promise.all([ensureGuest(), ensureQemu10()]);
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-mapped-ram-'));
});

test.after(async () => {
  for (const v of ctx.vms) await v.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

async function migrateAndWait(v: Vm, uri: string): Promise<string> {
  await v.qmp.execute('migrate', { uri });
  for (let i = 0; i < 600; i++) {
    const { status } = await v.qmp.execute<{ status?: string }>('query-migrate');
    if (!['setup', 'active', 'device'].includes(status ?? '')) return status ?? '';
    await sleep(100);
  }
  return 'timeout';
}

test('the layout equals the mapped-ram file QEMU 10 writes itself, preamble included', async () => {
  const v = await startVm({ memMb: 64, qemu: ctx.qemu }); // SeaBIOS alone: RAM blocks and devices
  ctx.vms.push(v);
  await v.qmp.execute('stop');
  const plain = path.join(ctx.dir!, 'own.qemu');
  const own = path.join(ctx.dir!, 'own.mr');
  assert.is(await migrateAndWait(v, `file:${plain}`), 'completed');
  await v.qmp.execute('cont'); // a migrated VM must run again before it may migrate again
  await v.qmp.execute('stop');
  await v.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
  assert.is(await migrateAndWait(v, `file:${own}`), 'completed');
  await v.kill();
  const f = fs.readFileSync(own);
  const parsed = parseMappedRam(f);
  const plainStream = fs.readFileSync(plain);
  const plainPreamble = plainStream.subarray(0, configEnd(plainStream));
  assert.ok(withMappedRamCapability(plainPreamble).equals(f.subarray(0, parsed.preambleEnd)), 'the plain stream\'s preamble plus the capability is QEMU\'s own');
  const ram = { sectionId: parsed.sectionId, instanceId: parsed.instanceId, version: 4 };
  const plan = planMappedRam(f.subarray(0, parsed.preambleEnd), parsed.blocks, ram);
  assert.ok(parsed.blocks.length >= 4, `${parsed.blocks.length} blocks`);
  parsed.blocks.forEach((b, i) => {
    assert.is(b.version, 1);
    assert.is(b.pageSize, 4096);
    assert.is(plan.blocks[i].bitmapOffset, b.bitmapOffset, `${b.name} bitmap`);
    assert.is(plan.blocks[i].pagesOffset, b.pagesOffset, `${b.name} pages`);
    assert.ok(plan.pieces[i + 1].bytes.equals(f.subarray(b.headerAt, b.headerAt + plan.pieces[i + 1].bytes.length)), `${b.name} header bytes`);
  });
  assert.ok(plan.pieces[0].bytes.equals(f.subarray(0, plan.pieces[0].bytes.length)), 'START section and MEM_SIZE');
  const eos = plan.pieces.at(-1)!;
  assert.is(eos.at, parsed.end);
  assert.ok(eos.bytes.equals(f.subarray(eos.at, eos.at + eos.bytes.length)), 'EOS and footer where QEMU puts them');
});

async function capture(source: Vm, name: string): Promise<{ image: string; window: TickWindow }> {
  await source.waitForTicks(2, 90_000);
  const lastBefore = source.ticks().at(-1)!.n;
  const image = path.join(ctx.dir!, `${name}.img`);
  const r = await sh(`${BIN.capture} --qmp '${source.qmpPath}' | ${BIN.receive} -q -o '${image}'`, 120_000);
  assert.is(r.code, 0, r.stderr);
  const window = { lastBefore, lastEnd: source.ticks().at(-1)!.n };
  await source.kill();
  return { image, window };
}

// Converts, loads into a paused QEMU 10 (-S) through mapped-ram, and returns it.
async function load(image: string, machine: string, channels: number): Promise<{ dest: Vm; file: string }> {
  const file = path.join(ctx.dir!, `${path.basename(image)}.mr`);
  const c = await run(BIN.convert, [image, '--to', 'qemu-mapped-ram', '-o', file]);
  assert.is(c.code, 0, c.stderr);
  const st = fs.statSync(file);
  const imageData = fs.statSync(path.join(image, 'data')).blocks * 512;
  assert.ok(st.blocks * 512 <= imageData + (1 << 20), `zero pages are holes: ${st.blocks * 512} bytes allocated, the image's data ${imageData}`);
  const dest = await vm({ machine, incoming: 'defer', extraArgs: ['-S'] });
  const caps = [{ capability: 'mapped-ram', state: true }, { capability: 'multifd', state: channels > 0 }];
  await dest.qmp.execute('migrate-set-capabilities', { capabilities: caps });
  if (channels > 0) await dest.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels });
  await dest.qmp.execute('migrate-incoming', { uri: `file:${file}` });
  let status = '';
  for (let i = 0; i < 600 && status !== 'paused'; i++) {
    await sleep(100);
    status = (await dest.qmp.execute<{ status: string }>('query-status')).status;
  }
  assert.is(status, 'paused', `the destination loaded the file and waits paused (-S): ${dest.stderr()}`);
  return { dest, file };
}

// Migrated out again, the loaded VM gives back exactly the image's guest RAM.
async function sameRam(dest: Vm, image: string): Promise<void> {
  const raw = path.join(ctx.dir!, 'ram.raw');
  const r = await run(BIN.convert, [image, '--to', 'raw', '-o', raw]);
  assert.is(r.code, 0, r.stderr);
  const out = path.join(ctx.dir!, 'back.qemu');
  const off = [{ capability: 'mapped-ram', state: false }, { capability: 'multifd', state: false }];
  await dest.qmp.execute('migrate-set-capabilities', { capabilities: off }); // a plain stream to a pipe
  assert.is(await migrateAndWait(dest, `exec:cat > '${out}' && touch '${out}.done'`), 'completed');
  for (let i = 0; i < 100 && !fs.existsSync(`${out}.done`); i++) await sleep(100);
  const back = lastCopyRam(fs.readFileSync(out), 'pc.ram', MEM_MB << 20).ram;
  assert.ok(back.equals(fs.readFileSync(raw)), 'the loaded VM holds exactly the RAM of the image');
  fs.rmSync(out);
  fs.rmSync(raw);
}

test('a live QEMU 10 capture restores through mapped-ram with 2 multifd channels: same RAM, check=ok', async () => {
  const { image, window } = await capture(await vm({}), 'q10');
  const { dest, file } = await load(image, ctx.qemu!.machine, 2);
  await sameRam(dest, image);
  await dest.qmp.execute('cont');
  const ticks = await waitForResume(dest, window, 3, 60_000);
  assert.ok(ticks.every((t) => t.ok));
  await dest.kill();
  fs.rmSync(file);
});

test('a QEMU 7.2 snapshot (pc-i440fx-7.2) restores into QEMU 10 through mapped-ram without multifd, check=ok', async () => {
  const g = ctx.guest!;
  const source = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: MEM_MB, guestMb: GUEST_MB });
  ctx.vms.push(source);
  const { image, window } = await capture(source, 'from72');
  const { dest } = await load(image, 'pc-i440fx-7.2', 0);
  await dest.qmp.execute('cont');
  const ticks = await waitForResume(dest, window, 3, 60_000);
  assert.ok(ticks.every((t) => t.ok));
  await dest.kill();
});

test.run();
