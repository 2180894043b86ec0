// The disks of a whole-VM snapshot. With the VM stopped, one QMP `transaction`
// starts a blockdev-backup (sync=full) of every chosen drive into an NBD node
// that this process serves (capture/nbd-target.ts) on a private 0700 socket;
// the background snapshot started next takes RAM and devices, after which the
// guest runs again (resumeOnceSnapshotRuns), and copy-before-write keeps each
// disk copy at the instant while the guest writes on.
//
// What we add to QEMU (target nodes, jobs) is recorded before it is added, and
// cleanup() takes all of it away again: jobs cancelled, nodes deleted, the VM
// running again if we stopped it. The drives and their backing chains are never
// changed: a backup only reads them.
import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import type { BlockInfo, PageBatch } from '../format/events';
import { NbdTargetServer } from './nbd-target';
import type { QmpTransport } from './qmp-transport';

export const DISK_BLOCK_PREFIX = 'disk:';
const MAX_BATCH_PAGES = 65536;
// QEMU's own stop inside the background snapshot drains block I/O: it waits
// for every backup write in flight to our NBD target (by default up to 64
// writes of up to 1 MiB), with the guest paused; that was most of the pause
// (bench/disk-pause.ts). So the backups start throttled and run at full speed
// once the guest runs again: while it is paused little is copied, QEMU's stop
// has few backup writes to wait for, and the host's CPUs go to QEMU, not to
// our NBD server. Copy-before-write is not throttled: it keeps the instant
// whatever the job's speed.
// Not slower: QEMU's block-copy sleeps out its rate limit for (bytes of the
// chunk it just sent) / speed, up to 1 MiB per chunk (2 MiB for qcow2's 2 MiB
// clusters), in a sleep that a cancel or a new speed wakes only if the kick
// lands while it sleeps; one that lands while it waits for the source's block
// status is lost (block-copy.c, QEMU 10.0). At the 1 byte/s we used, that
// sleep was ~21 hours, and QEMU's main loop waited it out in a drain: a
// capture killed with SIGKILL before it lifted the limit left QEMU 10 stuck
// (its main loop in aio_poll with a 77193 s timeout, QMP unanswered; 1 in 15
// SIGKILL runs). At 4 MiB/s the longest such sleep is 0.5 s.
const HELD_SPEED = 4 << 20;
// Our NBD server dies with us, even on SIGKILL, while copy-before-write still
// sends QEMU's guest writes through it: with a dead target, QEMU 7.2 and 10.0
// fail the guest's write (on-cbw-error=break-guest-write, which blockdev-backup
// cannot change; seen: "disk write failed: Input/output error" in the guest).
// So the NBD node reconnects: for this many seconds after losing its server,
// QEMU holds its requests and retries them on a new connection (nbd.c:
// reconnect-delay; its connect thread retries after 1, 2, 4 s) instead of
// failing them, and our disk guard takes over the socket path at once as a
// stand-in that accepts every write and throws it away, until it has taken
// the jobs and nodes away. A connection handed over as a file descriptor
// (libvirt) cannot be reopened: there the guard itself is the server QEMU
// holds, relaying to us (capture/nbd-relay.ts), and answers for us once we die.
export const RECONNECT_DELAY_S = 10;

export interface DiskPlan {
  id: string; // the drive's -drive id, query-block's device
  node: string; // its root node
  size: number; // virtual size in bytes
  file: string; // image file name, for messages
  target: string; // the NBD node we add
  job: string; // the backup job we start
}

interface QueryBlock {
  device: string;
  qdev?: string; // "/machine/peripheral/ID/virtio-backend" for a -device with id=ID
  inserted?: { ro: boolean; 'node-name': string; file: string; image: { 'virtual-size': number } };
}

