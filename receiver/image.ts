// Writes a fixed-size image: IMAGE/data holds every block at its own 2 MiB-aligned
// base and every page at base + index * pageSize, so a page sent ten times takes
// its space once (last version wins) and zero pages stay holes; IMAGE/index is the
// LevelDB index (index-store.ts). The image is marked complete only by finish(),
// after the END frame arrived, its totals matched and every page is accounted for.
// Every data page's CRC32 goes to the index (crc/B/C) so --verify can re-check it.
import * as fs from 'node:fs';
import { makePrivateDir, openPrivateFile } from '../io/private-file';
import { promisify } from 'node:util';
import * as path from 'node:path';
import type { BlockInfo, PageBatch, DiscardBatch, StreamEvent, StreamHeader, StreamTotals } from '../format/events';
import { IndexStore, INDEX_VERSION, PageCrcs } from './index-store';
import { BlockPages, CHUNK_PAGES } from './pagemap';
import { PageQueue, type QueuedBatch } from './page-queue';
import type { ReceiveSummary, SnapshotSink } from '../io/sink';
import { ChainWriter } from './chain-image';

export const BLOCK_ALIGN = 2 * 1024 * 1024;

export interface ImageBlock extends BlockInfo {
  base: number; // byte offset of page 0 in the data file
  pages: number;
}

export function layoutBlocks(blocks: BlockInfo[], pageSize: number): ImageBlock[] {
  let base = 0;
  return blocks.map((b) => {
    const ib = { ...b, base, pages: b.length / pageSize };
    base += Math.ceil(b.length / BLOCK_ALIGN) * BLOCK_ALIGN;
    return ib;
  });
}

export interface ImageWriterOptions {
  force?: boolean;
  // Refuse a block table whose data file would exceed this many bytes, before
  // allocating anything for it (the bitmaps alone are 3 bits per page).
  maxImageBytes?: number;
}

const fsync = promisify(fs.fsync);

export function imageSize(blocks: ImageBlock[]): number {
  const last = blocks[blocks.length - 1];
  return last ? last.base + last.length : 0;
}

