// The `--qmp SOCKET` capture source: takes a live point-in-time snapshot of a
// running QEMU VM with QEMU's own background-snapshot migration and hands its raw
// migration stream to the caller as a Node Readable.
//
// Background snapshot (QEMU >= 6.0, Linux host) write-protects guest RAM with
// userfaultfd at the start and saves each page before the guest may change it,
// so the stream is the memory of one instant while the VM keeps running.
//
// We only change what the snapshot needs (the background-snapshot capability, and
// max-bandwidth when asked) and put it back afterwards, whatever happens.
//
// Two QEMU 7.2 behaviours shape this file (both seen with the TCG test guest):
// a reader that stalls stalls the guest (vCPUs wait for their pages to be saved)
// and can stall QMP too; and a snapshot that stops early leaves a vCPU blocked
// for good. So an abort keeps reading and discarding until QEMU is done.
// Callers must consume `stream` and await `done` concurrently.
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { QmpClient } from './qmp';
import { forgetsWriteProtection, qemuPidOf, releaseWriteProtection } from './qemu-uffd';
import { migrationUri, type QmpTransport, type SocketHandOver } from './qmp-transport';

// Capabilities QEMU 7.x-10.x refuses to combine with background-snapshot
// (migrate_caps_check); checked first so the user learns every offender at once.
// Also the two that change the RAM layout, which bgsnap-receive refuses: QEMU 10
// takes mapped-ram only on a file: URI, x-ignore-shared leaves shared RAM out.
export const INCOMPATIBLE_CAPABILITIES: readonly string[] = [
  'postcopy-ram', 'postcopy-blocktime', 'dirty-bitmaps', 'late-block-activate', 'return-path',
  'pause-before-switchover', 'multifd', 'zero-copy-send', 'auto-converge', 'release-ram',
  'rdma-pin-all', 'compress', 'xbzrle', 'x-colo', 'validate-uuid', 'mapped-ram', 'x-ignore-shared',
];

// A dead capture's socket, and its private folder if that left it empty
// (anything else there is not ours to force): for the guards.
export function removeSocket(p: string): void {
  fs.rmSync(p, { force: true });
  try {
    fs.rmdirSync(path.dirname(p));
  } catch {
    // not empty, or gone
  }
}

// Migration states in which QEMU would refuse (or confuse) a new migration.
export const ACTIVE_STATES: ReadonlySet<string> = new Set([
  'setup', 'active', 'pre-switchover', 'device', 'cancelling', 'colo', 'wait-unplug',
  'postcopy-active', 'postcopy-paused', 'postcopy-recover',
]);

// The name our migration connection goes by in QEMU's monitor, when handed over.
const MIGRATION_FD = `bgsnap-migration-${process.pid}`;

export interface QemuSnapshotOptions {
  pollMs?: number; // query-migrate interval, default 100
  connectTimeoutMs?: number; // QMP greeting, default 5000
  acceptTimeoutMs?: number; // until QEMU connects to our socket, default 30000
  maxBandwidth?: number; // bytes/s for this snapshot only (QEMU 7.2 default: 128 MiB/s)
  tmpRoot?: string; // parent of the private socket directory, default os.tmpdir()
  // How an abort ends QEMU's side. 'drain' (default) discards the rest of the
  // stream and lets QEMU finish, the only way seen to always leave the guest
  // running on QEMU 7.2; 'cancel' also sends migrate_cancel, which is faster
  // but on 7.2 can leave a vCPU of a busy guest blocked for good.
  abortBy?: 'drain' | 'cancel';
  abortWaitMs?: number; // how long an abort waits for QEMU to stop, default 300000
  // A QMP connection the caller opened and keeps (whole-VM capture: the disk
  // jobs outlive the migration); it is not closed here.
  qmp?: QmpTransport;
  // QEMU's pid (QEMU < 8.1: to release the protection it forgets if the snapshot
  // fails; capture/qemu-uffd.ts); found through QMP when not given.
  qemuPid?: number | null;
  // Runs right before `migrate`, when everything else is ready (settings, the
  // socket and its guard): a whole-VM capture stops the VM and starts its disk
  // backups here, so its pause holds no more than it must.
  beforeMigrate?: () => Promise<void>;
}