// `select`: undefined = every writable drive; [] = none; else exactly these ids.
export async function planDisks(qmp: QmpTransport, select?: string[]): Promise<DiskPlan[]> {
  const blocks = await namedDrives(qmp);
  const writable = blocks.filter((b) => b.device && b.inserted && !b.inserted.ro);
  for (const id of select ?? []) {
    const b = blocks.find((x) => x.device === id);
    if (!b) throw new Error(`no drive "${id}" in this VM (drives: ${blocks.map((x) => x.device).filter(Boolean).join(', ') || 'none'})`);
    if (!b.inserted) throw new Error(`drive "${id}" has no medium`);
    if (b.inserted.ro) throw new Error(`drive "${id}" is read-only; only writable drives are captured`);
  }
  const chosen = select ? writable.filter((b) => select.includes(b.device)) : writable;
  const jobs = await qmp.execute<{ device: string }[]>('query-block-jobs');
  // libvirt names its own jobs KIND-TARGET-NODE ("backup-vda-libvirt-1-format").
  const busy = chosen.filter((b) => jobs.some((j) => j.device === b.device || j.device.includes(b.inserted!['node-name']) || j.device.includes(`-${b.device}-`)));
  if (busy.length) throw new Error(`drive ${busy.map((b) => `"${b.device}"`).join(', ')} already has a block job; wait for it, pick drives with --disk ID, or leave the drives out with --no-disks`);
  return chosen.map((b, i) => ({
    id: b.device, node: b.inserted!['node-name'], size: b.inserted!.image['virtual-size'], file: b.inserted!.file,
    target: `bgsnap-target-${process.pid}-${i}`, job: `bgsnap-backup-${process.pid}-${i}`,
  }));
}

// A drive defined with -blockdev and -device (libvirt always does so) has no
// drive name in query-block, only its device's qdev path: it is named after
// the device's id, or what the transport calls it (libvirt: the target, "vda").
async function namedDrives(qmp: QmpTransport): Promise<QueryBlock[]> {
  const blocks = await qmp.execute<QueryBlock[]>('query-block');
  const names = qmp.driveNames ? await qmp.driveNames() : new Map<string, string>();
  return blocks.map((b) => {
    const alias = /^\/machine\/peripheral\/([^/]+)/.exec(b.qdev ?? '')?.[1];
    return b.device || !alias ? b : { ...b, device: names.get(alias) ?? alias };
  });
}

export function diskBlocks(plans: DiskPlan[], pageSize: number): BlockInfo[] {
  return plans.map((p) => ({ name: DISK_BLOCK_PREFIX + p.id, length: Math.ceil(p.size / pageSize) * pageSize, address: 0 }));
}

// One NBD write as page batches of `block`. Backup writes whole clusters (64 KiB
// or the target's cluster size), so only the disk's last page can be partial; it
// is padded with zeroes. All-zero pages become zero records: holes in the image.
export function writeToBatches(block: number, offset: number, length: number, data: Buffer | null, pageSize: number, diskSize: number): PageBatch[] {
  const end = offset + length;
  if (offset % pageSize !== 0 || (end % pageSize !== 0 && end !== diskSize)) {
    throw new Error(`write of ${length} bytes at ${offset} is not aligned to ${pageSize}-byte pages`);
  }
  const out: PageBatch[] = [];
  const pages = Math.ceil(length / pageSize);
  for (let first = 0; first < pages; first += MAX_BATCH_PAGES) {
    const n = Math.min(MAX_BATCH_PAGES, pages - first);
    const index = new Uint32Array(n);
    const zero = new Uint8Array(n);
    const parts: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      index[i] = offset / pageSize + first + i;
      const page = data ? pageOf(data, (first + i) * pageSize, pageSize) : null;
      if (!page || isZero(page)) zero[i] = 1;
      else parts.push(page);
    }
    out.push({ block, index, zero, data: Buffer.concat(parts) });
  }
  return out;
}

