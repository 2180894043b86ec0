// Turns a running QEMU background snapshot into stream events: QEMU's raw
// migration stream is decoded as it arrives and re-emitted as bgsnap events; the
// header's time is the snapshot point (when migrate was issued), not decode time.
// With disks (capture/qemu-disks.ts), each drive becomes one more block after
// QEMU's RAM blocks, named "disk:ID", and what QEMU's backup jobs write arrives
// as page batches of it, interleaved with the RAM (format/SPEC.md, "Disks").
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import type { BlockInfo, PageBatch, StreamEvent } from '../format/events';
import { QemuDecoder } from '../format/qemu';
import { EventQueue } from './event-queue';
import { DiskCapture, diskBlocks, planDisks, writeToBatches, type DiskPlan } from './qemu-disks';
import {
  openQemuSnapshot, readCapabilities, refuseIfMigrating, refuseIncompatible, runState,
  type QemuSnapshot, type QemuSnapshotOptions, type QemuSnapshotResult,
} from './qemu-source';
import { qemuPidOf, refuseUnlessReleasable } from './qemu-uffd';
import { connectTransport, type QmpTarget, type QmpTransport } from './qmp-transport';
import type { CaptureSource } from './source';

export interface QemuCaptureOptions extends QemuSnapshotOptions {
  disks?: string[]; // drive ids; undefined = every writable drive, [] = none
}

export interface QemuCaptureStats {
  source: 'qemu';
  qemuVersion: string;
  qemuStreamBytes: number;
  downtimeMs: number | null; // QEMU's own figure: its stop inside the background snapshot
  pauseMs: number | null; // with disks: from our `stop` until the guest was seen running again (upper bound)
  // With disks: where the pause went, ms from the step before: stop, transaction
  // (backups started), migrate (QEMU answered; its own setup and stop follow),
  // firstPage (QEMU's first RAM page reached us), resumed (our `cont` done on
  // QEMU >= 9, query-status said running on 7.2), running (the poll saw it).
  pauseSteps: Record<string, number> | null;
  totalTimeMs: number | null;
  diskCopyMs: number | null; // from the disks' instant until every backup job completed
  runStateAfter: string;
  disks: { id: string; size: number; file: string }[];
}

export const DISKS_STATE = 'qemu.disks';
const PAUSE_HOLD = 64 << 20;

