// A whole-VM snapshot of a guest writing files into a real filesystem (ext4,
// made on the host with mkfs.ext4, mounted by the guest kernel) on its virtio
// disk, on QEMU 7.2 (TCG). The guest (test/guest/fs.h) overwrites record files
// in place and creates and deletes files of changing sizes, each step made
// durable with fsync before RAM counts it; every tick, with its page cache
// dropped, it checks that the files on disk are exactly what RAM knows of.
// - The converted disk alone is a clean crash image: its journal replayed,
//   e2fsck finds nothing.
// - vmstate + converted disk: the restored guest's check passes, it unmounts
//   cleanly, and e2fsck -fn of the disk afterwards finds nothing.
// - vmstate + a disk copied once the source made five more steps durable:
//   the same check fails (record files newer than RAM knows of, or files RAM
//   still lists already deleted on that disk), which proves the oracle.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest } from './helpers/guest';
import { DiskVms, copyLater, diskChecks } from './helpers/disk-vm';
import { sleep, type Vm } from './helpers/vm';
import { BIN, run } from './helpers/cli';
import { tmpDir } from './helpers/net';

const FS_RE = /^fs=(ok|FAIL) last=(\d+) ondisk=(\d+)/;
const APPEND = 'bgsnap.fs=1';
let ctx: DiskVms;

test.before(async () => {
  ctx = new DiskVms(await ensureGuest(), tmpDir('fs'), undefined, FS_RE);
});

test.after(async () => {
  await ctx?.killAll();
  if (ctx) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

function e2fsck(args: string[], file: string): { code: number | null; out: string } {
  const r = spawnSync('e2fsck', [...args, file], { encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}`.trim() };
}

// The disk as a power cut would leave it: replaying its journal must give a
// filesystem e2fsck finds nothing wrong with.
function crashImageClean(disk: string): void {
  const copy = `${disk}.crash`;
  fs.copyFileSync(disk, copy);
  const replay = e2fsck(['-E', 'journal_only', '-y'], copy);
  assert.ok(replay.code === 0 || replay.code === 1, `journal replay: ${replay.out}`);
  const check = e2fsck(['-fn'], copy);
  assert.is(check.code, 0, `e2fsck -fn after journal replay:\n${check.out}`);
  fs.rmSync(copy);
}

async function unmount(vm: Vm): Promise<void> {
  const from = vm.lines().length;
  vm.console('umount\n');
  await vm.waitForLine(/^fs un/, 60_000, from);
  assert.ok(vm.lines(from).some((l) => l.text === 'fs unmounted'), vm.lines(from).map((l) => l.text).join(' | '));
  await vm.kill();
}

test('ext4 on a raw disk: files whole and filesystem clean after restore; a disk copied seconds later fails the check', async () => {
  const disk = path.join(ctx.dir, 'fs.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '128M']);
  execFileSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', disk]);
  const vm = await ctx.boot(`file=${disk},format=raw,if=virtio,id=d0`, { append: APPEND });
  const { image, stats } = await ctx.capture(vm, 'fs');
  process.stderr.write(`  ext4 guest: ${JSON.stringify({ pauseMs: stats.pauseMs, downtimeMs: stats.downtimeMs, diskCopyMs: stats.diskCopyMs })}\n`);
  // The disk once the source made five more steps durable (its fs checks say
  // so): record files hold records newer than the snapshot's RAM knows of.
  const atCapture = diskChecks(vm, 0, FS_RE).at(-1)!.last;
  for (let i = 0; i < 600 && !diskChecks(vm, 0, FS_RE).some((k) => k.last >= atCapture + 5); i++) await sleep(200);
  const sourceLast = diskChecks(vm, 0, FS_RE).at(-1)!.last;
  assert.ok(sourceLast >= atCapture + 5, `the source wrote on after the capture: ${atCapture} -> ${sourceLast}`);
  const late = path.join(ctx.dir, 'late.raw');
  await copyLater(vm, disk, late, 0);

  const restored = path.join(ctx.dir, 'restored.raw');
  const c = await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored]);
  assert.is(c.code, 0, c.stderr);
  crashImageClean(restored);

  const good = await ctx.restoreVm(image, `file=${restored},format=raw,if=virtio,id=d0`, APPEND, 3, true);
  assert.ok(good.checks.every((k) => k.ok), `restored guest: ${good.checks.map((k) => k.text).join(' | ')}`);
  assert.ok(good.checks.at(-1)!.last > good.checks[0].last, 'the restored guest wrote on');
  await unmount(good.vm);
  const after = e2fsck(['-fn'], restored);
  assert.is(after.code, 0, `e2fsck -fn of the restored disk after the guest unmounted it:\n${after.out}`);

  // The guest makes one step a tick (test/guest/fs.h): it checks long before it
  // could catch up with this disk.
  const bad = await ctx.restoreVm(image, `file=${late},format=raw,if=virtio,id=d0`, APPEND, 1, true);
  assert.ok(bad.checks[0].last < sourceLast, `the restored guest checked before it caught up with the later disk: ${bad.checks[0].text}, disk at ${sourceLast}`);
  assert.not.ok(bad.checks[0].ok, `a disk from ${sourceLast - bad.checks[0].last} steps later must fail the check: ${bad.checks[0].text}\nrestored guest: ${bad.vm.lines().slice(-12).map((l) => l.text).join(' | ')}\nsource: ${diskChecks(vm, 0, FS_RE).map((k) => k.text).join(' | ')}`);
  await unmount(bad.vm).catch(() => bad.vm.kill());
  const lateFsck = e2fsck(['-fn'], late);
  process.stderr.write(`  restored: ${good.checks[0].text}; disk copied at source step ${sourceLast}: ${bad.checks[0].text}, e2fsck -fn after the guest ran on it: exit ${lateFsck.code}\n`);
});

test.run();
