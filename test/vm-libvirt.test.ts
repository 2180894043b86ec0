// `bgsnap-capture --domain` against a real libvirtd (Debian's, started by this
// test in its own namespace: helpers/libvirt.ts) managing a TCG domain with a
// virtio disk. The guest (test/guest/disk.h) writes records to its disk with
// O_DIRECT and checks every tick that disk and RAM agree. Captured through
// libvirt with its disk, restored in a plain QEMU from the image's vmstate plus
// the converted disk, the check must pass; and libvirt's domain must be as
// before: running, same XML and disk list, no block job, node or fd of ours.
// Killed with SIGKILL while its disk is copied, the guest sees no I/O error.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { domainXml, logLines, restoreArgs, startLibvirtd, type Libvirtd } from './helpers/libvirt';
import { sleep, startVm, type Vm } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';
import { DISK_RE, laterDiskCaught, parseDiskCheck } from './helpers/disk-vm';
import { tmpDir } from './helpers/net';

const ctx: { guest?: Guest; dir?: string; lv?: Libvirtd; vms: Vm[] } = { vms: [] };
const APPEND = 'bgsnap.disk=1';

const diskChecks = (lines: string[]) => lines.filter((l) => DISK_RE.test(l));

async function waitFor<T>(what: string, ms: number, probe: () => T | undefined): Promise<T> {
  for (const until = Date.now() + ms; Date.now() < until; await sleep(200)) {
    const v = probe();
    if (v !== undefined) return v;
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}`);
}

// What libvirt says about the domain, which a capture must leave as it was.
function libvirtView(lv: Libvirtd, name: string): { state: string; blk: string; xml: string } {
  return { state: lv.virsh(['domstate', name]).trim(), blk: lv.virsh(['domblklist', name, '--details']), xml: lv.virsh(['dumpxml', name]) };
}

function qmp<T>(lv: Libvirtd, name: string, cmd: string): T {
  return (JSON.parse(lv.virsh(['qemu-monitor-command', name, JSON.stringify({ execute: cmd })])) as { return: T }).return;
}

function socketFds(pid: number): number {
  const fdDir = `/proc/${pid}/fd`;
  return fs.readdirSync(fdDir).filter((f) => /^socket:/.test(fs.readlinkSync(path.join(fdDir, f)))).length;
}

// A plain QEMU with the domain's devices, from the image's vmstate and `disk`;
// returns the restored guest's first disk checks.
async function restore(image: string, disk: string): Promise<string[]> {
  const { kernel, initrd } = ctx.guest!;
  const incoming = `exec:${BIN.convert} '${image}' --to qemu -o -`;
  const vm = await startVm({
    kernel, initrd, memMb: 256, guestMb: 16, append: APPEND, incoming, extraArgs: restoreArgs(disk), startTimeoutMs: 60_000,
  });
  ctx.vms.push(vm);
  // The snapshot's run state is "paused" (bgsnap stopped the VM for the instant).
  for (let i = 0; i < 600; i++) {
    const { status } = await vm.qmp.execute<{ status: string }>('query-status');
    if (status === 'paused') await vm.qmp.execute('cont');
    if (status === 'running' || status === 'paused') break;
    await sleep(200);
  }
  await vm.waitForLine(DISK_RE, 180_000);
  const checks = await waitFor('two disk checks in the restored VM', 60_000, () => {
    const c = diskChecks(vm.lines().map((l) => l.text));
    return c.length >= 2 ? c : undefined;
  });
  await vm.kill();
  return checks;
}

test.before(async () => {
  ctx.guest = await ensureGuest();
  ctx.dir = tmpDir('libvirt');
  ctx.lv = await startLibvirtd();
});

test.after(async () => {
  for (const vm of ctx.vms) await vm.kill();
  await ctx.lv?.stop();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

// Defines and starts a domain of the test guest with a 64 MiB raw disk, and
// waits until its guest checks disk and RAM.
// `chained`: a qcow2 disk on a backing file holding 144 MiB of data, the
// guest's records behind it at 150 MiB, so its writes meet copy-before-write
// while the backup still runs (as in vm-disks-faults).
async function bootDomain(name: string, chained = false): Promise<{ disk: string; serial: string }> {
  const disk = path.join(ctx.dir!, chained ? `${name}.qcow2` : `${name}.raw`);
  const serial = path.join(ctx.dir!, `${name}.log`);
  if (chained) {
    const base = path.join(ctx.dir!, `${name}-base.qcow2`);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '160M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 144M', base]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', disk]);
  } else {
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '64M']);
  }
  const xml = path.join(ctx.dir!, `${name}.xml`);
  const { kernel, initrd } = ctx.guest!;
  const cmdline = `console=ttyS0 quiet panic=-1 bgsnap.mb=16 bgsnap.tick_ms=300 ${APPEND}${chained ? ' bgsnap.disk_at=150' : ''}`;
  const format = chained ? 'qcow2' as const : 'raw' as const;
  fs.writeFileSync(xml, domainXml({ name, kernel, initrd, cmdline, memMb: 256, disk, format, serialLog: serial }));
  ctx.lv!.virsh(['define', xml]);
  ctx.lv!.virsh(['start', name]);
  await waitFor('two disk checks from the domain', 180_000, () => (diskChecks(logLines(serial)).length >= 2 ? true : undefined));
  return { disk, serial };
}

test('--domain with its disk: RAM and disk agree after restore; libvirt\'s domain is as before', async () => {
  const lv = ctx.lv!;
  const name = 'bgsnap-test';
  const { disk, serial } = await bootDomain(name);
  const before = libvirtView(lv, name);
  assert.is(before.state, 'running');
  const fdsBefore = socketFds(lv.qemuPid(name));

  const image = path.join(ctx.dir!, 'vm.img');
  const stats = path.join(ctx.dir!, 'cap.json');
  // No --disks: with --domain as with --qmp, every writable drive is in by default.
  const r = await sh(`${BIN.capture} --domain ${name} --connect '${lv.uri}' --stats '${stats}' | ${BIN.receive} -o '${image}'`, 240_000);
  assert.is(r.code, 0, r.stderr);
  const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
  assert.is(s.runStateAfter, 'running');
  assert.equal(s.disks.map((d: { id: string; size: number }) => [d.id, d.size]), [['vda', 64 << 20]]);
  if (process.env.BGSNAP_TEST_VERBOSE) console.log(JSON.stringify({ pauseMs: s.pauseMs, downtimeMs: s.downtimeMs, diskCopyMs: s.diskCopyMs, totalTimeMs: s.totalTimeMs, seconds: s.seconds }));

  // libvirt's view and QEMU's block layer as before; the guest writes on.
  const seen = diskChecks(logLines(serial)).length;
  await waitFor('a disk check after the capture', 60_000, () => (diskChecks(logLines(serial)).length > seen ? true : undefined));
  assert.equal(libvirtView(lv, name), before);
  assert.equal(qmp<unknown[]>(lv, name, 'query-block-jobs'), []);
  const nodes = qmp<{ 'node-name': string }[]>(lv, name, 'query-named-block-nodes').map((n) => n['node-name']);
  assert.equal(nodes.filter((n) => n.startsWith('bgsnap')), []);
  assert.is(socketFds(lv.qemuPid(name)), fdsBefore, 'no socket handed to QEMU is left open');
  const caps = qmp<{ capability: string; state: boolean }[]>(lv, name, 'query-migrate-capabilities');
  assert.is(caps.find((c) => c.capability === 'background-snapshot')?.state, false);
  lv.virsh(['destroy', name]);

  const restored = path.join(ctx.dir!, 'restored.raw');
  const c = await run(BIN.convert, [image, '--to', 'disk', '--drive', 'vda', '-o', restored]);
  assert.is(c.code, 0, c.stderr);
  const good = await restore(image, restored);
  assert.ok(good.every((l) => l.startsWith('disk=ok')), `restored guest: ${good.join(' | ')}`);
  // The oracle: the same RAM on the disk as the domain left it, seconds later, fails.
  const bad = await restore(image, disk);
  assert.ok(laterDiskCaught(bad.map((l) => parseDiskCheck(l)!)), `a later disk must fail the check: ${bad.join(' | ')}`);
});

function chainOf(file: string): string {
  const out = execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
  return JSON.stringify((JSON.parse(out) as Record<string, unknown>[]).map((i) => [i.filename, i.format, i['backing-filename'], i['virtual-size']]));
}

// QEMU's block graph as a capture could change it (nodes, drivers, files,
// backing files, read-only state), not the sizes the guest's writes change.
function blockGraph(lv: Libvirtd, name: string): string {
  type Node = { 'node-name': string; drv: string; file: string; ro: boolean; backing_file?: string; backing_file_depth: number };
  const nodes = qmp<Node[]>(lv, name, 'query-named-block-nodes');
  return JSON.stringify(nodes.map((x) => [x['node-name'], x.drv, x.file, x.ro, x.backing_file ?? null, x.backing_file_depth]).sort());
}

function execVirsh(lv: Libvirtd, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => execFile('virsh', ['-c', lv.uri, ...args], { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' } },
    (err, stdout, stderr) => (err ? reject(new Error(`virsh ${args.join(' ')}: ${stderr || err.message}`)) : resolve(stdout))));
}

function ourNodes(lv: Libvirtd, name: string): string[] {
  return qmp<{ 'node-name': string }[]>(lv, name, 'query-named-block-nodes').map((n) => n['node-name']).filter((n) => n.startsWith('bgsnap'));
}

function ourJobs(lv: Libvirtd, name: string): { device: string; offset: number; len: number }[] {
  return qmp<{ device: string; offset: number; len: number }[]>(lv, name, 'query-block-jobs').filter((j) => j.device.startsWith('bgsnap'));
}

// What a capture's fault must leave as it found it: libvirt's view, QEMU's
// block graph and sockets, and the disk chain.
type DomainState = { view: ReturnType<typeof libvirtView>; graph: string; chain: string; fds: number };
function domainState(lv: Libvirtd, name: string, disk: string): DomainState {
  return { view: libvirtView(lv, name), graph: blockGraph(lv, name), chain: chainOf(disk), fds: socketFds(lv.qemuPid(name)) };
}
function assertAsBefore(lv: Libvirtd, name: string, disk: string, before: DomainState, what: string): void {
  assert.is(blockGraph(lv, name), before.graph, `${what}: query-named-block-nodes as before`);
  assert.is(chainOf(disk), before.chain, `${what}: the disk chain is unchanged`);
  assert.equal(libvirtView(lv, name), before.view, what);
  assert.is(socketFds(lv.qemuPid(name)), before.fds, `${what}: no socket handed to QEMU is left open`);
}

// The guest's own disk checks go on after a fault, and none saw an error.
async function guestCheckingOn(serial: string): Promise<void> {
  const seen = diskChecks(logLines(serial)).length;
  await waitFor('the guest checking on', 60_000, () => (diskChecks(logLines(serial)).length > seen + 1 ? true : undefined));
}
function assertGuestSawNoError(serial: string): void {
  const failed = logLines(serial).filter((l) => /disk=FAIL|disk write .* failed|I\/O error/.test(l));
  assert.equal(failed, [], 'the guest saw no disk or memory error');
}

// Killed with SIGKILL once the guest runs again while its disk is still being
// copied (the reader reads nothing until then, so the backup stalls): copy-before-write
// then holds guest writes on the NBD connection QEMU got as a passed fd, which
// the disk guard serves (capture/nbd-relay.ts) and answers for the dead
// capture. The guest must see no I/O error; the migration guard drains the
// stream and puts the setting back, the disk guard takes our job and node
// away, all through libvirt; domain, block graph and disk chain as before.
test('--domain capture killed with SIGKILL, disks in flight: no guest I/O error, the domain runs on, libvirt\'s view, QEMU and the disk chain as before', async () => {
  const lv = ctx.lv!;
  const name = 'bgsnap-kill';
  const { disk, serial } = await bootDomain(name, true);
  const before = domainState(lv, name, disk);
  const pidFile = path.join(ctx.dir!, 'kill.pid');
  const go = path.join(ctx.dir!, 'kill.go');
  // The reader reads nothing until the capture is dead, so the backup stalls.
  const reader = `(while [ ! -e '${go}' ]; do sleep 0.2; done; cat > /dev/null)`;
  const tmp = fs.mkdtempSync(path.join(ctx.dir!, 'tmp-')); // the capture's TMPDIR: its socket folders go there
  const r = sh(`(TMPDIR='${tmp}' ${BIN.capture} --domain ${name} --connect '${lv.uri}' & echo $! > '${pidFile}'; wait) | ${reader}`, 240_000);
  let killed = false;
  let write: Promise<unknown> = Promise.resolve();
  try {
    await waitFor('our backup job', 60_000, () => (ourJobs(lv, name).length ? true : undefined));
    await waitFor('the guest running again', 60_000, () => (qmp<{ status: string }>(lv, name, 'query-status').status === 'running' ? true : undefined));
    // Stalled: the capture's buffers are full and it answers no more backup
    // writes (its offset stays put while nothing holds the job back).
    let last = -1;
    let same = 0;
    const job = await waitFor('the backup stalled behind the reader', 120_000, () => {
      const [j] = ourJobs(lv, name);
      same = j && j.offset === last ? same + 1 : 0;
      last = j ? j.offset : -1;
      return same >= 5 ? j : undefined;
    });
    assert.ok(job.offset < job.len, `the backup still copies when the capture dies: ${JSON.stringify(job)}`);
    // The guest's own writes wait for its RAM here (the stalled stream holds
    // the background snapshot too), so a write of QEMU's own qemu-io on vda,
    // through copy-before-write as a guest write goes, to a cluster the stalled
    // backup has not copied (the disk's end), is what is held when the capture
    // dies. (No virsh call meanwhile: libvirt holds the domain's job for it.)
    let wrote: string | null = null;
    write = execVirsh(lv, ['qemu-monitor-command', name, '--hmp', 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x5a 155M 64k"']).then((o) => (wrote = o));
    await sleep(1000);
    assert.is(wrote, null, 'the write waits for the backup');
    process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL');
    killed = true;
  } finally {
    // A failed premise must not leave the capture waiting on its reader for good.
    if (!killed && fs.existsSync(pidFile)) process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGTERM');
    fs.writeFileSync(go, '');
  }
  const out = await r;
  let timer: NodeJS.Timeout | undefined;
  const bound = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`qemu-io's write did not end within 120 s of the kill: ${out.stderr}`)), 120_000)));
  await Promise.race([write, bound]).finally(() => clearTimeout(timer));
  const log = path.join(lv.dir, 'log', 'qemu', `${name}.log`);
  const said = await waitFor('qemu-io\'s answer in QEMU\'s log', 60_000, () => logLines(log).find((l) => /^(wrote \d+\/\d+ bytes|write failed)/.test(l)));
  assert.is(said.replace(/ at offset.*/, ''), 'wrote 65536/65536 bytes', 'a write held by copy-before-write when the capture died');
  assert.match(out.stderr, /died mid-snapshot: draining/);
  assert.match(out.stderr, /died with disks in flight/);
  await waitFor('the setting put back', 120_000, () => {
    const caps = qmp<{ capability: string; state: boolean }[]>(lv, name, 'query-migrate-capabilities');
    return caps.find((c) => c.capability === 'background-snapshot')?.state === false ? true : undefined;
  }).catch((e: Error) => assert.unreachable(`${e.message}; capture and guards said: ${out.stderr}`));
  assert.is(qmp<{ status: string }>(lv, name, 'query-migrate').status, 'completed');
  await waitFor('our job and node gone', 60_000, () => (!ourJobs(lv, name).length && !ourNodes(lv, name).length ? true : undefined))
    .catch((e: Error) => assert.unreachable(`${e.message}; capture and guards said: ${out.stderr}`));
  assert.equal(qmp<unknown[]>(lv, name, 'query-block-jobs'), []);
  await waitFor('the dead capture\'s private socket folders removed by its guards', 60_000, () => (fs.readdirSync(tmp).length ? undefined : true))
    .catch((e: Error) => assert.unreachable(`${e.message}: ${fs.readdirSync(tmp).map((d) => `${d}: ${fs.readdirSync(path.join(tmp, d)).join(' ')}`).join('; ')}`));
  assertAsBefore(lv, name, disk, before, 'SIGKILL');
  await guestCheckingOn(serial);
  assertGuestSawNoError(serial);
  lv.virsh(['destroy', name]);
});