function pageOf(data: Buffer, at: number, pageSize: number): Buffer {
  const p = data.subarray(at, at + pageSize);
  if (p.length === pageSize) return p;
  const padded = Buffer.alloc(pageSize);
  p.copy(padded);
  return padded;
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8) if (b.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

export class DiskCapture {
  readonly server: NbdTargetServer;
  private addedNodes: string[] = [];
  private startedJobs: string[] = [];
  private stoppedVm = false;
  private eventsFrom = 0;
  private guard: ChildProcess | null = null;
  private cleaning: Promise<void> | null = null;
  pauseStartedAt = 0;
  private resuming: Promise<void> | null = null;
  copyStartedAt = 0; // the transaction: the disks' instant
  copyMs: number | null = null; // until every backup completed
  // When each step of the pause ended (Date.now()), for --stats' pauseSteps.
  readonly marks: Record<string, number> = {};

  constructor(
    private readonly qmp: QmpTransport,
    readonly plans: DiskPlan[],
    private readonly dir: string,
    onWrite: (plan: DiskPlan, offset: number, length: number, data: Buffer | null) => Promise<void>,
  ) {
    this.server = new NbdTargetServer(plans.map((p) => ({ name: p.id, size: p.size })),
      (name, off, len, data) => onWrite(plans.find((p) => p.id === name)!, off, len, data));
  }

  get socketPath(): string {
    return path.join(this.dir, 'disks.sock');
  }

  // Tells the guard (capture/qemu-disk-guard.ts) what to undo if we die,
  // before doing it.
  private tellGuard(m: Record<string, unknown>): void {
    this.guard?.stdin?.write(JSON.stringify(m) + '\n');
  }

  // What can be done with the guest running: the guard, our NBD server and
  // the target nodes. Undo with cleanup() on any error.
  async prepare(): Promise<void> {
    this.guard = spawnDiskGuard(JSON.stringify(this.qmp.target));
    this.tellGuard({ socket: this.socketPath }); // removed by the guard if we die
    await this.server.listen(this.socketPath);
    const serving = 'domain' in this.qmp.target ? await this.relayThroughGuard() : this.socketPath;
    for (const p of this.plans) {
      this.addedNodes.push(p.target);
      this.tellGuard({ node: p.target });
      const to = await this.qmp.reachSocket(serving, p.target);
      const reopens = to.address.type === 'unix';
      if (reopens) this.tellGuard({ standIn: { path: this.socketPath, export: { name: p.id, size: p.size } } });
      const args = { driver: 'nbd', 'node-name': p.target, export: p.id, server: to.address, ...(reopens ? { 'reconnect-delay': RECONNECT_DELAY_S } : {}) };
      await this.qmp.execute('blockdev-add', args).catch(async (e: Error) => (await to.release(), Promise.reject(e)));
    }
  }

  // libvirt passes QEMU a connected fd, which QEMU cannot reopen if its server
  // dies: so QEMU gets a connection to the guard, which outlives us.
  private async relayThroughGuard(): Promise<string> {
    const relayPath = path.join(this.dir, 'relay.sock');
    this.tellGuard({ relay: { path: relayPath, upstream: this.socketPath, exports: this.plans.map((p) => ({ name: p.id, size: p.size })) } });
    const said = await firstLine(this.guard!);
    if (said !== 'relaying') throw new Error(`the disk guard cannot serve QEMU's NBD connections: ${said}`);
    return relayPath;
  }

  // After prepare(): stops the VM and starts the backups; the VM is left
  // stopped for the background snapshot. Undo with cleanup() on any error.
  async start(runState: string): Promise<void> {
    if (runState === 'running') {
      this.pauseStartedAt = Date.now();
      this.stoppedVm = true;
      this.tellGuard({ stopped: true });
      await this.qmp.execute('stop');
      this.marks.stopped = Date.now();
    }
    this.eventsFrom = this.qmp.events.length;
    this.startedJobs = this.plans.map((p) => p.job);
    for (const p of this.plans) this.tellGuard({ job: p.job, export: p.id });
    this.copyStartedAt = Date.now();
    await this.qmp.execute('transaction', {
      actions: this.plans.map((p) => ({ type: 'blockdev-backup', data: { device: p.node, target: p.target, sync: 'full', 'job-id': p.job, speed: HELD_SPEED } })),
    });
    this.marks.transaction = Date.now();
  }

  // True while the guest is paused by us: from our `stop` until it runs again.
  get holdingGuest(): boolean {
    return this.stoppedVm && this.marks.resumed === undefined;
  }

  // Called once QEMU's first RAM page reached us. QEMU 7.2 restarts the guest
  // itself (bg_migration_vm_start_bh: vm_start()); 9.0 and later put back the
  // state they found (vm_resume(vm_old_state)): paused, since we stopped it, so
  // it would stay paused to the end. QEMU writes RAM pages only after it saved
  // the devices, write-protected RAM and scheduled that bottom half; the
  // query-status round trip lets the main loop run the bottom half before our
  // `cont` (a `cont` ahead of it would be undone: its vm_resume(paused) marks
  // the VM paused with its vCPUs running).
  // Then the backups, held back until now, run at full speed.
  resumeOnceSnapshotRuns(): Promise<void> {
    this.resuming ??= (async () => {
      const { status } = await this.qmp.execute<{ status: string }>('query-status');
      if (status === 'paused' && this.stoppedVm) await this.qmp.execute('cont');
      this.marks.resumed = Date.now();
      for (const job of this.startedJobs) await this.qmp.execute('block-job-set-speed', { device: job, speed: 0 });
    })();
    return this.resuming;
  }

  // Resolves when every backup completed; rejects on the first that failed.
  async finished(pollMs = 100): Promise<void> {
    const left = new Set(this.startedJobs);
    while (left.size) {
      for (const ev of this.qmp.events.slice(this.eventsFrom)) {
        const d = ev.data as { device?: string; error?: string } | undefined;
        if (!d?.device || !left.has(d.device)) continue;
        if (ev.event === 'BLOCK_JOB_CANCELLED') throw new Error(`backup job ${d.device} was cancelled`);
        if (ev.event !== 'BLOCK_JOB_COMPLETED') continue;
        if (d.error) throw new Error(`backup of a drive failed in QEMU: ${d.error}${this.server.error ? ` (${this.server.error.message})` : ''}`);
        left.delete(d.device);
      }
      if (this.qmp.closed) throw new Error('lost the QMP connection while disks were copied');
      if (left.size) await sleep(pollMs);
    }
    this.copyMs = Date.now() - this.copyStartedAt;
  }

  // Undoes start(), whatever part of it ran. Callers racing (a signal's abort
  // and the failed stream's) share one run: two would delete nodes and close
  // the NBD target under each other, and the first to end would let us exit
  // with the other's work half done.
  cleanup(): Promise<void> {
    this.cleaning ??= this.undo();
    return this.cleaning;
  }

  private async undo(): Promise<void> {
    this.server.discard(); // jobs still running finish their writes without error (see discard())
    const errors: string[] = [];
    const tryDo = async (what: string, f: () => Promise<unknown>) => f().catch((e: Error) => void errors.push(`${what}: ${e.message}`));
    await tryDo('cancelling backup jobs', () => cancelJobs(this.qmp, this.startedJobs));
    for (const n of this.addedNodes) await tryDo(`removing node ${n}`, () => deleteNode(this.qmp, n));
    this.addedNodes = [];
    this.startedJobs = [];
    if (this.stoppedVm) await tryDo('resuming the VM', () => resumeIfPaused(this.qmp));
    this.stoppedVm = false;
    this.server.close();
    if (!errors.length) this.guard?.stdin?.end('done\n'); // else the guard tries once more
    else this.guard?.stdin?.end();
    if (errors.length) throw new Error(`cleaning up the disk capture: ${errors.join('; ')}`);
  }

}

function spawnDiskGuard(target: string): ChildProcess {
  const guard = spawn(process.execPath, [path.join(__dirname, 'qemu-disk-guard.js'), target], { stdio: ['pipe', 'pipe', 'inherit'] });
  guard.stdin!.on('error', () => undefined);
  guard.unref();
  (guard.stdin as unknown as { unref?: () => void }).unref?.();
  (guard.stdout as unknown as { unref?: () => void }).unref?.();
  return guard;
}

// The guard's answer to a request on its stdin, or why there is none.
function firstLine(guard: ChildProcess): Promise<string> {
  return new Promise((resolve) => {
    let out = '';
    const onData = (c: Buffer) => {
      out += c.toString();
      if (out.includes('\n')) finish(out.slice(0, out.indexOf('\n')));
    };
    const onExit = (code: number | null, sig: string | null) => finish(`it exited (${sig ?? `exit ${code}`})`);
    const finish = (line: string) => {
      guard.stdout!.off('data', onData);
      guard.off('exit', onExit);
      resolve(line);
    };
    guard.stdout!.on('data', onData);
    guard.once('exit', onExit);
  });
}

// Used by cleanup and by capture/qemu-guard.ts. A job cancelled with force
// stops at once; we wait until it is gone so its target node can be deleted.
export async function cancelJobs(qmp: QmpTransport, jobs: string[]): Promise<void> {
  for (let i = 0; i < 300; i++) {
    const live = (await qmp.execute<{ device: string }[]>('query-block-jobs')).filter((j) => jobs.includes(j.device));
    if (!live.length) return;
    for (const j of live) await qmp.execute('block-job-cancel', { device: j.device, force: true }).catch(() => undefined);
    await sleep(100);
  }
  throw new Error(`backup jobs ${jobs.join(', ')} did not go away`);
}

export async function deleteNode(qmp: QmpTransport, node: string): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      return void (await qmp.execute('blockdev-del', { 'node-name': node }));
    } catch (e) {
      const msg = (e as Error).message;
      if (/cannot find|not found|no such/i.test(msg)) return; // never added, or already gone
      if (i >= 50) throw e;
      await sleep(100); // a job that just ended may still hold it
    }
  }
}

export async function resumeIfPaused(qmp: QmpTransport): Promise<void> {
  const { status } = await qmp.execute<{ status: string }>('query-status');
  if (status === 'paused') await qmp.execute('cont');
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
