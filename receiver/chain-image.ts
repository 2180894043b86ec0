// Writes a chain of generations (a version 2 stream, format/SPEC.md, "Chains of generations")
// into one image. Every block the chain ever had keeps one fixed base in the
// data layout (blocks added later are laid out after the earlier ones), and
// each generation has its own sparse data file at those same offsets: `data`
// for generation 1, `data.K` for generation K. A generation's file holds only
// the pages it carried (zero pages and everything else are holes), so its
// storage is the pages written in its interval, plus its index records:
//
//   gen/K           GenerationRecord (JSON): instant, status and reason, counts,
//                   pass: true for a pre-copy pass (not a snapshot of its own)
//   gbits/K/B/C     the generation's own bitmaps of chunk C of block B
//                   (present | data | discarded, as bitmap/B/C in a single image)
//   gcrc/K/B/C      CRC-32 of each of its data pages (as crc/B/C)
//   gstate/K/KIND   its state blobs (process.state: threads, registers, maps)
//   blocks          every block of the chain, with born/died generations
//
// A generation is closed at its GENERATION_END: its data fsynced first, then
// its records and its `complete` status in one synced batch, so an image never
// says a snapshot is complete whose pages are not on disk. A pre-copy pass is
// no snapshot of its own: its data is fsynced with the next generation that is
// (or when the stream ends), so the receiver does not stop reading for it. A
// broken stream closes only the generation in flight, as incomplete with the
// reason.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import type { BlockInfo, DiscardBatch, GenerationStart, GenerationTotals, PageBatch, StreamEvent, StreamHeader, StreamTotals } from '../format/events';
import { openPrivateFile } from '../io/private-file';
import type { ReceiveSummary } from '../io/sink';
import { BLOCK_ALIGN, fsyncDir, imageSize, type ImageBlock } from './image';
import { CHAIN_INDEX_VERSION, PageCrcs, type IndexStore } from './index-store';
import { BlockPages, CHUNK_PAGES } from './pagemap';
import type { PageQueue, QueuedBatch } from './page-queue';

const fsync = promisify(fs.fsync);

export interface ChainBlock extends ImageBlock {
  born: number; // the generation that added it
  died?: number; // the first generation without it
}

export interface GenerationRecord {
  generation: number;
  instant: number; // ms since the epoch, the generation's freeze
  status: 'complete' | 'incomplete';
  reason: string;
  file: string; // its data file, in the image directory
  added: number[]; // blocks it added
  removed: number[]; // blocks it removed
  pages: number; // distinct pages it stored (data and zero)
  dataPages: number;
  zeroPages: number;
  discardedPages: number;
  dataBytes: number; // bytes of page data it stored (dataPages × page size)
  diskBytes: number; // blocks its data file occupies on disk
  states: string[];
  totals?: GenerationTotals; // its GENERATION_END, when it arrived
  pass?: boolean; // its GENERATION_END said: a pre-copy pass, the base of later generations, not a snapshot
}

interface OpenGeneration {
  start: GenerationStart;
  fd: number;
  file: string;
  added: number[];
  maps: Map<number, BlockPages>;
  crcs: Map<number, PageCrcs>;
  states: Map<string, Buffer>;
}

export function dataFileName(generation: number): string {
  return generation === 1 ? 'data' : `data.${generation}`;
}

export class ChainWriter {
  private readonly blocks: ChainBlock[] = [];
  private readonly records: GenerationRecord[] = [];
  private gen: OpenGeneration | undefined;
  private ended: StreamTotals | undefined;
  private next = 0; // where the next block added goes (2 MiB aligned)
  private size = 0; // apparent size of every data file: the end of the chain's last block
  private unsynced: number[] = []; // passes' data files, fsynced with the next snapshot's (syncData)
  private discards = 0;

  constructor(
    private readonly dir: string, private readonly fd1: number, private readonly index: IndexStore, private readonly header: StreamHeader,
    private readonly queue: PageQueue, private readonly maxImageBytes: number,
  ) {}

  async begin(): Promise<void> {
    await this.index.putJson('format', {
      version: CHAIN_INDEX_VERSION, chain: true, pageSize: this.header.pageSize, blockAlign: BLOCK_ALIGN, chunkPages: CHUNK_PAGES, pageChecksum: 'crc32',
    });
  }

  // Non-page events see the queue drained, as in a single image.
  async apply(ev: StreamEvent): Promise<void> {
    switch (ev.type) {
      case 'generation': return this.open(ev.generation);
      case 'blocks': return this.addBlocks(ev.blocks);
      case 'discard': return this.discard(ev.batch);
      case 'state': return void this.current('state').states.set(ev.state.kind, Buffer.from(ev.state.data));
      case 'generation-end': return this.close(this.incompleteReason(), ev.totals);
      case 'end': this.ended = ev.totals; return;
      case 'header': throw new Error('second stream header');
      case 'pages': return;
    }
  }

  private current(what: string): OpenGeneration {
    if (!this.gen) throw new Error(`${what} outside a generation`);
    return this.gen;
  }

