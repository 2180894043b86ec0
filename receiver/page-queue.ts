// Page batches on their way to the image's data file. The addon writes them on
// a pool thread (io/native/pagewrite.cc), several per call, in the order they
// arrived, so the last version of a page wins, while it checksums the next
// round on another; meanwhile the decoder goes on with the next frames. Up to QUEUE_BYTES may wait: past that, push() returns a
// promise (backpressure up to the socket or pipe). The first failure (a bad
// frame checksum, a failed write) stops the queue and is thrown by every later
// push() and by idle(); nothing queued after it is written.
import { StreamError } from '../format/errors';
import type { PageBatch } from '../format/events';
import { fileops, type PageJob, type PageResult } from '../io/fileops';
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
  private pipeline: Promise<void> | undefined; // rounds in flight (run())
  private waiting: (() => void)[] = []; // push() callers held back, released as each round ends
  private failure: Error | undefined;
  readonly counts = { pages: 0, duplicates: 0, zeroRecords: 0 };

  // `file`: the data file, named in write errors (the addon says only which call).
  constructor(private readonly file = 'the image data file') {}

  push(q: QueuedBatch): void | Promise<void> {
    this.check();
    this.queue.push(q);
    this.bytes += size(q);
    this.pipeline ??= this.run();
    if (this.bytes >= QUEUE_BYTES) return new Promise<void>((r) => this.waiting.push(r)).then(() => this.check());
  }

  // Resolves once every queued batch is written; throws the first failure.
  async idle(): Promise<void> {
    while (this.pipeline) await this.pipeline;
    this.check();
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private startRound(): Round {
    const take: QueuedBatch[] = [];
    for (let taken = 0; this.queue.length && taken < ROUND_BYTES; ) {
      const q = this.queue.shift()!;
      take.push(q);
      taken += size(q);
      this.bytes -= size(q);
    }
    return { take, scan: fileops.writePages(take.map((t) => t.job), 'scan') };
  }

  // Rounds in order: each is checksummed (scan) on one pool thread while the
  // round before it is written on another, so the two overlap; writes stay in
  // stream order, and nothing of a round is written before its checksums passed.
  private async run(): Promise<void> {
    let next: Round | undefined = this.startRound();
    while (next) {
      const cur: Round = next;
      next = undefined;
      try {
        const scan = await cur.scan;
        const stop = scan.badChecksum >= 0 ? scan.badChecksum : scan.truncatedAt;
        if (stop < 0 && this.queue.length) next = this.startRound();
        await this.write(stop < 0 ? cur.take : cur.take.slice(0, stop));
        failed(scan, cur.take);
      } catch (e) {
        this.failure ??= named(e as Error & { code?: string }, this.file);
        await next?.scan.catch(() => undefined); // its worker holds the batch's arrays
        // The failed batch, and all after it, are never written.
        for (const q of [...cur.take, ...(next?.take ?? []), ...this.queue.splice(0)]) if (!q.settled) q.onDone?.(this.failure);
        next = undefined;
      }
      for (const release of this.waiting.splice(0)) release();
      if (!next && !this.failure && this.queue.length) next = this.startRound();
    }
    this.pipeline = undefined;
  }

  private async write(take: QueuedBatch[]): Promise<void> {
    if (!take.length) return;
    const r = await fileops.writePages(take.map((t) => t.job), 'write');
    for (let k = 0; k < (r.truncatedAt < 0 ? take.length : r.truncatedAt); k++) this.settle(take[k]);
    this.counts.duplicates += r.duplicates;
    this.counts.zeroRecords += r.zeroRecords;
    failed(r, take);
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

interface Round {
  take: QueuedBatch[];
  scan: Promise<PageResult>;
}

// Throws what stopped a call into the addon: a bad frame checksum, or a stream
// file truncated under its mapping (io/native/mapped_input.cc), which ends the
// stream as a read at its new end would.
function failed(r: PageResult, take: QueuedBatch[]): void {
  if (r.badChecksum >= 0) {
    const c = take[r.badChecksum].batch.check!;
    throw new StreamError('bgsnap', 'BAD_CHECKSUM', c.offset, `bad checksum in PAGES frame ${c.frame}`);
  }
  if (r.truncated) throw Object.assign(new Error(`bgsnap stream: ${r.truncated}`), { code: 'TRUNCATED' });
}

// An errno error from the addon (ENOSPC on a full disk, EIO) with the file's name.
function named(e: Error & { code?: string }, file: string): Error {
  if (!e.code || e.code === 'TRUNCATED' || e instanceof StreamError) return e;
  return Object.assign(new Error(`${file}: ${e.message}`), { code: e.code });
}

function size(q: QueuedBatch): number {
  return q.batch.data.length + q.batch.index.length * 8;
}