// The capture's own ways out with disks in flight, through the relay: a
// SIGTERM, and a reader that goes away (EPIPE). Each fails naming why, and
// leaves the domain, its block graph and disk chain as they were.
test('--domain, SIGTERM or the reader gone with disks in flight: a clear error, the domain as before', async () => {
  const lv = ctx.lv!;
  const name = 'bgsnap-faults';
  const { disk, serial } = await bootDomain(name, true);
  const before = domainState(lv, name, disk);
  const cases: [string, string, (pid: number) => void, RegExp][] = [
    ['SIGTERM', '(sleep 4; cat > /dev/null)', (pid) => process.kill(pid, 'SIGTERM'), /received SIGTERM/],
    ['the reader gone', 'head -c 3000000 > /dev/null', () => undefined, /bgsnap-capture: .*EPIPE/],
  ];
  for (const [what, reader, act, said] of cases) {
    const f = path.join(ctx.dir!, `fault-${what.replace(/\W/g, '')}`);
    const r = sh(`(${BIN.capture} --domain ${name} --connect '${lv.uri}' & echo $! > '${f}.pid'; wait $!; echo $? > '${f}.rc') | ${reader}`, 240_000);
    await waitFor('our backup job', 60_000, () => (ourJobs(lv, name).length || fs.existsSync(`${f}.rc`) ? true : undefined));
    act(Number(fs.readFileSync(`${f}.pid`, 'utf8')));
    const out = await r;
    const rc = fs.readFileSync(`${f}.rc`, 'utf8').trim();
    assert.is.not(rc, '0', `${what}: the capture does not claim success`);
    assert.match(out.stderr, said, `${what}: ${out.stderr}`);
    await waitFor('our job and node gone', 60_000, () => (!ourJobs(lv, name).length && !ourNodes(lv, name).length ? true : undefined));
    assertAsBefore(lv, name, disk, before, what);
    await guestCheckingOn(serial);
  }
  assertGuestSawNoError(serial);
  lv.virsh(['destroy', name]);
});

