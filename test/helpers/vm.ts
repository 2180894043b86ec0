// Boots throw-away QEMU VMs for tests: the system QEMU 7.2 or QEMU 10.0 from the
// test cache (helpers/qemu10.ts), TCG only (KVM is not guaranteed here), a fixed
// machine type so snapshots restore, the serial console captured line by
// line, and two QMP monitors: `qmp` (connected, for the harness) and `qmpPath`
// (left free for the code under test, since a QMP monitor serves one client at
// a time). QEMU processes must never outlive the test run; see killAllVms().
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import { QmpClient } from '../../capture/qmp';
import { openQemuSnapshot, type QemuSnapshotOptions, type QemuSnapshotResult } from '../../capture/qemu-source';
import { SYSTEM_QEMU, type QemuBinary } from './qemu10';
import { tmpDir } from './net';

export const MACHINE = SYSTEM_QEMU.machine; // pc-i440fx-7.2, the default VMs' machine type

export interface VmOptions {
  kernel?: string; // without a kernel the VM just runs SeaBIOS, enough for QMP tests
  initrd?: string;
  memMb?: number; // VM size, default 256
  guestMb?: number; // the guest's pattern region (bgsnap.mb), default 48
  tickMs?: number; // the guest's report interval (bgsnap.tick_ms), default 300
  append?: string; // more kernel command line, e.g. `bgsnap.fault=1`
  incoming?: string; // QEMU -incoming URI, e.g. `exec:cat FILE`
  extraArgs?: string[];
  startTimeoutMs?: number; // until the QMP socket answers, default 20000
  qemu?: QemuBinary; // default: the system QEMU 7.2 (SYSTEM_QEMU)
  machine?: string; // default: the binary's pinned i440fx type
}

export interface SerialLine {
  index: number;
  text: string;
  at: number; // Date.now() when the harness saw it
}

export interface Tick {
  n: number;
  gen: number;
  ok: boolean;
  line: SerialLine;
}

export interface Vm {
  readonly dir: string;
  readonly pid: number;
  readonly args: readonly string[];
  readonly qmp: QmpClient;
  readonly qmpPath: string; // the spare monitor, for capture sources
  readonly serialLogPath: string;
  lines(since?: number): SerialLine[];
  waitForLine(re: RegExp, timeoutMs: number, since?: number): Promise<SerialLine>;
  ticks(since?: number): Tick[];
  waitForTicks(count: number, timeoutMs: number, since?: number): Promise<Tick[]>;
  stderr(): string;
  console(text: string): void; // typed on the guest's serial console
  readonly running: boolean;
  kill(): Promise<void>;
}

const TICK_RE = /^tick (\d+) gen (\d+) check=(ok|FAIL)\b/;
const live = new Map<ChildProcess, string>(); // QEMU -> its temp dir

