// Whole-VM snapshots with disks, on real QEMU 7.2 (TCG) and a real virtio disk.
// The guest (test/guest/disk.h) writes records to its disk with O_DIRECT and
// keeps the last completed one in RAM; every tick it checks that disk and RAM
// agree. Captured while it writes, restored from the image's vmstate plus the
// converted disk, the check must pass; on a disk copied a few seconds later it
// must fail, which proves the oracle. Afterwards the source VM runs on, with no
// block job or node of ours left and its backing chain as before.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest } from './helpers/guest';
import { DiskVms, laterDiskCaught, chain, copyLater } from './helpers/disk-vm';
import { BIN, run, sh } from './helpers/cli';
import { tmpDir } from './helpers/net';

let ctx: DiskVms;

test.before(async () => {
  ctx = new DiskVms(await ensureGuest(), tmpDir('disks'));
});

test.after(async () => {
  await ctx?.killAll();
  if (ctx) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

// 144 MiB of data ahead of the guest's records make the backup outlast the
// pause, so the guest writes its records while they are still being copied:
// copy-before-write must keep the copy at the instant.
test('raw disk: RAM and disk agree after restore; a disk copied seconds later fails the same check', async () => {
  const disk = path.join(ctx.dir, 'd0.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '160M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 144M', disk]);
  const vm = await ctx.boot(`file=${disk},format=raw,if=virtio,id=d0`, { append: 'bgsnap.disk=1 bgsnap.disk_at=150' });
  const { image, stats } = await ctx.capture(vm, 'raw');
  assert.ok(typeof stats.pauseMs === 'number' && typeof stats.downtimeMs === 'number', JSON.stringify(stats));
  assert.ok((stats.diskCopyMs as number) > (stats.pauseMs as number), `the disk copy outlasted the pause: ${JSON.stringify(stats)}`);
  const late = path.join(ctx.dir, 'late.raw');
  const source = await copyLater(vm, disk, late);

  const insp = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout);
  assert.equal(insp.drives.map((d: { id: string; size: number }) => [d.id, d.size]), [['d0', 160 << 20]]);
  const restored = path.join(ctx.dir, 'restored.raw');
  const c = await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored]);
  assert.is(c.code, 0, c.stderr);
  assert.is(fs.statSync(restored).size, 160 << 20);
  assert.is(fs.statSync(restored).mode & 0o777, 0o600);

  const good = await ctx.restore(image, restored, 'bgsnap.disk=1 bgsnap.disk_at=150');
  assert.ok(good.every((k) => k.ok), `restored guest: ${good.map((k) => k.text).join(' | ')}`);
  const bad = await ctx.restore(image, late, 'bgsnap.disk=1 bgsnap.disk_at=150');
  assert.ok(laterDiskCaught(bad), `later disk must fail the check: ${bad.map((k) => k.text).join(' | ')}; the source's last lines: ${source}`);
});

test('qcow2 disk with a backing file: restore agrees, chain unchanged', async () => {
  const base = path.join(ctx.dir, 'base.qcow2');
  const top = path.join(ctx.dir, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
  execFileSync('qemu-io', ['-c', 'write -P 0x5a 8M 4M', base]); // data only the backing file holds
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const vm = await ctx.boot(`file=${top},format=qcow2,if=virtio,id=d0`);
  const before = chain(top);
  const { image } = await ctx.capture(vm, 'qcow2');
  assert.equal(chain(top), before);
  await vm.kill();
  const restored = path.join(ctx.dir, 'restored2.raw');
  assert.is((await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored])).code, 0);
  // On a terminal (script(1) gives it one) convert shows progress; the same disk.
  const tty = await sh(`script -qec "${BIN.convert.replace(/'/g, '')} ${image} --to disk --drive d0 -o ${restored}.tty" /dev/null`, 60_000);
  assert.is(tty.code, 0, tty.stdout + tty.stderr);
  assert.match(tty.stdout, /bgsnap-convert: \d+ of \d+ pages \(\d+%\)/);
  assert.ok(fs.readFileSync(`${restored}.tty`).equals(fs.readFileSync(restored)), 'the same disk with or without a terminal');
  const fd = fs.openSync(restored, 'r');
  const b = Buffer.alloc(4096);
  fs.readSync(fd, b, 0, 4096, 9 << 20);
  fs.closeSync(fd);
  assert.ok(b.every((x) => x === 0x5a), 'the backing file\'s data is in the snapshot');
  const good = await ctx.restore(image, restored);
  assert.ok(good.every((k) => k.ok), `restored guest: ${good.map((k) => k.text).join(' | ')}`);
});

test.run();
