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
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { sleep, startVm, type Vm, type VmOptions } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';

const ctx: { guest?: Guest; dir?: string; vms: Vm[] } = { vms: [] };
const DISK_RE = /^disk=(ok|FAIL) last=(\d+) ondisk=(\d+)/;

interface DiskCheck { ok: boolean; last: number; onDisk: number; text: string }

function diskChecks(vm: Vm, since = 0): DiskCheck[] {
  return vm.lines(since).flatMap((l) => {
    const m = DISK_RE.exec(l.text);
    return m ? [{ ok: m[1] === 'ok', last: Number(m[2]), onDisk: Number(m[3]), text: l.text }] : [];
  });
}

async function bootWithDisk(drive: string, extra: Partial<VmOptions> = {}): Promise<Vm> {
  const vm = await startVm({
    kernel: ctx.guest!.kernel, initrd: ctx.guest!.initrd, memMb: 256, guestMb: 16, append: 'bgsnap.disk=1',
    extraArgs: ['-drive', drive], startTimeoutMs: 60_000, ...extra,
  });
  ctx.vms.push(vm);
  return vm;
}

async function waitDiskChecks(vm: Vm, n: number, since = 0): Promise<DiskCheck[]> {
  await vm.waitForLine(/^disk=/, 180_000, since);
  for (let i = 0; i < 600 && diskChecks(vm, since).length < n; i++) await sleep(200);
  const c = diskChecks(vm, since);
  assert.ok(c.length >= n, `only ${c.length} disk checks`);
  return c;
}

function chain(file: string): unknown {
  const out = execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
  // Sizes on disk change as the guest writes; the chain itself must not.
  return (JSON.parse(out) as Record<string, unknown>[]).map((i) => ({ f: i.filename, fmt: i.format, b: i['backing-filename'], v: i['virtual-size'] }));
}

async function ourLeftovers(vm: Vm): Promise<string[]> {
  const jobs = await vm.qmp.execute<{ device: string }[]>('query-block-jobs');
  const nodes = await vm.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  return [...jobs.map((j) => `job ${j.device}`), ...nodes.filter((n) => n['node-name'].startsWith('bgsnap')).map((n) => `node ${n['node-name']}`)];
}

// Restores vmstate + disk in a fresh QEMU and returns its first disk checks.
async function restore(image: string, disk: string, append = 'bgsnap.disk=1'): Promise<DiskCheck[]> {
  const incoming = `exec:${BIN.convert} '${image}' --to qemu -o -`;
  const vm = await bootWithDisk(`file=${disk},format=raw,if=virtio,id=d0`, { incoming, append });
  // The snapshot's run state is "paused" (bgsnap stopped the VM for the instant),
  // so the restored VM waits for `cont`.
  for (let i = 0; i < 600; i++) {
    const { status } = await vm.qmp.execute<{ status: string }>('query-status');
    if (status === 'paused') await vm.qmp.execute('cont');
    if (status === 'running' || status === 'paused') break;
    await sleep(200);
  }
  const checks = await waitDiskChecks(vm, 2);
  await vm.kill();
  return checks;
}

async function captureWhileWriting(vm: Vm, tag: string): Promise<{ image: string; stats: Record<string, unknown> }> {
  await waitDiskChecks(vm, 2);
  const image = path.join(ctx.dir!, `${tag}.img`);
  const stats = path.join(ctx.dir!, `${tag}.json`);
  const from = vm.lines().length;
  const r = await sh(`${BIN.capture} --qmp '${vm.qmpPath}' --disks --stats '${stats}' | ${BIN.receive} -o '${image}'`, 240_000);
  assert.is(r.code, 0, r.stderr);
  const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
  assert.is(s.runStateAfter, 'running');
  await waitDiskChecks(vm, 1, from); // the guest wrote on during and after the capture
  assert.equal(await ourLeftovers(vm), []);
  return { image, stats: s };
}

test.before(async () => {
  ctx.guest = await ensureGuest();
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-disks-'));
});

test.after(async () => {
  for (const vm of ctx.vms) await vm.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

// 144 MiB of data ahead of the guest's records make the backup outlast the
// pause, so the guest writes its records while they are still being copied:
// copy-before-write must keep the copy at the instant.
test('raw disk: RAM and disk agree after restore; a disk copied seconds later fails the same check', async () => {
  const disk = path.join(ctx.dir!, 'd0.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '160M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 144M', disk]);
  const vm = await bootWithDisk(`file=${disk},format=raw,if=virtio,id=d0`, { append: 'bgsnap.disk=1 bgsnap.disk_at=150' });
  const { image, stats } = await captureWhileWriting(vm, 'raw');
  assert.ok(typeof stats.pauseMs === 'number' && typeof stats.downtimeMs === 'number', JSON.stringify(stats));
  assert.ok((stats.diskCopyMs as number) > (stats.pauseMs as number), `the disk copy outlasted the pause: ${JSON.stringify(stats)}`);
  // The disk a few seconds on: stop the source, copy its disk.
  await sleep(3000);
  await vm.qmp.execute('stop');
  const late = path.join(ctx.dir!, 'late.raw');
  fs.copyFileSync(disk, late);
  await vm.kill();

  const insp = JSON.parse((await run(BIN.inspect, [image, '--json'])).stdout);
  assert.equal(insp.drives.map((d: { id: string; size: number }) => [d.id, d.size]), [['d0', 160 << 20]]);
  const restored = path.join(ctx.dir!, 'restored.raw');
  const c = await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored]);
  assert.is(c.code, 0, c.stderr);
  assert.is(fs.statSync(restored).size, 160 << 20);
  assert.is(fs.statSync(restored).mode & 0o777, 0o600);

  const good = await restore(image, restored, 'bgsnap.disk=1 bgsnap.disk_at=150');
  assert.ok(good.every((k) => k.ok), `restored guest: ${good.map((k) => k.text).join(' | ')}`);
  const bad = await restore(image, late, 'bgsnap.disk=1 bgsnap.disk_at=150');
  assert.ok(!bad[0].ok && bad[0].onDisk > bad[0].last, `later disk must fail the check: ${bad[0].text}`);
});

test('qcow2 disk with a backing file: restore agrees, chain unchanged', async () => {
  const base = path.join(ctx.dir!, 'base.qcow2');
  const top = path.join(ctx.dir!, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
  execFileSync('qemu-io', ['-c', 'write -P 0x5a 8M 4M', base]); // data only the backing file holds
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  const vm = await bootWithDisk(`file=${top},format=qcow2,if=virtio,id=d0`);
  const before = chain(top);
  const { image } = await captureWhileWriting(vm, 'qcow2');
  assert.equal(chain(top), before);
  await vm.kill();
  const restored = path.join(ctx.dir!, 'restored2.raw');
  assert.is((await run(BIN.convert, [image, '--to', 'disk', '--drive', 'd0', '-o', restored])).code, 0);
  const fd = fs.openSync(restored, 'r');
  const b = Buffer.alloc(4096);
  fs.readSync(fd, b, 0, 4096, 9 << 20);
  fs.closeSync(fd);
  assert.ok(b.every((x) => x === 0x5a), 'the backing file\'s data is in the snapshot');
  const good = await restore(image, restored);
  assert.ok(good.every((k) => k.ok), `restored guest: ${good.map((k) => k.text).join(' | ')}`);
});

test.run();
