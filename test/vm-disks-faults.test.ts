// A whole-VM capture that dies, loses its reader, or whose receiver runs out of
// disk while disks are still being copied must leave the VM as it found it:
// running, its memory and disk checks intact, no guest RAM left write-protected,
// no block job or node of ours left, its block graph (query-block,
// query-named-block-nodes) and disk chain unchanged, a clear error and a
// non-zero exit. The guest (test/guest/disk.h) writes disk records behind
// 144 MiB of data, so its writes meet copy-before-write while the backup runs.
// Run against QEMU 7.2 (which forgets its write protection when a snapshot
// ends early: capture/qemu-uffd.ts) and, with BGSNAP_DISK_FAULTS=1 (=10: only
// it), QEMU 10.0 (which keeps the VM paused until the snapshot is over, as it
// found it paused by us). QEMU 10 is not in the default run: each takes 0.5-4
// min on the 2-core test machine. Its SIGKILL case once left QEMU's main loop
// stuck for good (a ~21 h rate-limit sleep: HELD_SPEED in capture/qemu-disks.ts).
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { protectedRanges } from '../capture/qemu-uffd';
import { ensureGuest } from './helpers/guest';
import { ensureQemu10, SYSTEM_QEMU, type QemuBinary } from './helpers/qemu10';
import { sleep, startVm, type Vm } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { tmpDir } from './helpers/net';

interface Ctx { vm?: Vm; dir?: string; top?: string; chain?: string; graph?: string; full?: string }

function chain(file: string): string {
  const out = execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
  return JSON.stringify((JSON.parse(out) as Record<string, unknown>[]).map((i) => [i.filename, i.format, i['backing-filename'], i['virtual-size']]));
}

type Node = { 'node-name': string; drv: string; file: string; ro: boolean; backing_file?: string; backing_file_depth: number };
type Block = { device: string; inserted?: Node & { image: { 'virtual-size': number } } };

// What a capture could change in QEMU's block layer: nodes, their drivers, files,
// backing files and read-only state; drives and what is inserted. Not sizes on
// disk, which the guest's own writes change.
async function blockGraph(vm: Vm): Promise<string> {
  const nodes = await vm.qmp.execute<Node[]>('query-named-block-nodes');
  const blocks = await vm.qmp.execute<Block[]>('query-block');
  const n = nodes.map((x) => [x['node-name'], x.drv, x.file, x.ro, x.backing_file ?? null, x.backing_file_depth]);
  const b = blocks.map((x) => [x.device, x.inserted?.['node-name'], x.inserted?.file, x.inserted?.ro, x.inserted?.image['virtual-size']]);
  return JSON.stringify({ nodes: n.sort(), blocks: b });
}

async function leftovers(vm: Vm): Promise<string[]> {
  const jobs = await vm.qmp.execute<{ device: string }[]>('query-block-jobs');
  const nodes = await vm.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  return [...jobs.map((j) => `job ${j.device}`), ...nodes.filter((n) => n['node-name'].startsWith('bgsnap')).map((n) => `node ${n['node-name']}`)];
}