// Last resort for crashes and early exits: 'exit' handlers must be synchronous,
// and SIGKILL and rmSync are. setpriv's parent-death signal covers a killed
// test runner (its temp dir then stays behind).
export function killAllVms(): void {
  for (const [child, dir] of live) {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
process.on('exit', killAllVms);

export function parseTick(line: SerialLine): Tick | null {
  const m = TICK_RE.exec(line.text);
  return m ? { n: Number(m[1]), gen: Number(m[2]), ok: m[3] === 'ok', line } : null;
}

export function buildArgs(opts: VmOptions, dir: string): string[] {
  const machine = opts.machine ?? (opts.qemu ?? SYSTEM_QEMU).machine;
  const args = ['-machine', machine, '-accel', 'tcg', '-display', 'none', '-nodefaults', '-no-user-config'];
  args.push('-m', String(opts.memMb ?? 256), '-no-reboot');
  args.push('-chardev', 'stdio,id=serial0,signal=off', '-serial', 'chardev:serial0');
  args.push('-qmp', `unix:${path.join(dir, 'harness.qmp')},server=on,wait=off`);
  args.push('-qmp', `unix:${path.join(dir, 'qmp.sock')},server=on,wait=off`);
  if (opts.kernel) {
    const guest = `bgsnap.mb=${opts.guestMb ?? 48} bgsnap.tick_ms=${opts.tickMs ?? 300}`;
    // panic=-1 with -no-reboot turns a guest panic into a prompt QEMU exit.
    const append = `console=ttyS0 quiet panic=-1 ${guest} ${opts.append ?? ''}`.trim();
    args.push('-kernel', opts.kernel, '-append', append);
    if (opts.initrd) args.push('-initrd', opts.initrd);
  }
  if (opts.incoming) args.push('-incoming', opts.incoming);
  return args.concat(opts.extraArgs ?? []);
}

function spawnQemu(args: string[], dir: string, qemu: QemuBinary): ChildProcess {
  // The parent-death signal stops QEMU even if the test runner is SIGKILLed.
  const usePdeath = fs.existsSync('/usr/bin/setpriv');
  const full = [...qemu.prefix, ...args];
  const cmd = usePdeath ? '/usr/bin/setpriv' : qemu.cmd;
  const argv = usePdeath ? ['--pdeathsig', 'KILL', qemu.cmd, ...full] : full;
  const env = { ...process.env, ...qemu.env };
  const child = spawn(cmd, argv, { stdio: ['pipe', 'pipe', 'pipe'], env });
  live.set(child, dir);
  child.once('exit', () => live.delete(child));
  return child;
}

class SerialReader {
  readonly lines: SerialLine[] = [];
  private partial = '';
  private listeners = new Set<() => void>();
  constructor(private readonly logPath: string) {}

  push(chunk: Buffer): void {
    fs.appendFileSync(this.logPath, chunk);
    this.partial += chunk.toString('latin1');
    const parts = this.partial.split('\n');
    this.partial = parts.pop() ?? '';
    const at = Date.now();
    for (const raw of parts) this.lines.push({ index: this.lines.length, text: raw.replace(/\r$/, ''), at });
    if (parts.length) for (const l of [...this.listeners]) l();
  }

  onChange(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
}

export async function startVm(opts: VmOptions = {}): Promise<Vm> {
  const dir = tmpDir('vm');
  const args = buildArgs(opts, dir);
  const child = spawnQemu(args, dir, opts.qemu ?? SYSTEM_QEMU);
  const serial = new SerialReader(path.join(dir, 'serial.log'));
  let stderr = '';
  let exitInfo: string | null = null;
  child.stdout!.on('data', (c: Buffer) => serial.push(c));
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<void>((resolve) =>
    child.once('exit', (code, sig) => {
      exitInfo = `QEMU exited (code ${code}, signal ${sig})${stderr ? `: ${stderr.trim()}` : ''}`;
      resolve();
    }),
  );
  const harness = { child, dir, serial, exited, args, stderr: () => stderr, exitInfo: () => exitInfo };
  try {
    const qmp = await connectWhenReady(path.join(dir, 'harness.qmp'), harness, opts.startTimeoutMs ?? 20000);
    return makeVm(harness, qmp);
  } catch (err) {
    await stopProcess(child, exited);
    fs.rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}

interface Harness {
  child: ChildProcess;
  dir: string;
  serial: SerialReader;
  exited: Promise<void>;
  args: string[];
  stderr(): string;
  exitInfo(): string | null;
}

// QEMU creates its sockets while starting; retry until it answers or dies.
async function connectWhenReady(sock: string, h: Harness, timeoutMs: number): Promise<QmpClient> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = h.exitInfo();
    if (info) throw new Error(`${info}\nargs: ${h.args.join(' ')}`);
    if (fs.existsSync(sock)) {
      try {
        return await QmpClient.connect(sock, { timeoutMs: 5000 });
      } catch (err) {
        if (Date.now() > deadline) throw err;
      }
    }
    if (Date.now() > deadline) throw new Error(`QEMU did not open ${sock} within ${timeoutMs} ms`);
    await sleep(50);
  }
}

function makeVm(h: Harness, qmp: QmpClient): Vm {
  let killed = false;
  const lines = (since = 0) => h.serial.lines.slice(since);
  const ticks = (since = 0) => lines(since).map(parseTick).filter((t): t is Tick => t !== null);
  return {
    dir: h.dir,
    pid: h.child.pid ?? -1,
    args: h.args,
    qmp,
    qmpPath: path.join(h.dir, 'qmp.sock'),
    serialLogPath: path.join(h.dir, 'serial.log'),
    lines,
    ticks,
    stderr: h.stderr,
    console: (text) => void h.child.stdin?.write(text),
    get running() {
      return h.exitInfo() === null;
    },
    waitForLine: (re, timeoutMs, since = 0) =>
      waitFor(h, timeoutMs, `a serial line matching ${re}`, () => lines(since).find((l) => re.test(l.text))),
    waitForTicks: (count, timeoutMs, since = 0) =>
      waitFor(h, timeoutMs, `${count} tick lines`, () => {
        const t = ticks(since);
        return t.length >= count ? t.slice(0, count) : undefined;
      }),
    async kill() {
      if (killed) return;
      killed = true;
      qmp.close();
      await stopProcess(h.child, h.exited);
      fs.rmSync(h.dir, { recursive: true, force: true });
    },
  };
}

// Waits until `probe` returns a value; fails early when QEMU exits, with its
// stderr and the serial tail in the message.
function waitFor<T>(h: Harness, timeoutMs: number, what: string, probe: () => T | undefined): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const check = () => {
      const v = probe();
      if (v !== undefined) return finish(() => resolve(v));
      const info = h.exitInfo();
      if (info) finish(() => reject(new Error(`waiting for ${what}: ${info}${serialTail(h)}`)));
    };
    const timer = setTimeout(
      () => finish(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}${serialTail(h)}`))),
      timeoutMs,
    );
    const off = h.serial.onChange(check);
    h.exited.then(check);
    const finish = (f: () => void) => {
      clearTimeout(timer);
      off();
      f();
    };
    check();
  });
}

function serialTail(h: Harness): string {
  const tail = h.serial.lines.slice(-8).map((l) => `  | ${l.text}`);
  return tail.length ? `\nserial tail:\n${tail.join('\n')}` : '\n(no serial output)';
}

// Children of QEMU (exec: migration targets) can hold its stdout open; drop our
// ends so they cannot keep the test runner alive.
async function stopProcess(child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await exited;
  child.stdin?.destroy();
  child.stdout?.destroy();
  child.stderr?.destroy();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Rejects when `p` takes longer than `ms`; uvu has no test timeouts of its own.
export function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([p, limit]).finally(() => clearTimeout(timer));
}

// Runs fn with a fresh VM and always kills it, whether fn succeeds, throws or
// hangs past timeoutMs.
export async function withVm<T>(opts: VmOptions, fn: (vm: Vm) => Promise<T>, timeoutMs = 120_000): Promise<T> {
  const vm = await startVm(opts);
  try {
    return await bounded(fn(vm), timeoutMs, 'test with a VM');
  } finally {
    await vm.kill();
  }
}

// `-incoming` URI that feeds a saved migration stream from a file.
export function incomingFromFile(file: string): string {
  return `exec:cat '${file.replace(/'/g, `'\\''`)}'`;
}

