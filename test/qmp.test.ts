// The QMP client and the QEMU capture source against a real QEMU 7.2. No guest
// kernel is needed: SeaBIOS alone gives a running VM with RAM to snapshot.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { QmpClient, QmpError } from '../capture/qmp';
import { openQemuSnapshot } from '../capture/qemu-source';
import { bounded, withVm, sleep, type Vm } from './helpers/vm';
import { tmpDir } from './helpers/net';

type Caps = { capability: string; state: boolean }[];
const BIOS_VM = { memMb: 128 };
const VM_TEST_MS = 60_000; // withVm kills the VM and fails the test after this

function setCaps(vm: Vm, caps: Record<string, boolean>): Promise<unknown> {
  const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
  return vm.qmp.execute('migrate-set-capabilities', { capabilities });
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

function tmpDirsNamed(prefix: string): string[] {
  return fs.readdirSync(os.tmpdir()).filter((n) => n.startsWith(prefix));
}

test('QMP: greeting, capabilities negotiated, query-status, events', async () => {
  await withVm(BIOS_VM, async (vm) => {
    const qmp = await QmpClient.connect(vm.qmpPath);
    try {
      assert.is(qmp.greeting.QMP.version.qemu.major, 7);
      assert.match(qmp.qemuVersion, /^7\.2\./);
      const status = await qmp.execute<{ status: string; running: boolean }>('query-status');
      assert.is(status.status, 'running');
      await qmp.execute('stop');
      const ev = await qmp.waitForEvent('STOP', 5000, undefined, 0);
      assert.is(ev.event, 'STOP');
      await qmp.execute('cont');
      await qmp.waitForEvent('RESUME', 5000, undefined, 0);
      assert.is((await qmp.execute<{ status: string }>('query-status')).status, 'running');
    } finally {
      qmp.close();
    }
  }, VM_TEST_MS);
});

test('QMP: a bad command is an error naming it, with QEMU desc', async () => {
  await withVm(BIOS_VM, async (vm) => {
    const err = await rejection(vm.qmp.execute('no-such-command'));
    assert.instance(err, QmpError);
    assert.is((err as QmpError).command, 'no-such-command');
    assert.match(err.message, /'no-such-command'/);
    assert.match((err as QmpError).desc, /no-such-command/);
    const bad = await rejection(vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'nope', state: true }] }));
    assert.match(bad.message, /migrate-set-capabilities.*nope/);
    // The connection stays usable after errors.
    assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  }, VM_TEST_MS);
});