// Makes a directory's entries (the data file, the image directory) durable.
export async function fsyncDir(dir: string): Promise<void> {
  const fd = fs.openSync(dir, 'r');
  try {
    await fsync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export class ImageWriter implements SnapshotSink {
  private header: StreamHeader | undefined;
  private blocks: ImageBlock[] = [];
  private maps: BlockPages[] = [];
  private crcs: PageCrcs[] = [];
  private totals: StreamTotals | undefined;
  private pending: Promise<void>[] = [];
  private readonly queue: PageQueue;
  private readonly counts = { discardedPages: 0, streamBytes: 0 };
  private readonly started = Date.now();
  private chain: ChainWriter | undefined; // a chain stream: everything after HEADER goes there

  private constructor(
    readonly dir: string, private readonly fd: number, private readonly index: IndexStore, private readonly maxImageBytes: number,
  ) {
    this.queue = new PageQueue(path.join(dir, 'data'));
  }

  static async create(dir: string, opts: ImageWriterOptions = {}): Promise<ImageWriter> {
    if (fs.existsSync(dir) && !opts.force) throw Object.assign(new Error(`image ${dir} already exists (use --force to replace it)`), { code: 'EEXIST' });
    // Private (0700, 0600), never through a symbolic link even with --force. The
    // index directory is made 0700 before LevelDB creates its files in it.
    makePrivateDir(dir, { force: opts.force });
    const fd = openPrivateFile(path.join(dir, 'data'), { read: true });
    makePrivateDir(path.join(dir, 'index'));
    const index = await IndexStore.open(path.join(dir, 'index'), true);
    await index.putJson('status', { status: 'incomplete', reason: 'receiving', updated: Date.now() }, true);
    return new ImageWriter(dir, fd, index, opts.maxImageBytes ?? Number.MAX_SAFE_INTEGER);
  }

  // Bytes of stream consumed so far; the receiver loop keeps it current for stats.
  set streamBytes(n: number) {
    this.counts.streamBytes = n;
  }

  // The image verifies the checksum of page frames itself (PageBatch.check).
  readonly checksPages = true;

  // Any event but pages waits until the queued pages are written, so it sees
  // (and changes) the bitmaps in stream order. A page batch resolves once it is
  // written: the caller may then reuse its buffers (the sink contract).
  write(ev: StreamEvent): void | Promise<void> {
    if (ev.type !== 'pages') return this.queue.idle().then(() => (this.chain || ev.type === 'generation' ? this.applyChain(ev) : this.apply(ev)));
    const q = this.job(ev.batch);
    const written = new Promise<void>((resolve, reject) => (q.onDone = (e) => (e ? reject(e) : resolve())));
    const wait = this.queue.push(q);
    return wait ? Promise.all([wait, written]).then(() => undefined) : written;
  }

  // For batches whose buffers nobody reuses (the decoder's): queued for the
  // addon (page-queue.ts) while decoding goes on; a promise only to slow the
  // input down when the queue is full.
  writeOwned(ev: StreamEvent): void | Promise<void> {
    return ev.type === 'pages' ? this.queue.push(this.job(ev.batch)) : this.write(ev);
  }

  // The first GENERATION makes this image a chain (chain-image.ts).
  private async applyChain(ev: StreamEvent): Promise<void> {
    if (!this.chain) {
      if (!this.header || this.blocks.length) throw new Error('a GENERATION frame must follow the stream header');
      this.chain = new ChainWriter(this.dir, this.fd, this.index, this.header, this.queue, this.maxImageBytes);
      await Promise.all(this.pending); // the single-image format record goes first, then the chain's replaces it
      await this.chain.begin();
    }
    return this.chain.apply(ev);
  }

  private apply(ev: StreamEvent): void {
    switch (ev.type) {
      case 'header': return this.onHeader(ev.header);
      case 'blocks': return this.onBlocks(ev.blocks);
      case 'pages': return; // queued by write()
      case 'discard': return this.onDiscard(ev.batch);
      case 'state': return void this.pending.push(this.index.putBuffer(`state/${ev.state.kind}`, Buffer.from(ev.state.data)));
      case 'end': this.totals = ev.totals;
    }
  }

  private onHeader(h: StreamHeader): void {
    this.header = h;
    this.pending.push(this.index.putJson('header', h));
    this.pending.push(this.index.putJson('format', {
      version: INDEX_VERSION, pageSize: h.pageSize, blockAlign: BLOCK_ALIGN, chunkPages: CHUNK_PAGES, pageChecksum: 'crc32',
    }));
  }

  private onBlocks(blocks: BlockInfo[]): void {
    if (!this.header) throw new Error('block table before the stream header');
    const layout = layoutBlocks(blocks, this.header.pageSize);
    const size = imageSize(layout);
    if (size > this.maxImageBytes) throw new Error(`the block table needs a ${size}-byte image, over the limit of ${this.maxImageBytes} bytes`);
    this.blocks = layout;
    this.maps = this.blocks.map((b) => new BlockPages(b.pages));
    this.crcs = this.blocks.map((b) => new PageCrcs(b.pages));
    fs.ftruncateSync(this.fd, size);
    this.pending.push(this.index.putJson('blocks', this.blocks));
  }

  private block(n: number): { blk: ImageBlock; map: BlockPages; crc: PageCrcs } {
    const blk = this.blocks[n];
    if (!blk) throw new Error(`page batch for block ${n}, but the image has ${this.blocks.length} blocks`);
    return { blk, map: this.maps[n], crc: this.crcs[n] };
  }

  // The per-page work of a batch runs in the file-operations addon on a pool
  // thread (io/native/pagewrite.cc): checksum, zero test, bitmaps, one pwrite per
  // run of consecutive data pages, holes for pages that became zero.
  private job(batch: PageBatch): QueuedBatch {
    if (this.chain) return this.chain.job(batch);
    if (!this.header) throw new Error('page batch before the stream header');
    const { blk, map, crc } = this.block(batch.block);
    const n = batch.index.length;
    const job = {
      fd: this.fd, pageSize: this.header.pageSize, base: blk.base, pages: blk.pages, index: batch.index, zero: batch.zero, data: batch.data,
      present: map.present.bits, dataBits: map.data.bits, discarded: map.discarded.bits, crcs: new Uint32Array(n), isData: new Uint8Array(n),
      check: batch.check && { seed: batch.check.seed, expected: batch.check.expected },
    };
    return { batch, job, crc };
  }

  private onDiscard(batch: DiscardBatch): void {
    const { map } = this.block(batch.block);
    for (const page of batch.index) {
      if (!map.present.get(page)) map.discarded.set(page);
    }
    this.counts.discardedPages += batch.index.length;
  }

  // Why the image cannot be complete, or '' when it can.
  private incompleteReason(): string {
    if (!this.totals) return 'the stream ended without its END frame';
    for (let b = 0; b < this.blocks.length; b++) {
      const m = this.maps[b];
      let missing = 0;
      for (let p = 0; p < m.pages; p++) if (!m.present.get(p) && !m.discarded.get(p)) missing++;
      if (missing) return `${missing} pages of block ${this.blocks[b].name} never arrived`;
    }
    return '';
  }

  async finish(): Promise<ReceiveSummary> {
    if (this.chain) return this.closeChain(undefined);
    const failed = await this.queue.idle().then(() => undefined, (e: Error) => e);
    const reason = failed ? failed.message : this.incompleteReason();
    return this.close(reason === '' ? 'complete' : 'incomplete', reason);
  }

  // A queued page batch that failed (bad checksum, write error, a stream file
  // truncated under its mapping) was decoded before whatever stopped the stream
  // after it: its reason is the first thing that went wrong.
  async fail(reason: string): Promise<ReceiveSummary> {
    if (this.chain) return this.closeChain(reason);
    const failed = await this.queue.idle().then(() => undefined, (e: Error) => e);
    return this.close('incomplete', failed ? failed.message : reason);
  }

  // A chain closes its generation in flight itself; then its records and the
  // chain's status, synced, last.
  private async closeChain(failure: string | undefined): Promise<ReceiveSummary> {
    try {
      const { status, reason } = await this.chain!.end(failure);
      const summary = { ...this.summary(status, reason, 0), ...this.chain!.summary() };
      await this.index.putMany(this.chain!.indexRecords(summary), true);
      await this.putStatus(status, reason);
      return summary;
    } finally {
      fs.closeSync(this.fd);
      await this.index.close();
    }
  }

  // Data first, fsynced; then bitmaps and totals; the status record last, synced,
  // so a crash at any point leaves an image that says incomplete.
  // An incomplete status is written first as well: on a full disk the small
  // record may still fit where the bitmaps do not. The fd and the index are
  // closed whatever fails. fsync runs off the event loop so one image finishing
  // does not stall others received by the same process.
  private async close(status: 'complete' | 'incomplete', reason: string): Promise<ReceiveSummary> {
    try {
      await this.queue.idle().catch(() => undefined); // no page work may still use the fd
      await Promise.allSettled(this.pending);
      if (status === 'incomplete') await this.putStatus(status, reason);
      await Promise.all(this.pending);
      await fsync(this.fd);
      const summary = this.summary(status, reason, fs.fstatSync(this.fd).blocks * 512);
      await fsyncDir(this.dir);
      await this.index.putMany(this.indexRecords(summary), true);
      await this.putStatus(status, reason);
      return summary;
    } finally {
      fs.closeSync(this.fd);
      await this.index.close();
    }
  }

  private putStatus(status: 'complete' | 'incomplete', reason: string): Promise<void> {
    return this.index.putJson('status', { status, reason, updated: Date.now() }, true);
  }

  private indexRecords(summary: ReceiveSummary): [string, Buffer][] {
    const records: [string, Buffer][] = [];
    this.maps.forEach((m, b) => {
      for (let c = 0; c < m.chunks(); c++) {
        records.push([`bitmap/${b}/${c}`, m.encodeChunk(c)]);
        const crcs = this.crcs[b].encodeChunk(c);
        if (crcs) records.push([`crc/${b}/${c}`, crcs]);
      }
    });
    if (this.totals) records.push(['totals', Buffer.from(JSON.stringify(this.totals))]);
    records.push(['stats', Buffer.from(JSON.stringify(summary))]);
    return records;
  }

  private summary(status: 'complete' | 'incomplete', reason: string, imageBytes: number): ReceiveSummary {
    let unique = 0;
    let dataPages = 0;
    for (const m of this.maps) {
      unique += m.present.count();
      dataPages += m.data.count();
    }
    return {
      status, reason, image: this.dir, snapshotId: this.header?.snapshotId ?? '', source: this.header?.source ?? '',
      pagesReceived: this.queue.counts.pages, uniquePages: unique, dataPages, zeroPages: unique - dataPages,
      duplicatePages: this.queue.counts.duplicates, discardedPages: this.counts.discardedPages,
      streamBytes: this.counts.streamBytes, imageBytes, imageSize: imageSize(this.blocks),
      seconds: (Date.now() - this.started) / 1000,
    };
  }
}