  private async open(start: GenerationStart): Promise<void> {
    if (this.gen) throw new Error(`generation ${start.generation} started inside generation ${this.gen.start.generation}`);
    const file = dataFileName(start.generation);
    const fd = start.generation === 1 ? this.fd1 : openPrivateFile(path.join(this.dir, file), { read: true });
    fs.ftruncateSync(fd, this.size);
    for (const b of start.removed) this.blocks[b].died = start.generation;
    this.gen = { start, fd, file, added: [], maps: new Map(), crcs: new Map(), states: new Map() };
    await this.index.putJson(`gen/${start.generation}`, this.record('incomplete', 'receiving'), true);
  }

  // New blocks go after every earlier one, so no block ever moves.
  private addBlocks(blocks: BlockInfo[]): void {
    const g = this.current('block table');
    const ps = this.header.pageSize;
    let base = this.next;
    const added = blocks.map((b, i) => {
      const cb: ChainBlock = { ...b, base, pages: b.length / ps, born: g.start.generation };
      base += Math.ceil(b.length / BLOCK_ALIGN) * BLOCK_ALIGN;
      return cb;
    });
    const size = imageSize([...this.blocks, ...added]);
    if (size > this.maxImageBytes) throw new Error(`the chain's blocks need a ${size}-byte layout, over the limit of ${this.maxImageBytes} bytes`);
    added.forEach((_, i) => g.added.push(this.blocks.length + i));
    this.blocks.push(...added);
    this.next = base;
    this.size = size;
    fs.ftruncateSync(g.fd, this.size);
  }

  private pagesOf(block: number): { blk: ChainBlock; map: BlockPages; crc: PageCrcs } {
    const g = this.current('page batch');
    const blk = this.blocks[block];
    if (!blk || blk.died !== undefined) throw new Error(`page batch for block ${block}, which generation ${g.start.generation} does not have`);
    let map = g.maps.get(block);
    if (!map) g.maps.set(block, (map = new BlockPages(blk.pages)));
    let crc = g.crcs.get(block);
    if (!crc) g.crcs.set(block, (crc = new PageCrcs(blk.pages)));
    return { blk, map, crc };
  }

  // The same page work as a single image's (io/native/pagewrite.cc), into
  // the open generation's data file and bitmaps.
  job(batch: PageBatch): QueuedBatch {
    const { blk, map, crc } = this.pagesOf(batch.block);
    const n = batch.index.length;
    const job = {
      fd: this.gen!.fd, pageSize: this.header.pageSize, base: blk.base, pages: blk.pages, index: batch.index, zero: batch.zero, data: batch.data,
      present: map.present.bits, dataBits: map.data.bits, discarded: map.discarded.bits, crcs: new Uint32Array(n), isData: new Uint8Array(n),
      check: batch.check && { seed: batch.check.seed, expected: batch.check.expected },
    };
    return { batch, job, crc };
  }

  // Within a generation a page it stored wins over a discard (as in a single
  // image); the discard then hides every earlier generation's version.
  private discard(batch: DiscardBatch): void {
    const { map } = this.pagesOf(batch.block);
    for (const p of batch.index) if (!map.present.get(p)) map.discarded.set(p);
    this.discards += batch.index.length;
  }

  // Blocks a generation added must arrive whole; the others it inherits.
  private incompleteReason(): string {
    const g = this.current('GENERATION_END');
    for (const b of g.added) {
      const m = g.maps.get(b);
      let missing = 0;
      for (let p = 0; p < this.blocks[b].pages; p++) if (!m || (!m.present.get(p) && !m.discarded.get(p))) missing++;
      if (missing) return `${missing} pages of block ${this.blocks[b].name}, added in generation ${g.start.generation}, never arrived`;
    }
    return '';
  }

  // Data first, fsynced; then the generation's records and status, synced. A
  // pass defers both (its records reach the disk with the next synced batch):
  // each fsync held the receiver 100-200 ms, while a piped pre-copy's finish
  // had writers waiting on the output (fault waits of 130-160 ms, one a pass).
  private async close(reason: string, totals?: GenerationTotals): Promise<void> {
    const g = this.current('GENERATION_END');
    await this.queue.idle().catch(() => undefined); // the failure, if any, is the caller's reason
    const pass = !!totals?.pass && !reason;
    this.unsynced.push(g.fd);
    if (!pass) await this.syncData(g.fd);
    const diskBytes = fs.fstatSync(g.fd).blocks * 512;
    if (!pass && g.fd !== this.fd1) fs.closeSync(g.fd);
    const rec = { ...this.record(reason ? 'incomplete' : 'complete', reason), diskBytes, ...(totals ? { totals } : {}), ...(totals?.pass ? { pass: true } : {}) };
    this.gen = undefined;
    this.records.push(rec);
    await this.index.putMany([...this.generationRecords(g), ['blocks', json(this.blocks)], [`gen/${rec.generation}`, json(rec)]], !pass);
  }

