// Turns a running QEMU background snapshot into stream events: QEMU's raw
// migration stream is decoded as it arrives and re-emitted as bgsnap events; the
// header's time is the snapshot point (when migrate was issued), not decode time.
import type { Readable } from 'node:stream';
import type { StreamEvent } from '../format/events';
import { QemuDecoder } from '../format/qemu';
import { openQemuSnapshot, type QemuSnapshotOptions, type QemuSnapshotResult } from './qemu-source';
import type { CaptureSource } from './source';

export interface QemuCaptureStats {
  source: 'qemu';
  qemuVersion: string;
  qemuStreamBytes: number;
  downtimeMs: number | null;
  totalTimeMs: number | null;
  runStateAfter: string;
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

export async function captureQemu(qmpSocket: string, opts: QemuSnapshotOptions = {}): Promise<CaptureSource<QemuCaptureStats>> {
  const snap = await openQemuSnapshot(qmpSocket, opts);
  const dec = new QemuDecoder();
  let result: QemuSnapshotResult | undefined;
  async function* events(): AsyncGenerator<StreamEvent> {
    try {
      yield* decodeQemu(snap.stream, dec, snap.startedAt, async () => void (result = await snap.done));
    } catch (e) {
      await snap.abort((e as Error).message);
      // QEMU's own failure (if any) says more than the truncated stream it caused.
      throw await snap.done.then(() => e, (qe: Error) => qe);
    }
  }
  return {
    events: events(),
    abort: (reason: string) => snap.abort(reason),
    stats: () => ({
      source: 'qemu', qemuVersion: snap.qemuVersion, qemuStreamBytes: dec.bytesIn,
      downtimeMs: result?.downtimeMs ?? null, totalTimeMs: result?.totalTimeMs ?? null, runStateAfter: result?.runStateAfter ?? '',
    }),
  };
}