test('QMP: clear errors for a missing socket and a socket that is not QMP', async () => {
  const missing = await rejection(QmpClient.connect('/nonexistent/bgsnap.qmp'));
  assert.match(missing.message, /not found/);
  const dir = tmpDir('qmptest');
  const sock = path.join(dir, 'not-qmp.sock');
  const server = net.createServer((c) => c.end('SSH-2.0-OpenSSH\r\n'));
  await new Promise<void>((r) => server.listen(sock, r));
  try {
    const notQmp = await rejection(QmpClient.connect(sock, { timeoutMs: 2000 }));
    assert.match(notQmp.message, /not a QMP socket/);
    const stale = path.join(dir, 'stale.sock');
    fs.writeFileSync(stale, '');
    assert.match((await rejection(QmpClient.connect(stale))).message, /refused|not a socket/);
    assert.match((await rejection(openQemuSnapshot(sock, { connectTimeoutMs: 2000 }))).message, /not a QMP socket/);
  } finally {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('source: refuses xbzrle and compress, naming both, capabilities untouched', async () => {
  await withVm(BIOS_VM, async (vm) => {
    await setCaps(vm, { xbzrle: true, compress: true });
    const before = await vm.qmp.execute<Caps>('query-migrate-capabilities');
    const err = await rejection(openQemuSnapshot(vm.qmpPath));
    assert.match(err.message, /'compress', 'xbzrle'/);
    assert.match(err.message, /background-snapshot/);
    assert.match(err.message, /migrate-set-capabilities/);
    assert.match(err.message, /migrate_set_capability xbzrle off/);
    assert.equal(await vm.qmp.execute<Caps>('query-migrate-capabilities'), before);
    // The spare monitor was released: a new client can connect.
    (await QmpClient.connect(vm.qmpPath)).close();
  }, VM_TEST_MS);
});

test('source: refuses while another migration is running', async () => {
  await withVm(BIOS_VM, async (vm) => {
    // A listener that never reads keeps this migration active, and unlike an
    // exec: target it leaves no process behind.
    const sock = path.join(vm.dir, 'stall.sock');
    const conns: net.Socket[] = [];
    const server = net.createServer((c) => (c.pause(), conns.push(c)));
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      await vm.qmp.execute('migrate', { uri: `unix:${sock}` });
      const err = await rejection(openQemuSnapshot(vm.qmpPath));
      assert.match(err.message, /already in progress.*migrate_cancel/);
      await vm.qmp.execute('migrate_cancel');
    } finally {
      for (const c of conns) c.destroy();
      server.close();
    }
  }, VM_TEST_MS);
});

test('source: QEMU refusing the migration is reported with its desc, settings restored', async () => {
  await withVm({ ...BIOS_VM, incoming: 'defer' }, async (vm) => {
    const before = await vm.qmp.execute<Caps>('query-migrate-capabilities');
    const err = await rejection(openQemuSnapshot(vm.qmpPath));
    assert.match(err.message, /'migrate' failed: Guest is waiting for an incoming migration/);
    assert.equal(await vm.qmp.execute<Caps>('query-migrate-capabilities'), before);
  }, VM_TEST_MS);
});

test('source: snapshot of a running VM: QEVM stream, VM running, settings restored', async () => {
  await withVm(BIOS_VM, async (vm) => {
    const before = await vm.qmp.execute<Caps>('query-migrate-capabilities');
    const dirsBefore = tmpDirsNamed('bgsnap-qmp-');
    const paramsBefore = await vm.qmp.execute<Record<string, number>>('query-migrate-parameters');
    const bandwidthBefore = paramsBefore['max-bandwidth'];
    const snap = await openQemuSnapshot(vm.qmpPath, { maxBandwidth: 1 << 30 });
    assert.is(snap.capabilities.get('background-snapshot'), false);
    assert.is(snap.runStateBefore, 'running');
    const chunks: Buffer[] = [];
    snap.stream.on('data', (c: Buffer) => chunks.push(c));
    const result = await snap.done;
    await new Promise((r) => snap.stream.once('end', r));
    const data = Buffer.concat(chunks);
    assert.is(data.subarray(0, 4).toString('latin1'), 'QEVM');
    assert.is(data.readUInt32BE(4), 3);
    assert.ok(data.includes(Buffer.from('pc-i440fx-7.2')));
    assert.is(result.runStateAfter, 'running');
    assert.type(result.downtimeMs, 'number');
    assert.type(result.totalTimeMs, 'number');
    assert.equal(await vm.qmp.execute<Caps>('query-migrate-capabilities'), before);
    const params = await vm.qmp.execute<Record<string, number>>('query-migrate-parameters');
    assert.is(params['max-bandwidth'], bandwidthBefore, 'max-bandwidth restored');
    assert.equal(tmpDirsNamed('bgsnap-qmp-'), dirsBefore, 'private socket dir removed');
  }, VM_TEST_MS);
});

test('source: abort while the reader stalls drains QEMU to the end and restores settings', async () => {
  await withVm(BIOS_VM, async (vm) => {
    const before = await vm.qmp.execute<Caps>('query-migrate-capabilities');
    // Nobody reads the stream, so QEMU's writes block once the socket buffers
    // fill. QMP is not queried meanwhile: a vCPU that writes a page not yet
    // saved can then wait holding QEMU's big lock, and QMP stops answering.
    const snap = await openQemuSnapshot(vm.qmpPath);
    await sleep(500);
    await bounded(snap.abort('test'), 20_000, 'abort');
    assert.match((await rejection(snap.done)).message, /aborted: test/);
    const drained = await pipeline(snap.stream, fs.createWriteStream('/dev/null')).catch((e: Error) => e);
    assert.instance(drained, Error, 'the stream must not end cleanly after an abort');
    assert.is((await vm.qmp.execute<{ status: string }>('query-migrate')).status, 'completed', 'drained, not cancelled');
    assert.equal(await vm.qmp.execute<Caps>('query-migrate-capabilities'), before);
    assert.is((await vm.qmp.execute<{ status: string }>('query-status')).status, 'running');
  }, VM_TEST_MS);
});

test('source: abortBy cancel sends migrate_cancel; a reader that gives up early aborts', async () => {
  await withVm(BIOS_VM, async (vm) => {
    const snap = await openQemuSnapshot(vm.qmpPath, { abortBy: 'cancel' });
    await new Promise((r) => snap.stream.once('data', r));
    snap.stream.destroy();
    assert.match((await rejection(snap.done)).message, /closed by its reader/);
    assert.match((await vm.qmp.execute<{ status: string }>('query-migrate')).status, /^(cancelled|completed)$/);
    const caps = await vm.qmp.execute<Caps>('query-migrate-capabilities');
    assert.is(caps.find((c) => c.capability === 'background-snapshot')?.state, false);
  }, VM_TEST_MS);
});

test.run();
