// `bgsnap-capture --pid` works on a QEMU process like on any other: the guest RAM
// mapping of a running TCG guest is captured while the guest keeps running, and
// the guest's memory pattern in it is exactly one instant of the guest. A plain
// copy of the same mapping taken while the guest runs is shown not to be.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest } from './helpers/guest';
import { startVm, type Vm } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { checkGuestPattern } from './helpers/guest-pattern';
import { tmpDir } from './helpers/net';

const GUEST_MB = 48;
const NPAGES = (GUEST_MB << 20) / 4096;
const ctx: { vm?: Vm; dir?: string; ramAddress?: number; ramLength?: number } = {};

test.before(async () => {
  const g = await ensureGuest();
  ctx.dir = tmpDir('pidqemu');
  ctx.vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: 256, guestMb: GUEST_MB });
  await ctx.vm.waitForTicks(2, 90_000);
});

test.after(async () => {
  await ctx.vm?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

test('capture --pid of qemu-system: the guest RAM holds one instant of the guest, which keeps running', async () => {
  const vm = ctx.vm!;
  const image = path.join(ctx.dir!, 'qemu-process.img');
  const from = vm.lines().length;
  const r = await sh(`${BIN.capture} --pid ${vm.pid} | ${BIN.receive} -q -o '${image}'`, 120_000);
  assert.is(r.code, 0, r.stderr);
  const after = await vm.waitForTicks(2, 30_000, from);
  assert.ok(after.every((t) => t.ok), 'the live guest stays consistent');
  const info = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout);
  assert.is(info.source, 'process');
  // The guest RAM is the largest writable mapping that is not TCG's executable code buffer.
  type Block = { name: string; length: number; address: number };
  const data = (info.blocks as Block[]).filter((b) => !b.name.split(' ')[1].includes('x'));
  const ram = data.reduce((a, b) => (b.length > a.length ? b : a));
  assert.ok(ram.length >= 256 << 20, `largest mapping ${ram.name} is ${ram.length} bytes, not the guest RAM`);
  const out = path.join(ctx.dir!, 'ram.raw');
  const c = await run(BIN.convert, [image, '--to', 'raw', '--block', ram.name, '-o', out]);
  assert.is(c.code, 0, c.stderr);
  const check = checkGuestPattern(fs.readFileSync(out), NPAGES);
  process.stderr.write(`  snapshot: ${JSON.stringify(check)}\n`);
  assert.ok(check.consistent, JSON.stringify(check));
  [ctx.ramAddress, ctx.ramLength] = [ram.address, ram.length];
  fs.rmSync(out);
});

test('control: a copy of the same mapping read while the guest runs is torn', async () => {
  // Read the mapping page by page from /proc/PID/mem; the guest moves thousands
  // of amounts meanwhile, so the pattern cannot add up.
  const fd = fs.openSync(`/proc/${ctx.vm!.pid}/mem`, 'r');
  const ram = Buffer.alloc(ctx.ramLength!);
  try {
    for (let off = 0; off < ram.length; off += 65536) fs.readSync(fd, ram, off, 65536, ctx.ramAddress! + off);
  } finally {
    fs.closeSync(fd);
  }
  const check = checkGuestPattern(ram, NPAGES);
  process.stderr.write(`  torn copy: ${JSON.stringify(check)}\n`);
  assert.is(check.found, NPAGES, 'the pattern pages are all there');
  assert.not.ok(check.consistent, `a torn copy passed the check: ${JSON.stringify(check)}`);
});

test.run();
