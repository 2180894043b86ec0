// A whole-VM capture that dies or loses its reader while disks are still being
// copied must leave the VM as it found it: running, its memory and disk checks
// intact, no block job or node of ours left, its disk chain unchanged, and a
// clear error. The guest (test/guest/disk.h) writes disk records behind 144 MiB
// of data, so its writes meet copy-before-write while the backup is under way.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest } from './helpers/guest';
import { sleep, startVm, type Vm } from './helpers/vm';
import { BIN, sh } from './helpers/cli';

const ctx: { vm?: Vm; dir?: string; base?: string; top?: string; chain?: string } = {};

function chain(file: string): string {
  const out = execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
  return JSON.stringify((JSON.parse(out) as Record<string, unknown>[]).map((i) => [i.filename, i.format, i['backing-filename'], i['virtual-size']]));
}

test.before(async () => {
  const g = await ensureGuest();
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-diskfault-'));
  ctx.base = path.join(ctx.dir, 'base.qcow2');
  ctx.top = path.join(ctx.dir, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ctx.base, '160M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 144M', ctx.base]);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', ctx.base, '-F', 'qcow2', ctx.top]);
  ctx.chain = chain(ctx.top);
  ctx.vm = await startVm({
    kernel: g.kernel, initrd: g.initrd, memMb: 256, guestMb: 16, append: 'bgsnap.disk=1 bgsnap.disk_at=150',
    extraArgs: ['-drive', `file=${ctx.top},format=qcow2,if=virtio,id=d0`], startTimeoutMs: 60_000,
  });
  await ctx.vm.waitForLine(/^disk=ok/, 180_000);
});

test.after(async () => {
  await ctx.vm?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

async function leftovers(vm: Vm): Promise<string[]> {
  const jobs = await vm.qmp.execute<{ device: string }[]>('query-block-jobs');
  const nodes = await vm.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  return [...jobs.map((j) => `job ${j.device}`), ...nodes.filter((n) => n['node-name'].startsWith('bgsnap')).map((n) => `node ${n['node-name']}`)];
}

async function assertVmFine(vm: Vm, from: number): Promise<void> {
  let left = await leftovers(vm);
  for (let i = 0; i < 300 && left.length; i++) left = (await sleep(200), await leftovers(vm));
  assert.equal(left, [], 'no block job or node of the capture is left');
  const since = vm.lines().length;
  const ticks = await vm.waitForTicks(3, 60_000, since);
  assert.ok(ticks.every((t) => t.ok), 'the guest runs on with its memory check intact');
  await vm.waitForLine(/^disk=ok/, 60_000, since);
  const failed = vm.lines(from).filter((l) => /disk=FAIL|disk write .* failed/.test(l.text));
  assert.equal(failed.map((l) => l.text), [], 'the guest saw no disk error');
  assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  assert.is(chain(ctx.top!), ctx.chain, 'the disk chain is unchanged');
}

// Starts a capture whose reader is slow (sleeps `readerSleep` s first), waits
// until its backup job runs, then does `act` to it; returns stderr and exit code.
async function captureThen(act: (pid: number) => void, reader = '(sleep 4; cat > /dev/null)'): Promise<{ stderr: string; rc: string }> {
  const rcFile = path.join(ctx.dir!, `rc-${Date.now()}`);
  const child = spawn('/bin/sh', ['-c', `(${BIN.capture} --qmp '${ctx.vm!.qmpPath}' --disks & echo $! > '${rcFile}.pid'; wait $!; echo $? > '${rcFile}') | ${reader}`]);
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise((r) => child.on('close', r));
  for (let i = 0; i < 600 && !(await leftovers(ctx.vm!)).some((l) => l.startsWith('job')); i++) await sleep(50);
  assert.ok((await leftovers(ctx.vm!)).some((l) => l.startsWith('job')), 'a backup job runs: disks are in flight');
  act(Number(fs.readFileSync(`${rcFile}.pid`, 'utf8')));
  await exited;
  return { stderr, rc: fs.existsSync(rcFile) ? fs.readFileSync(rcFile, 'utf8').trim() : '(killed)' };
}

// Open bug (issue 9), so these run only with BGSNAP_DISK_FAULTS=1. On QEMU 7.2
// a background snapshot that ends any way but complete leaves guest RAM
// write-protected for good (ram_write_tracking_stop() is called only on
// completion; fixed in QEMU 8.1 by commit 3a8b81f2e6, "migration: stop
// tracking ram writes when cancelling background migration"). Seen here (branch
// diskfault, 1 run of 4 before its fixes, 0 of 3 after): QEMU's main thread in
// handle_userfault from virtio_blk_handle_vq, no migration thread left, QMP
// unanswered, the capture still alive and waiting on QMP. Two ways bgsnap cut
// the stream itself are closed (capture/qemu-source.ts: a guard on the
// listening socket, and no "done" to the guard unless QEMU said it stopped);
// what ended that snapshot early is not known yet.
const faultTest = process.env.BGSNAP_DISK_FAULTS === '1' ? test : test.skip;

faultTest('SIGTERM with disks in flight: capture stops with a clear error, jobs and nodes gone', async () => {
  const from = ctx.vm!.lines().length;
  const r = await captureThen((pid) => process.kill(pid, 'SIGTERM'));
  assert.is.not(r.rc, '0');
  assert.ok(/received SIGTERM/.test(r.stderr), `rc ${r.rc}: ${r.stderr}`);
  await assertVmFine(ctx.vm!, from);
});

faultTest('SIGKILL with disks in flight: the guard drains QEMU and takes our jobs and nodes away', async () => {
  const from = ctx.vm!.lines().length;
  const r = await captureThen((pid) => process.kill(pid, 'SIGKILL'));
  assert.ok(/died with disks in flight/.test(r.stderr), `rc ${r.rc}: ${r.stderr}`);
  await assertVmFine(ctx.vm!, from);
});

faultTest('the receiver goes away with disks in flight: capture exits non-zero naming it', async () => {
  const from = ctx.vm!.lines().length;
  const r = await captureThen(() => undefined, 'head -c 3000000 > /dev/null');
  assert.is.not(r.rc, '0');
  assert.ok(/bgsnap-capture: .*EPIPE/.test(r.stderr), `rc ${r.rc}: ${r.stderr}`);
  await assertVmFine(ctx.vm!, from);
});

faultTest('after the faults, a whole-VM capture completes', async () => {
  const image = path.join(ctx.dir!, 'img');
  const r = await sh(`${BIN.capture} --qmp '${ctx.vm!.qmpPath}' --disks | ${BIN.receive} -q -o '${image}'`, 240_000);
  assert.is(r.code, 0, r.stderr);
});

test.run();
