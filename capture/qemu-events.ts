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
import { QmpClient } from './qmp';
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
  totalTimeMs: number | null;
  diskCopyMs: number | null; // from the disks' instant until every backup job completed
  runStateAfter: string;
  disks: { id: string; size: number; file: string }[];
}

export const DISKS_STATE = 'qemu.disks';

export async function captureQemu(qmpSocket: string, opts: QemuCaptureOptions = {}): Promise<CaptureSource<QemuCaptureStats>> {
  const qmp = await QmpClient.connect(qmpSocket, { timeoutMs: opts.connectTimeoutMs ?? 5000 });
  const queue = new EventQueue();
  const pending: PageBatch[] = []; // disk writes that came before the block table
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
    const plans = await planDisks(qmp, opts.disks);
    const before = await runState(qmp);
    if (plans.length) {
      dir = fs.mkdtempSync(path.join(opts.tmpRoot ?? os.tmpdir(), 'bgsnap-disks-'));
      fs.chmodSync(dir, 0o700); // the NBD socket carries the disks' contents
      const onWrite = async (p: DiskPlan, off: number, len: number, data: Buffer | null) => {
        // Numbered from the first disk block, which is known only once QEMU's
        // RAM block list went by; see onEvent.
        const batches = writeToBatches(plans.indexOf(p), off, len, data, 4096, p.size);
        // Before QEMU's RAM block list went by, writes are held in memory
        // without bound: making the backup wait here deadlocks QEMU 7.2 (seen
        // in the vm-disks test): the snapshot's own stop drains block I/O
        // before the list is flushed to us. The backup runs that long only
        // while QEMU sets up, so this holds what it copies in that time.
        if (!blocksOut) return void pending.push(...batches);
        for (const b of batches) await queue.push({ type: 'pages', batch: { ...b, block: b.block + firstDiskBlock } });
      };
      disks = new DiskCapture(qmp, plans, dir, onWrite);
      await disks.start(before);
    }
    snap = await openQemuSnapshot(qmpSocket, { ...opts, qmp });
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
  const pauseKnown = disks?.pauseStartedAt ? pauseUntilRunning(qmp, disks.pauseStartedAt).then((v) => void (pauseMs = v), () => undefined) : Promise.resolve();
  diskDone.catch((e: Error) => void snap.abort(e.message));

  let resumed: Promise<Error | null> = Promise.resolve(null);
  const onEvent = async (ev: StreamEvent): Promise<void> => {
    // Not awaited: QEMU may need its stream read on to answer QMP.
    if (ev.type === 'pages' && disks) {
      // An error is thrown at the end, not left an unhandled rejection now.
      resumed = disks.resumeOnceSnapshotRuns().then(() => null, (e: Error) => new Error(`resuming the VM after the snapshot started: ${e.message}`));
    }
    if (ev.type === 'blocks') {
      firstDiskBlock = ev.blocks.length;
      const blocks: BlockInfo[] = [...ev.blocks, ...diskBlocks(plans, 4096)];
      await queue.push({ type: 'blocks', blocks });
      if (plans.length) await queue.push({ type: 'state', state: disksState(plans, firstDiskBlock) });
      blocksOut = true;
      for (const b of pending.splice(0)) await queue.push({ type: 'pages', batch: { ...b, block: b.block + firstDiskBlock } });
      return;
    }
    if (ev.type === 'end') {
      await diskDone; // every backup job completed: each disk copy is whole
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
      downtimeMs: result?.downtimeMs ?? null, pauseMs, totalTimeMs: result?.totalTimeMs ?? null, diskCopyMs: disks?.copyMs ?? null, runStateAfter: result?.runStateAfter ?? '',
      disks: plans.map((p) => ({ id: p.id, size: p.size, file: p.file })),
    }),
  };
}

function disksState(plans: DiskPlan[], first: number): { kind: string; data: Buffer } {
  const list = plans.map((p, i) => ({ id: p.id, block: first + i, size: p.size, file: p.file }));
  return { kind: DISKS_STATE, data: Buffer.from(JSON.stringify(list)) };
}

// Polled from our `stop` on, so the figure is an upper bound that does not wait
// for the stream: QEMU 7.2 restarts the guest itself, later versions once we
// sent `cont` (DiskCapture.resumeOnceSnapshotRuns).
async function pauseUntilRunning(qmp: QmpClient, since: number): Promise<number | null> {
  for (const until = since + 120_000; Date.now() < until;) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status === 'running') return Date.now() - since;
    await new Promise((r) => setTimeout(r, 2));
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