  // Every data file not yet on disk, then the directory. The passes' files
  // are closed once synced (`open`, the caller's, and generation 1's, the
  // image's, stay open).
  private async syncData(open?: number): Promise<void> {
    for (const fd of this.unsynced) await fsync(fd);
    await fsyncDir(this.dir);
    for (const fd of this.unsynced) if (fd !== this.fd1 && fd !== open) fs.closeSync(fd);
    this.unsynced = [];
  }

  private generationRecords(g: OpenGeneration): [string, Buffer][] {
    const out: [string, Buffer][] = [];
    const n = g.start.generation;
    for (const [b, m] of g.maps) {
      for (let c = 0; c < m.chunks(); c++) {
        out.push([`gbits/${n}/${b}/${c}`, m.encodeChunk(c)]);
        const crcs = g.crcs.get(b)!.encodeChunk(c);
        if (crcs) out.push([`gcrc/${n}/${b}/${c}`, crcs]);
      }
    }
    for (const [kind, data] of g.states) out.push([`gstate/${n}/${kind}`, data]);
    return out;
  }

  private record(status: 'complete' | 'incomplete', reason: string): GenerationRecord {
    const g = this.gen!;
    let pages = 0, dataPages = 0, discardedPages = 0;
    for (const m of g.maps.values()) {
      pages += m.present.count();
      dataPages += m.data.count();
      discardedPages += m.discarded.count();
    }
    return {
      generation: g.start.generation, instant: g.start.instant, status, reason, file: g.file, added: g.added, removed: g.start.removed,
      pages, dataPages, zeroPages: pages - dataPages, discardedPages, dataBytes: dataPages * this.header.pageSize, diskBytes: 0,
      states: [...g.states.keys()],
    };
  }

  // The stream ended (finish) or broke (fail): the generation in flight, if
  // any, is closed incomplete; the chain is complete only with its END and
  // every generation complete.
  async end(failure: string | undefined): Promise<{ status: 'complete' | 'incomplete'; reason: string }> {
    const queued = await this.queue.idle().then(() => undefined, (e: Error) => e.message);
    let reason = failure ?? queued ?? '';
    if (this.gen) {
      const n = this.gen.start.generation;
      reason ||= `the stream ended inside generation ${n}`;
      await this.close(reason);
      reason = `generation ${n} is incomplete: ${reason}`;
    }
    if (this.unsynced.length) await this.syncData(); // passes after the last snapshot
    const bad = this.records.find((r) => r.status !== 'complete');
    if (!reason && bad) reason = `generation ${bad.generation} is incomplete: ${bad.reason}`;
    if (!reason && !this.ended) reason = `the stream ended after generation ${this.records.length} without its END frame`;
    if (!reason && !this.records.length) reason = 'the chain has no generation';
    return { status: reason ? 'incomplete' : 'complete', reason: reason && `${reason}${noSnapshotNote(this.records)}` };
  }

  indexRecords(summary: ReceiveSummary): [string, Buffer][] {
    return [['blocks', json(this.blocks)], ...(this.ended ? [['totals', json(this.ended)] as [string, Buffer]] : []), ['stats', json(summary)]];
  }

  summary(): Pick<ReceiveSummary, 'uniquePages' | 'dataPages' | 'zeroPages' | 'discardedPages' | 'imageBytes' | 'imageSize' | 'generations' | 'completeGenerations' | 'passes'> {
    const sum = (k: 'pages' | 'dataPages' | 'diskBytes') => this.records.reduce((s, r) => s + r[k], 0);
    return {
      uniquePages: sum('pages'), dataPages: sum('dataPages'), zeroPages: sum('pages') - sum('dataPages'), discardedPages: this.discards,
      imageBytes: sum('diskBytes'), imageSize: this.size, generations: this.records.length,
      completeGenerations: this.records.filter((r) => r.status === 'complete').length, passes: this.records.filter((r) => r.pass).length,
    };
  }
}

// A broken chain that got only pre-copy passes whole holds no snapshot: its
// reason says so, so nobody takes a pass for one.
function noSnapshotNote(records: GenerationRecord[]): string {
  const passes = passesWithoutSnapshot(records);
  return passes.length ? `; no complete snapshot: ${passList(passes)}` : '';
}

// The pre-copy passes of a chain that has no complete snapshot (no complete
// generation that is not a pass); empty when it has one, or no passes.
export function passesWithoutSnapshot(records: GenerationRecord[]): number[] {
  if (records.some((r) => r.status === 'complete' && !r.pass)) return [];
  return records.filter((r) => r.pass).map((r) => r.generation);
}

// "generation 2 is a pre-copy pass", "generations 1-3 are pre-copy passes".
export function passList(gens: number[]): string {
  const runs: string[] = [];
  for (let i = 0; i < gens.length; ) {
    let j = i;
    while (j + 1 < gens.length && gens[j + 1] === gens[j] + 1) j++;
    runs.push(j === i ? `${gens[i]}` : `${gens[i]}-${gens[j]}`);
    i = j + 1;
  }
  return gens.length === 1 ? `generation ${gens[0]} is a pre-copy pass` : `generations ${runs.join(', ')} are pre-copy passes`;
}

function json(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v));
}