export interface MigrationInfo {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  ram?: Record<string, number>;
  [key: string]: unknown;
}

export interface QemuSnapshotResult {
  downtimeMs: number | null; // how long QEMU paused the guest
  totalTimeMs: number | null;
  setupTimeMs: number | null;
  runStateAfter: string; // query-status after the snapshot; 'running' for a running VM
  info: MigrationInfo; // QEMU's final query-migrate reply
}

export interface QemuSnapshot {
  readonly stream: Readable; // QEMU's raw migration stream; ends only if QEMU reported success
  readonly done: Promise<QemuSnapshotResult>; // settles after everything was put back
  readonly qemuVersion: string;
  readonly capabilities: ReadonlyMap<string, boolean>; // as found, before any change
  readonly runStateBefore: string;
  readonly startedAt: number; // Date.now() just before `migrate`: the snapshot point
  abort(reason?: string): Promise<void>;
}

export interface Changes {
  capabilities: Map<string, boolean>; // capability -> value to restore
  maxBandwidth: number | null; // value to restore
}

export async function openQemuSnapshot(qmpSocketPath: string, opts: QemuSnapshotOptions = {}): Promise<QemuSnapshot> {
  const qmp = opts.qmp ?? (await QmpClient.connect(qmpSocketPath, { timeoutMs: opts.connectTimeoutMs ?? 5000 }));
  const changes: Changes = { capabilities: new Map(), maxBandwidth: null };
  let dir: string | null = null;
  try {
    await refuseIfMigrating(qmp);
    const capabilities = await readCapabilities(qmp);
    refuseIncompatible(capabilities);
    const runStateBefore = await runState(qmp);
    await applySettings(qmp, capabilities, opts, changes);
    dir = fs.mkdtempSync(path.join(opts.tmpRoot ?? os.tmpdir(), 'bgsnap-qmp-'));
    fs.chmodSync(dir, 0o700); // the socket carries all guest memory
    const sockPath = path.join(dir, 'migration.sock');
    const server = await listen(sockPath);
    const qemuPid = opts.qemuPid !== undefined ? opts.qemuPid : await qemuPidOf(qmp);
    const session = new Session(qmp, server, dir, changes, { ...opts, qemuPid });
    let startedAt = 0;
    let handOver: SocketHandOver | null = null;
    try {
      handOver = await qmp.reachSocket(sockPath, MIGRATION_FD);
      await opts.beforeMigrate?.();
      startedAt = Date.now();
      await qmp.execute('migrate', { uri: migrationUri(handOver.address) });
    } catch (err) {
      await handOver?.release();
      session.dropListenGuard();
      server.close();
      throw err;
    }
    session.start();
    const info = { qemuVersion: qmp.qemuVersion, capabilities, runStateBefore, startedAt };
    return { ...info, stream: session.out, done: session.done, abort: (r) => session.abort(r) };
  } catch (err) {
    await restore(qmp, changes).catch(() => undefined);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    if (!opts.qmp) qmp.close();
    throw err;
  }
}

export async function refuseIfMigrating(qmp: QmpTransport): Promise<void> {
  const info = await qmp.execute<MigrationInfo>('query-migrate');
  if (info.status && ACTIVE_STATES.has(info.status)) {
    throw new Error(
      `a migration is already in progress on this VM (status '${info.status}'); ` +
        `wait for it to finish or stop it with {"execute":"migrate_cancel"}`,
    );
  }
}

