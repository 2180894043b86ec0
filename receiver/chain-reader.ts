// Reads one generation K of a chain image (chain-image.ts) as if it were a
// single snapshot: its live blocks, each page's newest version among
// generations 1..K (a discard hides the versions before it; a later page
// hides the discard), read from the data file of the generation that stored
// it, and generation K's own state. ImageReader uses this for chain images, so
// the converters and inspect need not know about chains.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { decodeProcessState, encodeProcessState, STATE_KIND } from '../format/process-state';
import { passesWithoutSnapshot, passList, type ChainBlock, type GenerationRecord } from './chain-image';
import type { ImageBlock } from './image';
import { PageCrcs, type IndexStore } from './index-store';
import { BlockPages, CHUNK_PAGES } from './pagemap';

export async function loadGenerations(index: IndexStore): Promise<GenerationRecord[]> {
  const keys = (await index.keysWithPrefix('gen/')).filter((k) => /^gen\/\d+$/.test(k));
  const recs = await Promise.all(keys.map((k) => index.getJson<GenerationRecord>(k)));
  return (recs.filter(Boolean) as GenerationRecord[]).sort((a, b) => a.generation - b.generation);
}

// The generation asked for, or by default the snapshot: the latest complete
// generation that is not a pre-copy pass (SPEC.md, "Pre-copy passes"). With
// none, the latest of all: it then reads as incomplete (ImageReader says why).
// A pass asked for by number is refused: its pages were read at different
// moments while the target ran, so alone it is no snapshot of any instant.
export function pickGeneration(dir: string, records: GenerationRecord[], requested?: number): GenerationRecord {
  const list = records.map((r) => `${r.generation} (${r.status}${r.pass ? ', pass' : ''})`).join(', ') || 'none';
  if (requested === undefined) {
    const rec = latestSnapshot(records) ?? records[records.length - 1];
    if (!rec) throw new Error(`${dir}: the chain has no generation; its stream broke before the first one began`);
    return rec;
  }
  const rec = records.find((r) => r.generation === requested);
  if (!rec) throw new Error(`${dir}: the chain has no generation ${requested} (generations: ${list})`);
  if (rec.pass) throw new Error(`${dir}: generation ${requested} is a pre-copy pass, not a snapshot; ${snapshotAfter(records, requested)}`);
  return rec;
}

// The latest complete generation that is a snapshot (not a pass).
export function latestSnapshot(records: GenerationRecord[]): GenerationRecord | undefined {
  return records.filter((r) => r.status === 'complete' && !r.pass).pop();
}

// Where the snapshot is that a pass was the base of (the first after it), else the latest.
function snapshotAfter(records: GenerationRecord[], k: number): string {
  const s = records.find((r) => r.generation > k && r.status === 'complete' && !r.pass) ?? latestSnapshot(records);
  return s ? `the snapshot is generation ${s.generation}` : 'this image has no complete snapshot';
}

// Why a chain with pre-copy passes has no snapshot to read ('' when it has
// one, or has no passes): the passes, and what became of the generation
// after them.
export function noSnapshot(records: GenerationRecord[]): string {
  const passes = passesWithoutSnapshot(records);
  if (!passes.length) return '';
  const after = records.find((r) => r.generation > passes[passes.length - 1]);
  const then = after ? `generation ${after.generation} is ${after.status}${after.reason ? ` (${after.reason})` : ''}` : 'no generation followed';
  return `this image has no complete snapshot: ${passList(passes)}, ${then}`;
}

export class ChainView {
  readonly blocks: ImageBlock[]; // live at K, by address
  private readonly ids: number[]; // view block -> chain block
  private readonly src = new Map<number, Uint32Array>(); // view block -> generation holding each page
  private readonly fds = new Map<number, number>();

  constructor(
    private readonly dir: string, private readonly index: IndexStore, readonly record: GenerationRecord,
    readonly records: GenerationRecord[], chainBlocks: ChainBlock[], private readonly pageSize: number,
  ) {
    const k = record.generation;
    const live = chainBlocks.map((b, id) => ({ b, id })).filter(({ b }) => b.born <= k && (b.died === undefined || b.died > k));
    live.sort((x, y) => x.b.address - y.b.address || x.id - y.id);
    this.ids = live.map(({ id }) => id);
    this.blocks = live.map(({ b }) => ({ name: b.name, length: b.length, address: b.address, base: b.base, pages: b.pages }));
  }

  get generation(): number {
    return this.record.generation;
  }

  // Generation K's page map of a block: each page's newest record in 1..K.
  async pages(block: number): Promise<BlockPages> {
    const blk = this.blocks[block];
    const id = this.ids[block];
    const m = new BlockPages(blk.pages);
    const src = new Uint32Array(blk.pages);
    const g = new BlockPages(blk.pages);
    for (let gen = 1; gen <= this.generation; gen++) {
      let any = false;
      for (let c = 0; c < g.chunks(); c++) {
        const buf = await this.index.getBuffer(`gbits/${gen}/${id}/${c}`);
        if (buf) (g.decodeChunk(c, buf), (any = true));
      }
      if (!any) continue;
      overlay(m, g, src, gen);
      g.present.bits.fill(0), g.data.bits.fill(0), g.discarded.bits.fill(0);
    }
    this.src.set(block, src);
    return m;
  }

