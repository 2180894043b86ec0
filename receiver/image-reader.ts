// Opens an image for reading: its index records, page bitmaps (loaded per block
// on demand) and the data file. Converters and inspect use only this.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import type { StreamHeader, StreamTotals } from '../format/events';
import { CHAIN_INDEX_VERSION, IndexStore, INDEX_VERSION, PageCrcs, type ImageStatus } from './index-store';
import { ChainView, loadGenerations, noSnapshot, pickGeneration } from './chain-reader';
import type { ChainBlock, GenerationRecord } from './chain-image';
import type { ImageBlock } from './image';
import { BlockPages, CHUNK_PAGES } from './pagemap';

// Blocks named so hold a drive, not memory (format/SPEC.md, "Disks").
export const DISK_BLOCK_PREFIX = 'disk:';
import type { ReceiveSummary } from '../io/sink';

export interface ImageFormat {
  version: number;
  pageSize: number;
  blockAlign: number;
  chunkPages: number;
}

export interface VerifyResult {
  dataPages: number; // data pages whose CRC32 was checked
  zeroPages: number; // zero pages checked to read as zeroes
  unchecked: number; // data pages without a recorded checksum (image predates them)
  bad: string[]; // "block:page: what is wrong", at most maxReport of them
  badCount: number;
}

// A run of consecutive pages of one block that all hold data, or are all zero.
export interface PageRun {
  first: number;
  count: number;
  data: boolean;
}

export interface OpenOptions {
  generation?: number; // a chain image: the generation to read (default: the latest complete one that is not a pre-copy pass)
}

export class ImageReader {
  private maps = new Map<number, BlockPages>();
  // A chain image: the generation being read. `status` and `header.created`
  // are then that generation's; `chainStatus` is the whole chain's.
  chain: ChainView | undefined;
  chainStatus: ImageStatus | undefined;

  private constructor(
    readonly dir: string,
    private readonly index: IndexStore,
    private readonly fd: number,
    readonly format: ImageFormat,
    readonly status: ImageStatus,
    readonly header: StreamHeader,
    readonly blocks: ImageBlock[],
  ) {}

  static async open(dir: string, opts: OpenOptions = {}): Promise<ImageReader> {
    if (!fs.existsSync(path.join(dir, 'index'))) throw new Error(`${dir} is not a bgsnap image (no index)`);
    const index = await IndexStore.open(path.join(dir, 'index'), false);
    try {
      const format = await index.getJson<ImageFormat>('format');
      const status = await index.getJson<ImageStatus>('status');
      if (!format || !status) throw new Error(`${dir}: index has no format record; the stream never started`);
      if (format.version !== INDEX_VERSION && format.version !== CHAIN_INDEX_VERSION) {
        throw new Error(`${dir}: image version ${format.version} is not supported (this build reads ${INDEX_VERSION} and ${CHAIN_INDEX_VERSION})`);
      }
      const header = (await index.getJson<StreamHeader>('header'))!;
      if (format.version === CHAIN_INDEX_VERSION) return await ImageReader.openChain(dir, index, format, status, header, opts.generation);
      if (opts.generation !== undefined && opts.generation !== 1) throw new Error(`${dir} is a single snapshot, not a chain: it has no generation ${opts.generation}`);
      const blocks = (await index.getJson<ImageBlock[]>('blocks')) ?? [];
      const fd = fs.openSync(path.join(dir, 'data'), 'r');
      return new ImageReader(dir, index, fd, format, status, header, blocks);
    } catch (e) {
      await index.close();
      throw e;
    }
  }

  private static async openChain(dir: string, index: IndexStore, format: ImageFormat, status: ImageStatus, header: StreamHeader, generation?: number): Promise<ImageReader> {
    const records = await loadGenerations(index);
    const rec = pickGeneration(dir, records, generation);
    const view = new ChainView(dir, index, rec, records, (await index.getJson<ChainBlock[]>('blocks')) ?? [], format.pageSize);
    // A pass is read only when the chain has no snapshot (the default's last resort): never as complete.
    const genStatus: ImageStatus = rec.pass
      ? { status: 'incomplete', reason: noSnapshot(records), updated: status.updated }
      : { status: rec.status, reason: rec.reason, updated: status.updated };
    const img = new ImageReader(dir, index, fs.openSync(path.join(dir, 'data'), 'r'), format, genStatus, { ...header, created: rec.instant }, view.blocks);
    img.chain = view;
    img.chainStatus = status;
    for (let b = 0; b < view.blocks.length; b++) img.maps.set(b, await view.pages(b));
    return img;
  }

  // A chain image's generations, oldest first (empty for a single snapshot).
  get generations(): GenerationRecord[] {
    return this.chain?.records ?? [];
  }

  // The largest memory block: guest RAM (pc.ram) in a QEMU image. Disks
  // ("disk:ID" blocks, format/SPEC.md) are not memory, however large.
  get mainBlock(): number {
    const mem = this.memoryBlocks;
    return mem.reduce((m, i) => (this.blocks[i].length > this.blocks[m].length ? i : m), mem[0] ?? 0);
  }

  // Indexes of the blocks that are memory (every block but disks).
  get memoryBlocks(): number[] {
    return this.blocks.flatMap((b, i) => (b.name.startsWith(DISK_BLOCK_PREFIX) ? [] : [i]));
  }

  // The drives of a whole-VM snapshot: id, block index and size in bytes.
  async drives(): Promise<{ id: string; block: number; size: number; file: string }[]> {
    const raw = await this.state('qemu.disks');
    return raw ? (JSON.parse(raw.toString('utf8')) as { id: string; block: number; size: number; file: string }[]) : [];
  }

  // The data file, open for reading: converters that copy page ranges file to
  // file (copy_file_range) read it by descriptor.
  get dataFd(): number {
    return this.fd;
  }