export async function readCapabilities(qmp: QmpTransport): Promise<Map<string, boolean>> {
  const list = await qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
  const caps = new Map(list.map((c) => [c.capability, c.state] as const));
  if (!caps.has('background-snapshot')) {
    throw new Error(`QEMU ${qmp.qemuVersion} has no background-snapshot migration capability (needs QEMU 6.0 or later)`);
  }
  return caps;
}

export function refuseIncompatible(caps: ReadonlyMap<string, boolean>): void {
  const on = INCOMPATIBLE_CAPABILITIES.filter((c) => caps.get(c) === true);
  if (on.length === 0) return;
  const off = JSON.stringify({
    execute: 'migrate-set-capabilities',
    arguments: { capabilities: on.map((capability) => ({ capability, state: false })) },
  });
  throw new Error(
    `migration capabilit${on.length > 1 ? 'ies' : 'y'} ${on.map((c) => `'${c}'`).join(', ')} ` +
      `cannot be combined with background-snapshot; turn ${on.length > 1 ? 'them' : 'it'} off with ${off} ` +
      `(HMP: ${on.map((c) => `migrate_set_capability ${c} off`).join('; ')})`,
  );
}

export async function runState(qmp: QmpTransport): Promise<string> {
  return (await qmp.execute<{ status: string }>('query-status')).status;
}

// Records each old value before changing it, so a failure half-way still restores.
async function applySettings(qmp: QmpTransport, caps: Map<string, boolean>, opts: QemuSnapshotOptions, changes: Changes): Promise<void> {
  if (opts.maxBandwidth !== undefined) {
    const params = await qmp.execute<{ 'max-bandwidth'?: number }>('query-migrate-parameters');
    changes.maxBandwidth = params['max-bandwidth'] ?? null;
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': opts.maxBandwidth });
  }
  if (caps.get('background-snapshot') !== true) {
    changes.capabilities.set('background-snapshot', false);
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] });
  }
}

// Puts back what applySettings changed (also used by capture/qemu-guard.ts).
export async function restore(qmp: QmpTransport, changes: Changes): Promise<void> {
  const capabilities = [...changes.capabilities].map(([capability, state]) => ({ capability, state }));
  if (capabilities.length) await qmp.execute('migrate-set-capabilities', { capabilities });
  changes.capabilities.clear();
  if (changes.maxBandwidth !== null) await qmp.execute('migrate-set-parameters', { 'max-bandwidth': changes.maxBandwidth });
  changes.maxBandwidth = null;
}

function listen(sockPath: string): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(sockPath, () => {
      server.off('error', reject);
      resolve(server);
    });
  });
}

// One running snapshot: relays the single connection QEMU makes, watches
// query-migrate, and puts everything back when it is over.
class Session {
  readonly out = new PassThrough();
  readonly done: Promise<QemuSnapshotResult>;
  private resolveDone!: (r: QemuSnapshotResult) => void;
  private rejectDone!: (e: Error) => void;
  private conn: net.Socket | null = null;
  private readonly qemuPid: number | null; // QEMU < 8.1 only (see release())
  private connEnded = false;
  private completed: MigrationInfo | null = null;
  private settled = false;
  private finishing: Promise<void> | null = null;
  private guard: ChildProcess | null = null;
  // Guards the window from `migrate` until we hold QEMU's connection: if we die
  // with it still in the listening socket's backlog, this guard accepts and
  // drains it (QEMU may already have write-protected the guest by then).
  private listenGuard: ChildProcess | null;

  constructor(
    private readonly qmp: QmpTransport,
    private readonly server: net.Server,
    private readonly dir: string,
    private readonly changes: Changes,
    private readonly opts: QemuSnapshotOptions,
  ) {
    this.qemuPid = opts.qemuPid ?? null;
    this.listenGuard = spawnGuard(listeningFd(server), qmp, changes, 'listen', this.qemuPid, dir);
    this.done = new Promise((resolve, reject) => ((this.resolveDone = resolve), (this.rejectDone = reject)));
    // Every failure is reported by `done`; the stream also errors for pipelines
    // and for-await readers, but must not crash a caller who has not attached
    // to it yet (an abort right after open, say).
    this.done.catch(() => undefined);
    this.out.on('error', () => undefined);
    server.on('connection', (c) => this.onConnection(c));
    // A reader that gives up early must not leave QEMU blocked on a full socket.
    this.out.on('close', () => {
      if (!this.settled) void this.fail(new Error('snapshot stream was closed by its reader before the end'));
    });
  }

