// The whole-VM round trip of vm-disks.test.ts on Debian 13's QEMU 10.0
// (helpers/qemu10.ts), pc-i440fx-10.0: the guest writes O_DIRECT records to
// its virtio disk and keeps the last completed one in RAM; captured (disks
// by default) while it writes, restored into QEMU 10 from the image's vmstate plus
// the converted disk, RAM and disk agree; a disk copied seconds later fails the
// same check. QEMU 9.0 and later leave a VM that was stopped before the
// background snapshot stopped (vm_resume(vm_old_state)); bgsnap resumes it once
// QEMU's RAM is write-protected, so the guest must write on while the capture
// runs, not only after it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest } from './helpers/guest';
import { ensureQemu10 } from './helpers/qemu10';
import { DiskVms, laterDiskCaught, copyLater } from './helpers/disk-vm';
import { BIN, run } from './helpers/cli';
import { tmpDir } from './helpers/net';

let ctx: DiskVms;

test.before(async () => {
  const [guest, qemu] = await Promise.all([ensureGuest(), ensureQemu10()]);
  ctx = new DiskVms(guest, tmpDir('disks10'), qemu);
});

test.after(async () => {
  await ctx?.killAll();
  if (ctx) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

test('QEMU 10: RAM and disk agree after a restore into QEMU 10; the guest ran during the capture; a later disk fails', async () => {
  const disk = path.join(ctx.dir, 'd0.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '160M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 144M', disk]);
  const append = 'bgsnap.disk=1 bgsnap.disk_at=150';
  const vm = await ctx.boot(`file=${disk},format=raw,if=virtio,id=d0`, { append });
  const { image, stats, during } = await ctx.capture(vm, 'raw10');
  process.stderr.write(`  QEMU 10 with a disk: ${JSON.stringify({ pauseMs: stats.pauseMs, downtimeMs: stats.downtimeMs, diskCopyMs: stats.diskCopyMs, totalTimeMs: stats.totalTimeMs, during })}\n`);
  assert.is(stats.qemuVersion, '10.0.' + String(stats.qemuVersion).split('.')[2]);
  assert.ok(typeof stats.pauseMs === 'number', `the guest was seen running again: ${JSON.stringify(stats)}`);
  assert.ok((stats.pauseMs as number) < (stats.totalTimeMs as number), `resumed before the snapshot ended: ${JSON.stringify(stats)}`);
  assert.ok(during >= 1, 'the guest checked its disk while the capture ran: it was not left paused to the end');
  const late = path.join(ctx.dir, 'late.raw');
  const source = await copyLater(vm, disk, late);

  const restored = path.join(ctx.dir, 'restored.raw');
  const c = await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored]);
  assert.is(c.code, 0, c.stderr);
  const insp = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout);
  assert.is(insp.label, 'pc-i440fx-10.0');
  const good = await ctx.restore(image, restored, append);
  assert.ok(good.every((k) => k.ok), `restored guest: ${good.map((k) => k.text).join(' | ')}`);
  const bad = await ctx.restore(image, late, append);
  assert.ok(laterDiskCaught(bad), `later disk must fail the check: ${bad.map((k) => k.text).join(' | ')}; the source's last lines: ${source}`);
});

test.run();
