// The codec against a real peer: QEMU 7.2 (no kernel; SeaBIOS alone runs) writes
// migration streams with and without background-snapshot, bgsnap decodes them,
// re-encodes them (sorted, main-RAM zero pages omitted) and a fresh QEMU restores
// the result. The restored VM is then snapshotted again while paused, and its RAM
// must equal what the first stream carried, page for page.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { BlockInfo, StreamEvent } from '../format/events.js';
import { QemuDecoder } from '../format/qemu.js';
import { RamPartWriter, encodeRamStart, type RamSectionInfo } from '../format/qemu-encode.js';
import { QmpClient } from '../capture/qmp.js';
import { tmpDir } from './helpers/net';

const QEMU = 'qemu-system-x86_64';
const MACHINE = ['-machine', 'pc-i440fx-7.2', '-m', '64', '-display', 'none', '-nodefaults', '-serial', 'none'];
const SMALL_BLOCK = 16 * 1024 * 1024; // below this, zero pages are sent as ZERO records

interface Vm { proc: ChildProcess; qmp: QmpClient; log: () => string; exited: Promise<void> }

function requireQemu(): void {
  const r = spawnSync(QEMU, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    throw new Error(`${QEMU} is required for this test and could not be run (${r.error?.message ?? r.stderr}); install QEMU 7.2 (Debian: qemu-system-x86)`);
  }
  assert.match(r.stdout, /version 7\.2\./, `this test targets QEMU 7.2, found: ${r.stdout.split('\n')[0]}`);
}