  start(): void {
    void this.watch();
  }

  abort(reason = 'aborted by the caller'): Promise<void> {
    return this.fail(new Error(`snapshot aborted: ${reason}`));
  }

  dropListenGuard(): void {
    this.listenGuard?.stdin?.end('done\n');
    this.listenGuard = null;
  }

  private onConnection(conn: net.Socket): void {
    if (this.conn) return void conn.destroy(); // exactly one stream
    this.conn = conn;
    this.guard = spawnGuard(conn, this.qmp, this.changes, 'conn', this.qemuPid, this.dir);
    this.dropListenGuard(); // the connection's own guard took over
    this.server.close(); // nobody else may connect
    if (this.settled) return void drain(conn, null); // QEMU came after an abort
    conn.pipe(this.out, { end: false });
    conn.on('end', () => ((this.connEnded = true), this.maybeSucceed(), this.watchEarlyEnd()));
    conn.on('error', (err) => void this.fail(new Error(`migration socket error: ${err.message}`)));
  }

  private async watch(): Promise<void> {
    const pollMs = this.opts.pollMs ?? 100;
    const acceptBy = Date.now() + (this.opts.acceptTimeoutMs ?? 30000);
    while (!this.settled && !this.completed) {
      let info: MigrationInfo;
      try {
        info = await this.qmp.execute<MigrationInfo>('query-migrate');
      } catch (err) {
        return void this.fail(new Error(`lost QEMU while snapshotting: ${(err as Error).message}`));
      }
      const problem = this.problemWith(info, acceptBy);
      if (problem) return void this.fail(problem);
      if (info.status === 'completed') this.completed = info;
      else await sleep(pollMs);
    }
    this.maybeSucceed();
    // QEMU closes the socket right after completing; a stream that stays open
    // would otherwise hang the caller forever.
    const guard = setTimeout(() => {
      if (!this.finishing) void this.fail(new Error('QEMU reported completion but the stream never ended'));
    }, 30000);
    guard.unref();
  }

  // The stream ended, so QEMU's migration thread is done: QEMU completed or
  // stopped. If its word does not follow, QMP may be unanswered because on QEMU
  // < 8.1 a thread (its main loop) sleeps on a page that the dead migration
  // thread never saved (a migrate_cancel from elsewhere: watch()'s query then
  // never returns; seen in vm-faults). Nothing more can be saved now, so what
  // QEMU forgot is released and its answer read again.
  private watchEarlyEnd(): void {
    const timer = setTimeout(() => void this.earlyEnd(), 3000);
    timer.unref();
  }

  private async earlyEnd(): Promise<void> {
    if (this.completed || this.settled) return;
    let status = await this.boundedStatus(5000).catch(() => 'unanswered');
    if (this.completed || this.settled || status === 'completed') return; // watch() takes it from here
    if (status === 'cancelled') return void this.fail(new Error('QEMU snapshot was cancelled (migrate_cancel from elsewhere?)'));
    status = status === 'unanswered' ? 'unanswered on QMP' : `'${status}'`;
    return void this.fail(new Error(`QEMU's stream ended before QEMU reported completion (its snapshot is ${status})`));
  }