  get complete(): boolean {
    return this.status.status === 'complete';
  }

  totals(): Promise<StreamTotals | undefined> {
    return this.index.getJson<StreamTotals>('totals');
  }

  stats(): Promise<ReceiveSummary | undefined> {
    return this.index.getJson<ReceiveSummary>('stats');
  }

  async stateKinds(): Promise<string[]> {
    if (this.chain) return this.chain.record.states;
    return (await this.index.keysWithPrefix('state/')).map((k) => k.slice('state/'.length));
  }

  state(kind: string): Promise<Buffer | undefined> {
    return this.chain ? this.chain.state(kind) : this.index.getBuffer(`state/${kind}`);
  }

  async pages(block: number): Promise<BlockPages> {
    let m = this.maps.get(block);
    if (m) return m;
    const blk = this.blocks[block];
    if (!blk) throw new Error(`image has no block ${block}`);
    m = new BlockPages(blk.pages);
    for (let c = 0; c < m.chunks(); c++) {
      const buf = await this.index.getBuffer(`bitmap/${block}/${c}`);
      if (buf) m.decodeChunk(c, buf);
    }
    this.maps.set(block, m);
    return m;
  }

  // Runs of present pages in address order, each at most maxRun pages long.
  async *runs(block: number, maxRun = 256): AsyncGenerator<PageRun> {
    const m = await this.pages(block);
    let p = 0;
    while (p < m.pages) {
      if (!m.present.get(p)) {
        p++;
        continue;
      }
      const data = m.data.get(p);
      let n = 1;
      while (n < maxRun && p + n < m.pages && m.present.get(p + n) && m.data.get(p + n) === data) n++;
      yield { first: p, count: n, data };
      p += n;
    }
  }

  // Reads count pages of a block starting at page first into buf (caller's buffer).
  readPages(block: number, first: number, count: number, buf: Buffer): Buffer {
    if (this.chain) return this.chain.readPages(block, first, count, buf);
    const blk = this.blocks[block];
    const ps = this.format.pageSize;
    if (first + count > blk.pages) throw new Error(`read past the end of block ${blk.name}`);
    const len = count * ps;
    let done = 0;
    while (done < len) {
      const n = fs.readSync(this.fd, buf, done, len - done, blk.base + first * ps + done);
      if (n === 0) throw new Error(`${this.dir}/data is shorter than its block table says`);
      done += n;
    }
    return buf.subarray(0, len);
  }

  // Reads count pages of a block starting at page first into the given views,
  // one page each, with one preadv (the views may sit inside a larger buffer).
  readPagesInto(block: number, first: number, slots: Buffer[]): void {
    if (this.chain) return void slots.forEach((s, i) => this.chain!.readPages(block, first + i, 1, s));
    const blk = this.blocks[block];
    const ps = this.format.pageSize;
    if (first + slots.length > blk.pages) throw new Error(`read past the end of block ${blk.name}`);
    const v = slots.slice();
    let pos = blk.base + first * ps;
    let k = 0;
    while (k < v.length) {
      let n = fs.readvSync(this.fd, v.slice(k, k + 1024), pos); // IOV_MAX is 1024
      if (n === 0) throw new Error(`${this.dir}/data is shorter than its block table says`);
      pos += n;
      while (n > 0 && k < v.length) {
        const l = v[k].length;
        if (n < l) v[k] = v[k].subarray(n); // a short read inside a page: the rest next time
        else k++;
        n -= Math.min(n, l);
      }
    }
  }

  // Re-reads every stored page: data pages against the CRC32 recorded when they
  // were received, zero pages must read as zeroes.
  async verify(maxReport = 20): Promise<VerifyResult> {
    const r: VerifyResult = { dataPages: 0, zeroPages: 0, unchecked: 0, bad: [], badCount: 0 };
    if (this.chain) {
      const counts = await this.chain.verify((where, problem) => r.badCount++ < maxReport && r.bad.push(`${where}: ${problem}`));
      return { ...r, ...counts };
    }
    const ps = this.format.pageSize;
    const buf = Buffer.alloc(256 * ps);
    const zero = Buffer.alloc(ps);
    for (let b = 0; b < this.blocks.length; b++) {
      const crcs = new Map<number, Uint32Array | undefined>();
      for await (const run of this.runs(b, 256)) {
        const pages = this.readPages(b, run.first, run.count, buf);
        for (let i = 0; i < run.count; i++) {
          const page = pages.subarray(i * ps, (i + 1) * ps);
          const p = run.first + i;
          const problem = run.data ? await this.checkData(b, p, page, crcs, r) : (r.zeroPages++, page.equals(zero) ? '' : 'zero page reads non-zero');
          if (!problem) continue;
          if (r.badCount++ < maxReport) r.bad.push(`${this.blocks[b].name}:${p}: ${problem}`);
        }
      }
    }
    return r;
  }

  private async checkData(b: number, p: number, page: Buffer, crcs: Map<number, Uint32Array | undefined>, r: VerifyResult): Promise<string> {
    const c = Math.floor(p / CHUNK_PAGES);
    if (!crcs.has(c)) {
      const raw = await this.index.getBuffer(`crc/${b}/${c}`);
      crcs.set(c, raw && PageCrcs.decodeChunk(raw));
    }
    const want = crcs.get(c)?.[p - c * CHUNK_PAGES];
    if (want === undefined) return (r.unchecked++, '');
    r.dataPages++;
    const got = zlib.crc32(page);
    return got === want ? '' : `crc32 ${got.toString(16)} != recorded ${want.toString(16)}`;
  }

  async close(): Promise<void> {
    this.chain?.close();
    fs.closeSync(this.fd);
    await this.index.close();
  }
}