  // count pages from first into buf: data pages from their generation's file,
  // the rest zero.
  // ImageReader loads every block's map when it opens a generation, so this is sync like its own.
  readPages(block: number, first: number, count: number, buf: Buffer): Buffer {
    const src = this.src.get(block);
    if (!src) throw new Error(`${this.dir}: block ${block} read before its page map was loaded`);
    const ps = this.pageSize;
    const base = this.blocks[block].base;
    for (let i = 0; i < count; ) {
      const gen = src[first + i];
      let n = 1;
      while (i + n < count && src[first + i + n] === gen) n++;
      if (gen === 0) buf.fill(0, i * ps, (i + n) * ps);
      else readFull(this.fd(gen), buf.subarray(i * ps, (i + n) * ps), base + (first + i) * ps, this.dir);
      i += n;
    }
    return buf.subarray(0, count * ps);
  }

  private fd(gen: number): number {
    let fd = this.fds.get(gen);
    if (fd === undefined) this.fds.set(gen, (fd = fs.openSync(path.join(this.dir, this.records[gen - 1].file), 'r')));
    return fd;
  }

  // Generation K's state; a process state's block numbers become this view's.
  async state(kind: string): Promise<Buffer | undefined> {
    const raw = await this.index.getBuffer(`gstate/${this.generation}/${kind}`);
    if (!raw || kind !== STATE_KIND) return raw;
    const s = decodeProcessState(raw);
    for (const m of s.maps) m.block = m.block >= 0 ? this.ids.indexOf(m.block) : -1;
    return encodeProcessState(s);
  }

  // Every page each generation stored, against the CRC recorded when it arrived.
  async verify(report: (where: string, problem: string) => void): Promise<{ dataPages: number; zeroPages: number; unchecked: number }> {
    const r = { dataPages: 0, zeroPages: 0, unchecked: 0 };
    const chain = (await this.index.getJson<ChainBlock[]>('blocks')) ?? [];
    const ps = this.pageSize;
    const page = Buffer.alloc(ps);
    for (const rec of this.records) {
      for (const key of await this.index.keysWithPrefix(`gbits/${rec.generation}/`)) {
        const [, , b, c] = key.split('/').map(Number);
        const m = new BlockPages(chain[b].pages);
        m.decodeChunk(c, (await this.index.getBuffer(key))!);
        const crcRaw = await this.index.getBuffer(`gcrc/${rec.generation}/${b}/${c}`);
        const crcs = crcRaw && PageCrcs.decodeChunk(crcRaw);
        for (let p = c * CHUNK_PAGES; p < Math.min(m.pages, (c + 1) * CHUNK_PAGES); p++) {
          if (!m.present.get(p)) continue;
          readFull(this.fd(rec.generation), page, chain[b].base + p * ps, this.dir);
          const where = `generation ${rec.generation} ${chain[b].name}:${p}`;
          if (!m.data.get(p)) (r.zeroPages++, page.some((x) => x !== 0) && report(where, 'zero page reads non-zero'));
          else if (!crcs) r.unchecked++;
          else (r.dataPages++, zlib.crc32(page) !== crcs[p - c * CHUNK_PAGES] && report(where, 'crc32 differs from the one recorded'));
        }
      }
    }
    return r;
  }

  close(): void {
    for (const fd of this.fds.values()) fs.closeSync(fd);
    this.fds.clear();
  }
}

// Lays generation gen's own records over the map built from the ones before.
function overlay(m: BlockPages, g: BlockPages, src: Uint32Array, gen: number): void {
  const [mp, md, mx] = [m.present.bits, m.data.bits, m.discarded.bits];
  const [gp, gd, gx] = [g.present.bits, g.data.bits, g.discarded.bits];
  for (let i = 0; i < mp.length; i++) {
    const touched = gp[i] | gx[i];
    if (!touched) continue;
    mp[i] = (mp[i] & ~touched) | gp[i];
    md[i] = (md[i] & ~touched) | gd[i];
    mx[i] = (mx[i] & ~touched) | (gx[i] & ~gp[i]);
    for (let bit = 0; bit < 8; bit++) {
      const p = i * 8 + bit;
      if (touched & (1 << bit)) src[p] = gd[i] & (1 << bit) ? gen : 0;
    }
  }
}

function readFull(fd: number, buf: Buffer, pos: number, dir: string): void {
  for (let done = 0; done < buf.length; ) {
    const n = fs.readSync(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) throw new Error(`${dir}: a generation's data file is shorter than its block table says`);
    done += n;
  }
}