  private problemWith(info: MigrationInfo, acceptBy: number): Error | null {
    if (info.status === 'failed') {
      // Seen on 7.2: after such a failure a guest vCPU can stay blocked although
      // query-status says 'running'; say so rather than let it pass unnoticed.
      const desc = info['error-desc'] ?? 'no reason given';
      return new Error(`QEMU snapshot failed: ${desc} (QEMU 7.2 may leave the guest stalled after this; check it)`);
    }
    if (info.status === 'cancelled') return new Error('QEMU snapshot was cancelled (migrate_cancel from elsewhere?)');
    if (!this.conn && Date.now() > acceptBy) return new Error(`QEMU did not connect to the snapshot socket (status '${info.status}')`);
    return null;
  }

  // Success needs both QEMU's word and the end of the data.
  private maybeSucceed(): void {
    if (!this.completed || !this.connEnded || this.finishing) return;
    const info = this.completed;
    this.finishing = (async () => {
      try {
        await restore(this.qmp, this.changes);
        const state = await runState(this.qmp);
        this.cleanup(true);
        this.out.end();
        this.resolveDone(resultOf(info, state));
      } catch (err) {
        this.cleanup(true); // QEMU said completed and the stream ended: nothing left to drain
        this.out.destroy(err as Error);
        this.rejectDone(new Error(`snapshot completed but restoring QEMU settings failed: ${(err as Error).message}`));
      }
    })();
  }

  private fail(err: Error): Promise<void> {
    if (this.finishing) return this.finishing;
    this.settled = true;
    // Still listening if QEMU has not connected yet: a connection QEMU queued
    // (it may already be writing, with the guest write-protected) must be taken
    // and drained now, not left full while we wait for QEMU to stop (seen: a
    // SIGTERM during setup stalled QEMU's main thread for the 300 s wait).
    if (this.conn) drain(this.conn, this.out);
    this.out.destroy(err);
    this.finishing = (async () => {
      const cleanupErr = await this.cancelAndRestore().catch((e: Error) => e);
      // Without QEMU's word that the snapshot stopped, the guard must drain on
      // after we exit: cutting the stream then can stall the guest for good.
      this.cleanup(!cleanupErr);
      this.rejectDone(cleanupErr ? new Error(`${err.message}; also, restoring QEMU settings failed: ${cleanupErr.message}`) : err);
    })();
    return this.finishing;
  }

  // QEMU refuses capability changes until the migration has fully stopped.
  // By default the snapshot is left to finish into the drain (see drain()):
  // in QEMU 7.2 migrate_cancel can leave a vCPU of a busy guest blocked for good.
  private async cancelAndRestore(): Promise<void> {
    if (this.qmp.closed) throw new Error('the QMP connection is gone');
    const bounded = { timeoutMs: 10_000 };
    const status = () => this.boundedStatus(bounded.timeoutMs);
    let now = await status();
    if (this.opts.abortBy === 'cancel' && ACTIVE_STATES.has(now)) await this.qmp.execute('migrate_cancel', undefined, bounded);
    const until = Date.now() + (this.opts.abortWaitMs ?? 300_000);
    while (ACTIVE_STATES.has(now) && Date.now() < until) {
      await sleep(this.opts.pollMs ?? 100);
      now = await status();
    }
    if (ACTIVE_STATES.has(now)) throw new Error(`QEMU's snapshot is still '${now}'; capabilities left as they are`);
    if (now !== 'completed') this.releaseForgotten(true);
    await restore(this.qmp, this.changes);
  }

  // QEMU's migration status, waited for at most timeoutMs. QMP unanswered: on
  // QEMU < 8.1 its main thread may sleep on a page that a dead migration thread
  // will never save (see capture/qemu-uffd.ts), so that is released and QEMU
  // asked once more. Only for a snapshot that is over or being given up.
  private async boundedStatus(timeoutMs: number): Promise<string> {
    const query = async () => (await this.qmp.execute<MigrationInfo>('query-migrate', undefined, { timeoutMs })).status ?? 'none';
    return query().catch((e: Error) => (this.releaseForgotten(false) ? query() : Promise.reject(e)));
  }