export interface TickWindow {
  lastBefore: number; // last tick seen before the snapshot started (0: none)
  lastEnd: number; // last tick seen once the snapshot was over
}

export interface SnapshotRun<T> extends TickWindow {
  result: QemuSnapshotResult;
  consumed: T; // what `consume` returned
  during: Tick[]; // ticks printed while the snapshot ran: the VM was not paused
  ms: number; // wall time from open to done
}

// Takes a background snapshot of a ticking guest and hands its raw stream to
// `consume` (write it to a file, feed a receiver, ...), recording which ticks
// bracket it so a restore can be checked against the snapshot point.
export async function snapshotTicking<T>(
  vm: Vm,
  consume: (stream: Readable) => Promise<T>,
  opts: QemuSnapshotOptions = {},
  timeoutMs = 120_000,
): Promise<SnapshotRun<T>> {
  const lastTick = () => vm.ticks().at(-1)?.n ?? 0;
  const lastBefore = lastTick();
  const from = vm.lines().length;
  const start = Date.now();
  const snap = await openQemuSnapshot(vm.qmpPath, opts);
  const both = Promise.all([consume(snap.stream), snap.done]);
  const [consumed, result] = await bounded(both, timeoutMs, 'snapshot').catch(async (err: Error) => {
    await snap.abort(err.message);
    throw err;
  });
  const ms = Date.now() - start;
  return { result, consumed, lastBefore, lastEnd: lastTick(), during: vm.ticks(from), ms };
}

// Waits for `count` ticks on a VM restored from a snapshot taken in `window`
// and checks that it resumed from the snapshot point with an intact pattern.
export async function waitForResume(vm: Vm, window: TickWindow, count: number, timeoutMs: number): Promise<Tick[]> {
  const ticks = await vm.waitForTicks(count, timeoutMs);
  const first = ticks[0].n;
  // The guest increments N before printing, so the first tick after a restore
  // is one past the N saved in the snapshot.
  if (first < window.lastBefore + 1 || first > window.lastEnd + 1) {
    throw new Error(`restored guest resumed at tick ${first}, outside the snapshot window ` +
      `${window.lastBefore + 1}..${window.lastEnd + 1}`);
  }
  ticks.forEach((t, i) => {
    if (!t.ok) throw new Error(`restored guest failed its memory check: ${t.line.text}`);
    if (i > 0 && t.n <= ticks[i - 1].n) throw new Error(`tick counter went backwards: ${ticks[i - 1].n} then ${t.n}`);
  });
  return ticks;
}