async function startVm(dir: string, name: string, extra: string[]): Promise<Vm> {
  const sock = path.join(dir, `${name}.qmp`);
  const proc = spawn(QEMU, [...MACHINE, '-qmp', `unix:${sock},server=on,wait=off`, ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  let log = '';
  proc.stdout!.on('data', (d: Buffer) => (log += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  const exited = new Promise<void>((ok) => proc.once('exit', () => ok()));
  try {
    // QEMU creates the socket while starting up.
    for (let i = 0; i < 200 && !fs.existsSync(sock) && proc.exitCode === null; i++) await new Promise((r) => setTimeout(r, 50));
    const qmp = await QmpClient.connect(sock);
    return { proc, qmp, log: () => log, exited };
  } catch (e) {
    proc.kill('SIGKILL');
    throw new Error(`QEMU ${name} did not start: ${(e as Error).message}\n${log}`);
  }
}

async function stopVm(vm: Vm | undefined): Promise<void> {
  if (!vm) return;
  vm.qmp.close();
  if (vm.proc.exitCode === null && vm.proc.signalCode === null) vm.proc.kill('SIGKILL');
  await vm.exited;
}

async function poll<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 15000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// Migrates to a file; the shell's `touch` marks that cat has written everything.
async function migrateToFile(vm: Vm, file: string, background: boolean): Promise<any> {
  if (background) {
    await vm.qmp.execute<any>('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] });
  }
  await vm.qmp.execute<any>('migrate', { uri: `exec:cat > '${file}' && touch '${file}.done'` });
  const info = await poll('migration to complete', async () => {
    const m = await vm.qmp.execute<any>('query-migrate');
    if (m.status === 'failed') throw new Error(`migration failed: ${m['error-desc']}\n${vm.log()}`);
    return m.status === 'completed' ? m : undefined;
  });
  await poll('cat to finish', async () => (fs.existsSync(`${file}.done`) ? true : undefined));
  return info;
}

function decodeFile(file: string): StreamEvent[] {
  const d = new QemuDecoder();
  const ev: StreamEvent[] = [];
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(100_003); // odd size: records straddle chunk borders
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) ev.push(...d.push(buf.subarray(0, n)));
  } finally {
    fs.closeSync(fd);
  }
  ev.push(...d.finish());
  assert.is(d.bytesIn, fs.statSync(file).size);
  return ev;
}

type Page = Buffer | 0; // 0 = zero page
interface Ram { blocks: BlockInfo[]; pages: (Page | undefined)[][]; counts: Uint16Array[] }

// Last copy of each page wins, as in QEMU's loader.
function ramOf(ev: StreamEvent[]): Ram {
  const blocks = (ev.find((e) => e.type === 'blocks') as Extract<StreamEvent, { type: 'blocks' }>).blocks;
  const pages = blocks.map((b) => new Array<Page | undefined>(b.length / 4096));
  const counts = blocks.map((b) => new Uint16Array(b.length / 4096));
  for (const e of ev) {
    if (e.type !== 'pages') continue;
    const { block, index, zero, data } = e.batch;
    for (let i = 0, d = 0; i < index.length; i++) {
      pages[block][index[i]] = zero[i] ? 0 : data.subarray(d, (d += 4096));
      counts[block][index[i]]++;
    }
  }
  return { blocks, pages, counts };
}

function stateOf(ev: StreamEvent[], kind: string): Buffer {
  for (const e of ev) if (e.type === 'state' && e.state.kind === kind) return e.state.data;
  throw new Error(`no ${kind} state`);
}

// Sorted pages in one PART; zero pages of main RAM are left out (a fresh
// -incoming destination's RAM is zero), small blocks get ZERO records.
function reencode(ev: StreamEvent[], ram: Ram): Buffer {
  const sec = JSON.parse(stateOf(ev, 'qemu.ram-section').toString()) as RamSectionInfo;
  const w = new RamPartWriter(ram.blocks, sec.sectionId);
  const out = [stateOf(ev, 'qemu.preamble'), encodeRamStart(ram.blocks, sec), w.begin()];
  ram.blocks.forEach((b, bi) => {
    const full: number[] = [];
    const zero: number[] = [];
    ram.pages[bi].forEach((p, i) => (p === 0 ? zero : p ? full : []).push(i));
    const data = Buffer.concat(full.map((i) => ram.pages[bi][i] as Buffer));
    if (full.length) out.push(w.pages(bi, Uint32Array.from(full), data));
    if (zero.length && b.length < SMALL_BLOCK) out.push(w.zeros(bi, Uint32Array.from(zero)));
  });
  out.push(w.end(), stateOf(ev, 'qemu.devices'));
  return Buffer.concat(out);
}

function checkSourceStream(ev: StreamEvent[], ram: Ram, background: boolean): void {
  const byName = new Map(ram.blocks.map((b) => [b.name, b.length]));
  assert.is(byName.get('pc.ram'), 64 * 1024 * 1024);
  assert.is(byName.get('pc.bios'), 256 * 1024);
  assert.ok(byName.has('pc.rom') && byName.has('/rom@etc/acpi/tables'), [...byName.keys()].join(', '));
  const hdr = ev[0] as Extract<StreamEvent, { type: 'header' }>;
  assert.is(hdr.header.label, 'pc-i440fx-7.2');
  const end = ev[ev.length - 1];
  assert.is(end.type, 'end');
  const all = ram.counts.reduce((s, c) => s + c.reduce((a, x) => a + x, 0), 0);
  if (end.type === 'end') assert.is(end.totals.pages, all);
  ram.counts.forEach((c, bi) => c.forEach((n, i) => {
    if (n === 0 || (background && n !== 1)) {
      assert.unreachable(`block ${ram.blocks[bi].name} page ${i} sent ${n} times`);
    }
  }));
  const nonZeroRam = ram.pages[0].filter((p) => p !== 0).length;
  assert.ok(nonZeroRam > 0, 'SeaBIOS should have written some of pc.ram');
}

// Pages missing from `b` count as zero only when `b` omits them on purpose.
function assertSameRam(a: Ram, b: Ram, what: string, missingIsZero = false): void {
  assert.equal(b.blocks, a.blocks, `${what}: block list`);
  a.pages.forEach((pages, bi) => pages.forEach((p, i) => {
    const q = b.pages[bi][i];
    const same = p === 0 ? q === 0 || (missingIsZero && q === undefined) : q !== 0 && q !== undefined && p!.equals(q);
    if (!same) assert.unreachable(`${what}: block ${a.blocks[bi].name} page ${i} differs after restore`);
  }));
}

// Waits for the incoming migration to finish and returns the run state after it.
async function restoredStatus(vm: Vm): Promise<string> {
  await poll('incoming migration', async () => {
    const m = await vm.qmp.execute<any>('query-migrate');
    if (m.status === 'failed') throw new Error(`restore failed: ${m['error-desc'] ?? ''}\n${vm.log()}`);
    return m.status === 'completed' ? m : undefined;
  });
  const st = await poll('run state after load', async () => {
    const s = await vm.qmp.execute<any>('query-status');
    return s.status === 'inmigrate' ? undefined : s;
  });
  assert.not.match(vm.log(), /error|fail/i, vm.log());
  return st.status as string;
}

async function roundTrip(background: boolean): Promise<void> {
  requireQemu();
  const dir = tmpDir('qemu');
  let src: Vm | undefined;
  let dst: Vm | undefined;
  try {
    const file = path.join(dir, 'source.qemu');
    src = await startVm(dir, 'src', []);
    await new Promise((r) => setTimeout(r, 300)); // let SeaBIOS dirty some RAM
    await migrateToFile(src, file, background);
    await stopVm(src);
    const ev = decodeFile(file);
    const ram = ramOf(ev);
    checkSourceStream(ev, ram, background);

    const file2 = path.join(dir, 'reencoded.qemu');
    fs.writeFileSync(file2, reencode(ev, ram));
    assertSameRam(ram, ramOf(decodeFile(file2)), 're-encoded stream (main RAM zeros omitted)', true);

    // Without -S the guest must run on; with -S it stays paused after the load.
    dst = await startVm(dir, 'run', ['-incoming', `exec:cat '${file2}'`]);
    assert.is(await restoredStatus(dst), 'running');
    await stopVm(dst);
    dst = await startVm(dir, 'dst', ['-S', '-incoming', `exec:cat '${file2}'`]);
    assert.is(await restoredStatus(dst), 'paused');

    // The paused destination holds exactly what it loaded: snapshot it and compare.
    const file3 = path.join(dir, 'restored.qemu');
    await migrateToFile(dst, file3, false);
    assertSameRam(ram, ramOf(decodeFile(file3)), 'restored VM');
  } finally {
    await stopVm(src);
    await stopVm(dst);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('background-snapshot stream: decode, every page once, re-encode, restore', async () => {
  await roundTrip(true);
});

test('precopy stream: decode, re-encode, restore', async () => {
  await roundTrip(false);
});

test.run();