  // QEMU < 8.1 leaves guest RAM write-protected when its snapshot ends other
  // than completed; undo that (capture/qemu-uffd.ts). `over`: QEMU said the
  // snapshot stopped, so its ranges are also unregistered. Returns whether it ran.
  private releaseForgotten(over: boolean): boolean {
    if (this.qemuPid === null || !forgetsWriteProtection(this.qmp.qemuVersion)) return false;
    const r = releaseWriteProtection(this.qemuPid, over);
    if (r.ranges) process.stderr.write(`bgsnap-capture: QEMU ${this.qmp.qemuVersion} left ${r.ranges} guest RAM range(s) write-protected after its snapshot ended early; released them\n`);
    return true;
  }

  // `over`: QEMU confirmed its snapshot stopped, so the guard may go. Else the
  // guard's stdin closes without "done" and it drains QEMU's stream to its end
  // and puts the settings back, whether or not we are still alive.
  private cleanup(over: boolean): void {
    this.guard?.stdin?.end(over ? 'done\n' : undefined);
    if (over) this.dropListenGuard();
    else this.listenGuard?.stdin?.end(); // QEMU may still connect: the guard takes it
    this.settled = true;
    this.server.close();
    this.conn?.unref(); // a draining socket closes when QEMU is done with it
    if (!this.opts.qmp) this.qmp.close();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

// Discards the rest of QEMU's stream. We never cut the connection while QEMU
// may still write: in QEMU 7.2, when a background snapshot stops early (broken
// socket or migrate_cancel) while a vCPU waits for a not-yet-saved page, the
// write-protect userfaultfd is never released and that vCPU stays blocked for
// good (seen with the test guest: status 'running', no progress, uffd still
// open). While the socket is full, QMP may not answer either.
function drain(conn: net.Socket, from: PassThrough | null): void {
  if (from) conn.unpipe(from); // before `from` is destroyed, whose close would pause conn
  conn.on('data', () => undefined);
  conn.on('error', () => undefined);
  conn.resume();
}

// Starts capture/qemu-guard.js with a copy of QEMU's socket, so that even a
// capture killed with SIGKILL never cuts QEMU's stream (see that file).
// `socket`: QEMU's connection ('conn'), or the listening socket's fd ('listen').
// A libvirt domain's QEMU gets our connection by name (capture/libvirt-qmp.ts):
// the guard is told the name, to take it back if `migrate` never came, and
// our private socket folder (`dir`), which it removes once it is done.
function spawnGuard(socket: net.Socket | number, qmp: QmpTransport, changes: Changes, mode: 'conn' | 'listen', qemuPid: number | null, dir: string): ChildProcess {
  const restore = { capabilities: [...changes.capabilities], maxBandwidth: changes.maxBandwidth, qemuVersion: qmp.qemuVersion, qemuPid, socketDir: dir };
  const fdName = 'domain' in qmp.target ? [MIGRATION_FD] : [];
  const guard = spawn(process.execPath, [path.join(__dirname, 'qemu-guard.js'), JSON.stringify(qmp.target), JSON.stringify(restore), mode, ...fdName], {
    stdio: ['pipe', 'ignore', 'inherit', socket],
  });
  guard.stdin!.on('error', () => undefined);
  guard.unref();
  (guard.stdin as net.Socket & { unref?: () => void }).unref?.();
  return guard;
}

// Node keeps a listening Unix socket's fd on its handle; a copy of it in the
// guard keeps the socket (and a connection QEMU queued on it) alive after us.
function listeningFd(server: net.Server): number {
  const fd = (server as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('cannot find the migration socket\'s file descriptor for its guard');
  return fd;
}

function resultOf(info: MigrationInfo, runStateAfter: string): QemuSnapshotResult {
  const num = (v: unknown) => (typeof v === 'number' ? v : null);
  return {
    downtimeMs: num(info.downtime),
    totalTimeMs: num(info['total-time']),
    setupTimeMs: num(info['setup-time']),
    runStateAfter,
    info,
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
