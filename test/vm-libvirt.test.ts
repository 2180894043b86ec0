// `bgsnap-capture --domain` against a real libvirtd (Debian's, started by this
// test in its own namespace: helpers/libvirt.ts) managing a TCG domain with a
// virtio disk. The guest (test/guest/disk.h) writes records to its disk with
// O_DIRECT and checks every tick that disk and RAM agree. Captured through
// libvirt with its disk, restored in a plain QEMU from the image's vmstate plus
// the converted disk, the check must pass; and libvirt's domain must be as
// before: running, same XML and disk list, no block job, node or fd of ours.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { domainXml, logLines, restoreArgs, startLibvirtd, type Libvirtd } from './helpers/libvirt';
import { sleep, startVm, type Vm } from './helpers/vm';
import { BIN, run, sh } from './helpers/cli';

const ctx: { guest?: Guest; dir?: string; lv?: Libvirtd; vms: Vm[] } = { vms: [] };
const DISK_RE = /^disk=(ok|FAIL) last=(\d+) ondisk=(\d+)/;
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
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-libvirt-'));
  ctx.lv = await startLibvirtd();
});

test.after(async () => {
  for (const vm of ctx.vms) await vm.kill();
  await ctx.lv?.stop();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

// Defines and starts a domain of the test guest with a 64 MiB raw disk, and
// waits until its guest checks disk and RAM.
async function bootDomain(name: string): Promise<{ disk: string; serial: string }> {
  const disk = path.join(ctx.dir!, `${name}.raw`);
  const serial = path.join(ctx.dir!, `${name}.log`);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, '64M']);
  const xml = path.join(ctx.dir!, `${name}.xml`);
  const { kernel, initrd } = ctx.guest!;
  const cmdline = `console=ttyS0 quiet panic=-1 bgsnap.mb=16 bgsnap.tick_ms=300 ${APPEND}`;
  fs.writeFileSync(xml, domainXml({ name, kernel, initrd, cmdline, memMb: 256, disk, serialLog: serial }));
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
  const r = await sh(`${BIN.capture} --domain ${name} --connect '${lv.uri}' --disks --stats '${stats}' | ${BIN.receive} -o '${image}'`, 240_000);
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
  const m = DISK_RE.exec(bad[0])!;
  assert.ok(m[1] === 'FAIL' && Number(m[3]) > Number(m[2]), `a later disk must fail the check: ${bad[0]}`);
});

// Killed with SIGKILL while QEMU's stream is in flight (the reader waits 4 s
// first): the migration guard drains the stream and puts the setting back,
// the disk guard takes our job and node away, all through libvirt.
test('--domain capture killed mid-way (SIGKILL): the domain runs on, libvirt\'s view and QEMU as before', async () => {
  const lv = ctx.lv!;
  const name = 'bgsnap-kill';
  const { serial } = await bootDomain(name);
  const before = libvirtView(lv, name);
  const fdsBefore = socketFds(lv.qemuPid(name));
  const pidFile = path.join(ctx.dir!, 'kill.pid');
  const disks = process.env.BGSNAP_DISK_FAULTS === '1' ? '--disks' : ''; // opt-in with --domain (README, Known limits)
  const r = sh(`(${BIN.capture} --domain ${name} --connect '${lv.uri}' ${disks} & echo $! > '${pidFile}'; wait) | (sleep 4; cat > /dev/null)`, 240_000);
  await waitFor('the snapshot under way', 60_000, () => (qmp<{ status?: string }>(lv, name, 'query-migrate').status === 'active' ? true : undefined));
  process.kill(Number(fs.readFileSync(pidFile, 'utf8')), 'SIGKILL');
  const out = await r;
  assert.match(out.stderr, /died mid-snapshot: draining/);
  await waitFor('the setting put back', 120_000, () => {
    const caps = qmp<{ capability: string; state: boolean }[]>(lv, name, 'query-migrate-capabilities');
    return caps.find((c) => c.capability === 'background-snapshot')?.state === false ? true : undefined;
  });
  assert.is(qmp<{ status: string }>(lv, name, 'query-migrate').status, 'completed');
  assert.equal(qmp<unknown[]>(lv, name, 'query-block-jobs'), []);
  assert.equal(libvirtView(lv, name), before);
  assert.is(socketFds(lv.qemuPid(name)), fdsBefore, 'no socket handed to QEMU is left open');
  const seen = diskChecks(logLines(serial)).length;
  await waitFor('the guest checking on', 60_000, () => (diskChecks(logLines(serial)).length > seen + 1 ? true : undefined));
  assert.ok(diskChecks(logLines(serial)).every((l) => l.startsWith('disk=ok')), 'the guest saw no disk or memory error');
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