// `target`: a QMP socket's path, or where else QMP is (a libvirt domain).
export async function captureQemu(target: string | QmpTarget, opts: QemuCaptureOptions = {}): Promise<CaptureSource<QemuCaptureStats>> {
  const qmp = await connectTransport(typeof target === 'string' ? { qmp: target } : target, { timeoutMs: opts.connectTimeoutMs });
  const queue = new EventQueue();
  const pending: PageBatch[] = []; // disk writes held in memory (see onWrite)
  let heldBytes = 0;
  const flushHeld = async () => {
    for (const b of pending.splice(0)) await queue.push({ type: 'pages', batch: { ...b, block: b.block + firstDiskBlock } });
    heldBytes = 0;
  };
  let blocksOut = false;
  let firstDiskBlock = 0;
  let disks: DiskCapture | null = null;
  let dir: string | null = null;
  let snap: QemuSnapshot;
  let pauseMs: number | null = null;
  try {
    // Every refusal comes before anything in QEMU is touched.
    await refuseIfMigrating(qmp);
    refuseIncompatible(await readCapabilities(qmp));
    const qemuPid = await qemuPidOf(qmp);
    refuseUnlessReleasable(qmp.qemuVersion, qemuPid);
    const plans = await planDisks(qmp, opts.disks);
    const before = await runState(qmp);
    if (plans.length) {
      dir = fs.mkdtempSync(path.join(opts.tmpRoot ?? os.tmpdir(), 'bgsnap-disks-'));
      fs.chmodSync(dir, 0o700); // the NBD socket carries the disks' contents
      const onWrite = async (p: DiskPlan, off: number, len: number, data: Buffer | null) => {
        // Numbered from the first disk block, which is known only once QEMU's
        // RAM block list went by; see onEvent.
        const batches = writeToBatches(plans.indexOf(p), off, len, data, 4096, p.size);
        // Held in memory and answered at once (1) before QEMU's RAM block list
        // went by, without bound: making the backup wait there deadlocks QEMU
        // 7.2 (seen in the vm-disks test): the snapshot's own stop drains block
        // I/O before the list is flushed to us; the backup runs that long only
        // while QEMU sets up; (2) while the guest is paused, up to PAUSE_HOLD:
        // that stop waits for every backup write in flight, so each one we make
        // wait for the stream lengthens the pause.
        if (!blocksOut || (disks!.holdingGuest && heldBytes + len <= PAUSE_HOLD)) {
          heldBytes += len;
          return void pending.push(...batches);
        }
        await flushHeld();
        for (const b of batches) await queue.push({ type: 'pages', batch: { ...b, block: b.block + firstDiskBlock } });
      };
      disks = new DiskCapture(qmp, plans, dir, onWrite);
      await disks.prepare();
    }
    const d = disks;
    snap = await openQemuSnapshot(qmp.path, { ...opts, qmp, qemuPid, beforeMigrate: d ? () => d.start(before) : undefined });
    if (disks) disks.marks.migrate = Date.now();
  } catch (err) {
    await disks?.cleanup().catch(() => undefined);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
    qmp.close();
    throw err;
  }
  const dec = new QemuDecoder();
  let result: QemuSnapshotResult | undefined;
  const plans = disks?.plans ?? [];
  const diskDone = disks ? disks.finished() : Promise.resolve();
  // Measured beside the stream, never before reading it: until its stream is
  // read QEMU may not get to resuming the guest (seen: a deadlock).
  // The tighter of two upper bounds: the poll saw it running, or our `cont`
  // (QEMU >= 9) / query-status (7.2) said so (DiskCapture.marks.resumed).
  const pauseKnown = disks?.pauseStartedAt ? pauseUntilRunning(qmp, disks.pauseStartedAt).then((v) => {
    const resumed = disks!.marks.resumed === undefined ? null : disks!.marks.resumed - disks!.pauseStartedAt;
    pauseMs = v === null ? resumed : resumed === null ? v : Math.min(v, resumed);
  }, () => undefined) : Promise.resolve();
  diskDone.catch((e: Error) => void snap.abort(e.message));

  let resumed: Promise<Error | null> = Promise.resolve(null);
  const onEvent = async (ev: StreamEvent): Promise<void> => {
    // Not awaited: QEMU may need its stream read on to answer QMP.
    if (ev.type === 'pages' && disks) {
      disks.marks.firstPage ??= Date.now();
      // An error is thrown at the end, not left an unhandled rejection now.
      resumed = disks.resumeOnceSnapshotRuns().then(() => null, (e: Error) => {
        const err = new Error(`resuming the VM and the disk copy after the snapshot started: ${e.message}`);
        void snap.abort(err.message); // the backups may never finish: give up now
        return err;
      });
    }
    if (ev.type === 'blocks') {
      firstDiskBlock = ev.blocks.length;
      const blocks: BlockInfo[] = [...ev.blocks, ...diskBlocks(plans, 4096)];
      await queue.push({ type: 'blocks', blocks });
      if (plans.length) await queue.push({ type: 'state', state: disksState(plans, firstDiskBlock) });
      blocksOut = true;
      if (!disks?.holdingGuest) await flushHeld();
      return;
    }
    if (ev.type === 'end') {
      await diskDone; // every backup job completed: each disk copy is whole
      await flushHeld();
      const notResumed = await resumed;
      if (notResumed) throw notResumed;
      await pauseKnown;
      await disks?.cleanup();
    }
    await queue.push(ev);
  };

  const produce = async (): Promise<void> => {
    try {
      for await (const ev of decodeQemu(snap.stream, dec, snap.startedAt, async () => void (result = await snap.done))) await onEvent(ev);
      queue.close();
    } catch (e) {
      disks?.server.discard();
      await snap.abort((e as Error).message);
      await disks?.cleanup().catch(() => undefined);
      // QEMU's own failure (if any) says more than the truncated stream it caused.
      queue.fail(await snap.done.then(() => e as Error, (qe: Error) => qe));
    } finally {
      qmp.close();
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    }
  };
  void produce();
  return {
    events: queue,
    abort: async (reason: string) => {
      disks?.server.discard();
      queue.fail(new Error(`snapshot aborted: ${reason}`)); // also frees NBD writes waiting for room: QEMU gets EIO, not a hang
      await snap.abort(reason);
      await disks?.cleanup().catch(() => undefined);
    },
    stats: () => ({
      source: 'qemu', qemuVersion: snap.qemuVersion, qemuStreamBytes: dec.bytesIn,
      downtimeMs: result?.downtimeMs ?? null, pauseMs, pauseSteps: disks && pauseMs !== null ? pauseSteps(disks, pauseMs) : null, totalTimeMs: result?.totalTimeMs ?? null, diskCopyMs: disks?.copyMs ?? null, runStateAfter: result?.runStateAfter ?? '',
      disks: plans.map((p) => ({ id: p.id, size: p.size, file: p.file })),
    }),
  };
}

function pauseSteps(disks: DiskCapture, pauseMs: number): Record<string, number> {
  const m: Record<string, number> = { ...disks.marks, running: disks.pauseStartedAt + pauseMs };
  const steps: Record<string, number> = {};
  let last = disks.pauseStartedAt;
  for (const k of ['stopped', 'transaction', 'migrate', 'firstPage', 'resumed', 'running'] as const) {
    if (m[k] === undefined) continue;
    steps[k] = m[k] - last;
    last = m[k];
  }
  return steps;
}

function disksState(plans: DiskPlan[], first: number): { kind: string; data: Buffer } {
  const list = plans.map((p, i) => ({ id: p.id, block: first + i, size: p.size, file: p.file }));
  return { kind: DISKS_STATE, data: Buffer.from(JSON.stringify(list)) };
}

// Polled from our `stop` on, so the figure is an upper bound that does not wait
// for the stream: QEMU 7.2 restarts the guest itself, later versions once we
// sent `cont` (DiskCapture.resumeOnceSnapshotRuns).
async function pauseUntilRunning(qmp: QmpTransport, since: number): Promise<number | null> {
  for (const until = since + 120_000; Date.now() < until;) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status === 'running') return Date.now() - since;
    await new Promise((r) => setTimeout(r, 10)); // not faster: it would take CPU from QEMU in the pause
  }
  return null; // not seen running: no figure, but the snapshot goes on (cleanup resumes a paused VM)
}

// The END event is held back until QEMU confirmed success and its settings were
// put back, so a stream that carries END always means a finished, clean snapshot.
async function* decodeQemu(stream: Readable, dec: QemuDecoder, startedAt: number, done: () => Promise<void>): AsyncGenerator<StreamEvent> {
  for await (const chunk of stream) {
    for (const ev of dec.push(chunk as Buffer)) {
      if (ev.type === 'header') ev.header.created = startedAt;
      yield ev;
    }
  }
  for (const ev of dec.finish()) {
    if (ev.type === 'end') await done();
    yield ev;
  }
}