function faultSuite(name: string, qemu: () => Promise<QemuBinary>): void {
  const t = suite(name);
  const ctx: Ctx = {};

  t.before(async () => {
    const [g, q] = await Promise.all([ensureGuest(), qemu()]);
    ctx.dir = tmpDir('diskfault');
    const base = path.join(ctx.dir, 'base.qcow2');
    ctx.top = path.join(ctx.dir, 'top.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '160M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 144M', base]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ctx.top]);
    ctx.chain = chain(ctx.top);
    ctx.vm = await startVm({
      kernel: g.kernel, initrd: g.initrd, memMb: 256, guestMb: 16, append: 'bgsnap.disk=1 bgsnap.disk_at=150', qemu: q,
      extraArgs: ['-drive', `file=${ctx.top},format=qcow2,if=virtio,id=d0`], startTimeoutMs: 60_000,
    });
    await ctx.vm.waitForLine(/^disk=ok/, 180_000);
    ctx.graph = await blockGraph(ctx.vm);
  });

  t.after(async () => {
    await ctx.vm?.kill();
    if (ctx.full) execFileSync('umount', [ctx.full]);
    if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
  });

  async function assertVmFine(from: number): Promise<void> {
    const vm = ctx.vm!;
    let left = await leftovers(vm);
    for (let i = 0; i < 300 && left.length; i++) left = (await sleep(200), await leftovers(vm));
    assert.equal(left, [], 'no block job or node of the capture is left');
    const since = vm.lines().length;
    const ticks = await vm.waitForTicks(3, 60_000, since);
    assert.ok(ticks.every((x) => x.ok), 'the guest runs on with its memory check intact');
    await vm.waitForLine(/^disk=ok/, 60_000, since);
    const failed = vm.lines(from).filter((l) => /disk=FAIL|disk write .* failed/.test(l.text));
    assert.equal(failed.map((l) => l.text), [], 'the guest saw no disk error');
    assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
    assert.equal(protectedRanges(vm.pid), [], 'no guest RAM is left write-protected');
    assert.is(await blockGraph(vm), ctx.graph, 'query-block and query-named-block-nodes as before');
    assert.is(chain(ctx.top!), ctx.chain, 'the disk chain is unchanged');
  }

  // Starts a capture into `reader`, waits until its backup job runs, then does
  // `act` to it; returns stderr and the capture's exit code.
  // `afterResume`: wait until the guest runs again first (then copy-before-write
  // sends its writes through our NBD target), and `delayMs` more.
  // `tmp`: the capture's TMPDIR, where its private socket folders go.
  async function captureThen(act: (pid: number) => void, reader = '(sleep 4; cat > /dev/null)', afterResume = false, delayMs = 0, then?: () => Promise<void>): Promise<{ stderr: string; rc: string; tmp: string }> {
    const rcFile = path.join(ctx.dir!, `rc-${Date.now()}`);
    const tmp = fs.mkdtempSync(path.join(ctx.dir!, 'tmp-'));
    const child = spawn('/bin/sh', ['-c', `(TMPDIR='${tmp}' ${BIN.capture} --qmp '${ctx.vm!.qmpPath}' & echo $! > '${rcFile}.pid'; wait $!; echo $? > '${rcFile}') | ${reader}`]);
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise((r) => child.on('close', r));
    for (let i = 0; i < 600 && !(await leftovers(ctx.vm!)).some((l) => l.startsWith('job')); i++) await sleep(50);
    assert.ok((await leftovers(ctx.vm!)).some((l) => l.startsWith('job')), 'a backup job runs: disks are in flight');
    const running = async () => (await ctx.vm!.qmp.execute<{ status: string }>('query-status')).status === 'running';
    for (let i = 0; afterResume && i < 600 && !(await running()); i++) await sleep(50);
    if (afterResume) assert.ok(await running(), 'the guest runs again while the backup goes on');
    await sleep(delayMs);
    act(Number(fs.readFileSync(`${rcFile}.pid`, 'utf8')));
    await then?.();
    // Bounded: a guard waiting on a stuck QEMU holds our stderr open.
    let timer: NodeJS.Timeout | undefined;
    const bound = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`the capture and its guards did not end within 300 s: ${stderr}`)), 300_000)));
    await Promise.race([exited, bound]).finally(() => clearTimeout(timer));
    return { stderr, rc: fs.existsSync(rcFile) ? fs.readFileSync(rcFile, 'utf8').trim() : '(killed)', tmp };
  }

  t('SIGTERM with disks in flight: capture stops with a clear error, jobs and nodes gone', async () => {
    const from = ctx.vm!.lines().length;
    const r = await captureThen((pid) => process.kill(pid, 'SIGTERM'));
    assert.is.not(r.rc, '0');
    assert.ok(/received SIGTERM/.test(r.stderr), `rc ${r.rc}: ${r.stderr}`);
    await assertVmFine(from);
  });

  // Killed in the pause, and once the guest runs again: copy-before-write then
  // sends the guest's writes through the NBD target that died with the capture
  // (it failed them with EIO before the disk guard's stand-in; checked with
  // writeAfterDeath's write).
  // BGSNAP_DISK_KILL_RUNS=N makes it N kills (a soak: the case that once hung
  // QEMU 10), alternating, the later ones at spread moments of the copy.
  // Once it is dead, a write to drive d0 (QEMU's own qemu-io, through the
  // drive's BlockBackend, so through copy-before-write as a guest write goes)
  // to a cluster the backup has not copied yet (the disk's end: the backup
  // goes from the start and the 4 s reader holds it back) must succeed.
  async function writeAfterDeath(): Promise<void> {
    const live = await ctx.vm!.qmp.execute<{ device: string }[]>('query-block-jobs');
    assert.ok(live.length, 'the backup still runs: the write meets copy-before-write');
    const since = ctx.vm!.lines().length;
    await ctx.vm!.qmp.execute('human-monitor-command', { 'command-line': 'qemu-io d0 "write -P 0x5a 155M 64k"' });
    // qemu-io prints to QEMU's stdout, which the harness reads with the serial,
    // so its answer can land in the middle of a line the guest is printing
    // (CI once: no line began with it within 60 s, the guest ticking on).
    const answer = /(wrote \d+\/\d+ bytes|write failed)/;
    const said = await ctx.vm!.waitForLine(answer, 60_000, since);
    assert.is(answer.exec(said.text)![1], 'wrote 65536/65536 bytes', `a write to d0 after the capture died: ${said.text}`);
  }

  t('SIGKILL with disks in flight: the guards drain QEMU and take our jobs and nodes away', async () => {
    const runs = Math.max(2, Number(process.env.BGSNAP_DISK_KILL_RUNS || 2));
    for (let i = 1; i <= runs; i++) {
      const from = ctx.vm!.lines().length;
      const resumed = i % 2 === 0;
      const r = await captureThen((pid) => process.kill(pid, 'SIGKILL'), undefined, resumed, (Math.floor((i - 1) / 2) % 3) * 300, resumed ? writeAfterDeath : undefined);
      assert.ok(/died with disks in flight/.test(r.stderr), `run ${i}: rc ${r.rc}: ${r.stderr}`);
      await assertVmFine(from);
      // The guards outlived the capture (our pipe's stderr closed only when they did).
      assert.equal(fs.readdirSync(r.tmp), [], `run ${i}: the guards removed the dead capture's private socket folders`);
      if (runs > 2) console.log(`  ${name}: SIGKILL run ${i}/${runs} ok`);
    }
  });

  t('the receiver goes away with disks in flight: capture exits non-zero naming it', async () => {
    const from = ctx.vm!.lines().length;
    const r = await captureThen(() => undefined, 'head -c 3000000 > /dev/null');
    assert.is.not(r.rc, '0');
    assert.ok(/bgsnap-capture: .*EPIPE/.test(r.stderr), `rc ${r.rc}: ${r.stderr}`);
    await assertVmFine(from);
  });

  // The receiver writes into a 64 MiB tmpfs: RAM's data and the first disk
  // pages fill it while the backup still runs.
  t('a full disk on the receiving side: ENOSPC named with the file, image incomplete, VM unharmed', async () => {
    if (process.getuid?.() !== 0) return console.log('  (not run: mounting the small tmpfs needs root)');
    const from = ctx.vm!.lines().length;
    ctx.full = path.join(ctx.dir!, 'full');
    fs.mkdirSync(ctx.full);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m,mode=0700', 'bgsnap-full', ctx.full]);
    const image = path.join(ctx.full, 'vm.img');
    const r = await captureThen(() => undefined, `${BIN.receive} -o '${image}'`);
    assert.is.not(r.rc, '0', 'the capture does not claim success');
    assert.match(r.stderr, /bgsnap-receive: .*ENOSPC/, r.stderr);
    assert.ok(r.stderr.includes(image), `the error names the image: ${r.stderr}`);
    // LevelDB needs room even to open the index: give the filesystem some, as
    // a user would, before reading what the image says of itself.
    execFileSync('mount', ['-o', 'remount,size=256m', ctx.full]);
    const info = await run(BIN.inspect, [image, '--json']);
    assert.is(info.code, 0, info.stderr);
    assert.is((JSON.parse(info.stdout) as { status: string }).status, 'incomplete', 'the partial image is marked incomplete');
    await assertVmFine(from);
  });

  t('after the faults, a whole-VM capture completes', async () => {
    const image = path.join(ctx.dir!, 'img');
    const r = await sh(`${BIN.capture} --qmp '${ctx.vm!.qmpPath}' | ${BIN.receive} -q -o '${image}'`, 240_000);
    assert.is(r.code, 0, r.stderr);
    assert.is(await blockGraph(ctx.vm!), ctx.graph);
  });

  t.run();
}

// BGSNAP_DISK_FAULTS=10: QEMU 10.0 only.
if (process.env.BGSNAP_DISK_FAULTS !== '10') faultSuite('QEMU 7.2', async () => SYSTEM_QEMU);
if (process.env.BGSNAP_DISK_FAULTS === '1' || process.env.BGSNAP_DISK_FAULTS === '10') faultSuite('QEMU 10.0', ensureQemu10);
