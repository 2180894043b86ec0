// Page batches on their way to the image's data file. The addon writes them on
// a pool thread (io/native/pagewrite.cc), several per call, in the order they
// arrived, so the last version of a page wins; meanwhile the decoder goes on
// with the next frames. Up to QUEUE_BYTES may wait: past that, push() returns a
// promise (backpressure up to the socket or pipe). The first failure (a bad
// frame checksum, a failed write) stops the queue and is thrown by every later
// push() and by idle(); nothing queued after it is written.
import { StreamError } from '../format/errors';
import type { PageBatch } from '../format/events';
import { fileops, type PageJob } from '../io/fileops';
import type { PageCrcs } from './index-store';

const QUEUE_BYTES = 32 << 20;
const ROUND_BYTES = 16 << 20; // per call into the addon

export interface QueuedBatch {
  batch: PageBatch;
  job: PageJob;
  crc: PageCrcs; // where the block's page CRCs are kept
  onDone?: (err?: Error) => void; // called once the batch is written, or with why it was not
  settled?: boolean;
}

export class PageQueue {
  private queue: QueuedBatch[] = [];
  private bytes = 0;
  private round: Promise<void> | undefined; // the call into the addon in flight
  private failure: Error | undefined;
  readonly counts = { pages: 0, duplicates: 0, zeroRecords: 0 };

  // `file`: the data file, named in write errors (the addon says only which call).
  constructor(private readonly file = 'the image data file') {}

  push(q: QueuedBatch): void | Promise<void> {
    this.check();
    this.queue.push(q);
    this.bytes += size(q);
    this.round ??= this.next();
    if (this.bytes >= QUEUE_BYTES) return this.round.then(() => this.check());
  }

  // Resolves once every queued batch is written; throws the first failure.
  async idle(): Promise<void> {
    while (this.round) await this.round;
    this.check();
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private async next(): Promise<void> {
    const take: QueuedBatch[] = [];
    for (let taken = 0; this.queue.length && taken < ROUND_BYTES; ) {
      const q = this.queue.shift()!;
      take.push(q);
      taken += size(q);
      this.bytes -= size(q);
    }
    try {
      const r = await fileops.writePages(take.map((t) => t.job));
      const stop = r.badChecksum >= 0 ? r.badChecksum : r.truncatedAt;
      for (let k = 0; k < (stop < 0 ? take.length : stop); k++) this.settle(take[k]);
      this.counts.duplicates += r.duplicates;
      this.counts.zeroRecords += r.zeroRecords;
      if (r.badChecksum >= 0) {
        const c = take[r.badChecksum].batch.check!;
        throw new StreamError('bgsnap', 'BAD_CHECKSUM', c.offset, `bad checksum in PAGES frame ${c.frame}`);
      }
      // A stream file truncated under its mapping (io/native/mapped_input.cc)
      // ends the stream as a read at its new end would.
      if (r.truncated) throw Object.assign(new Error(`bgsnap stream: ${r.truncated}`), { code: 'TRUNCATED' });
    } catch (e) {
      this.failure ??= named(e as Error & { code?: string }, this.file);
      // The failed batch, and all after it, are never written.
      for (const q of [...take, ...this.queue.splice(0)]) if (!q.settled) q.onDone?.(this.failure);
    }
    this.round = this.queue.length && !this.failure ? this.next() : undefined;
  }

  // The page CRCs the addon computed go to the index (for --verify).
  private settle(q: QueuedBatch): void {
    const { index } = q.batch;
    const { crcs, isData } = q.job;
    for (let i = 0; i < index.length; i++) if (isData[i]) q.crc.set(index[i], crcs[i]);
    this.counts.pages += index.length;
    q.settled = true;
    q.onDone?.();
  }
}

// An errno error from the addon (ENOSPC on a full disk, EIO) with the file's name.
function named(e: Error & { code?: string }, file: string): Error {
  if (!e.code || e.code === 'TRUNCATED' || e instanceof StreamError) return e;
  return Object.assign(new Error(`${file}: ${e.message}`), { code: e.code });
}

function size(q: QueuedBatch): number {
  return q.batch.data.length + q.batch.index.length * 8;
}