test('--domain refuses an unknown or shut-off domain, before touching anything', async () => {
  const lv = ctx.lv!;
  const unknown = await run(BIN.capture, ['--domain', 'no-such-domain', '--connect', lv.uri, '-o', path.join(ctx.dir!, 'x.bgsnap')]);
  assert.is(unknown.code, 1);
  assert.match(unknown.stderr, /no libvirt domain "no-such-domain"/);
  assert.not.ok(fs.existsSync(path.join(ctx.dir!, 'x.bgsnap')) && fs.statSync(path.join(ctx.dir!, 'x.bgsnap')).size > 0, 'nothing written');

  const xml = path.join(ctx.dir!, 'off.xml');
  const disk = path.join(ctx.dir!, 'off.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '1M']);
  const { kernel, initrd } = ctx.guest!;
  fs.writeFileSync(xml, domainXml({ name: 'bgsnap-off', kernel, initrd, cmdline: '', memMb: 64, disk, serialLog: path.join(ctx.dir!, 'off.log') }));
  lv.virsh(['define', xml]);
  const off = await run(BIN.capture, ['--domain', 'bgsnap-off', '--connect', lv.uri, '-o', '/dev/null']);
  assert.is(off.code, 1);
  assert.match(off.stderr, /libvirt domain "bgsnap-off".* is shut off; only a running or paused domain/);

  const both = await run(BIN.capture, ['--domain', 'bgsnap-off', '--qmp', '/nonexistent', '-o', '/dev/null']);
  assert.is(both.code, 1);
  assert.match(both.stderr, /give one of --qmp, --domain and --pid/);
});

test.run();
