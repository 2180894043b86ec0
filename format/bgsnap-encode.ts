// The bgsnap stream encoder: one snapshot (version 1) or a chain of generations
// (version 2, `chain: true`). Produces frames as Buffer lists (header + payload
// parts) so page data is written to the sink without being copied; the caller
// writes them in order. Layouts in bgsnap.ts and SPEC.md.
import type * as Zstd from 'zstd-napi/binding';
import { crc32 } from './crc32';
import {
  CHAIN_VERSION, FLAG_ZSTD, FrameType, MAGIC, SOURCES, VERSION, emptyTotals, frame, pad4, u32, type Crc32Fn, type PartCrcs,
} from './bgsnap-frame';
import { CHAIN_END_BYTES, emptyGenerationTotals, encodeGeneration, encodeGenerationEnd } from './chain';
import type { BlockInfo, DiscardBatch, GenerationStart, GenerationTotals, PageBatch, StateBlob, StreamHeader } from './events';

export interface EncoderOptions {
  compressLevel?: number; // zstd level for PAGES payloads; undefined = no compression
  crc32?: Crc32Fn;
  chain?: boolean; // a chain stream (version 2): generation(), generationEnd() between header() and end()
}

type Packer = { z: typeof Zstd; cctx: Zstd.CCtx; src: Buffer; dst: Buffer };

export class BgsnapEncoder {
  readonly totals = emptyTotals();
  private readonly level: number | undefined;
  private readonly crc: Crc32Fn;
  private pageSizeBytes = 0;
  private chainMode: boolean;
  private gen: GenerationTotals | undefined; // the open generation's counts
  private generations = 0;
  private lastPass = false; // the last generation ended was a pre-copy pass
  private packer: Packer | undefined; // compression's reused state
  private racing = false; // the open generation's pages go uncompressed

  constructor(opts: EncoderOptions = {}) {
    this.level = opts.compressLevel;
    this.crc = opts.crc32 ?? crc32;
    this.chainMode = opts.chain === true;
  }

  // The page size of the stream, once its header was encoded (0 before).
  get pageSize(): number {
    return this.pageSizeBytes;
  }

  get chain(): boolean {
    return this.chainMode;
  }

  // A relay learns from the decoded header that it carries a chain; only
  // before the magic was written.
  set chain(on: boolean) {
    this.chainMode = on;
  }

  // The open generation's counts so far (chain streams), for a producer's stats.
  get generationTotals(): Readonly<GenerationTotals> | undefined {
    return this.gen;
  }

  magic(): Buffer {
    const b = Buffer.alloc(8);
    MAGIC.copy(b);
    b.writeUInt16LE(this.chainMode ? CHAIN_VERSION : VERSION, 6);
    return b;
  }

  header(h: StreamHeader): Buffer[] {
    if (!/^[0-9a-f]{32}$/.test(h.snapshotId)) throw new Error(`snapshot id must be 32 hex digits: ${h.snapshotId}`);
    this.pageSizeBytes = h.pageSize;
    const label = Buffer.from(h.label, 'utf8').subarray(0, 0xffff);
    const p = Buffer.alloc(34 + label.length);
    Buffer.from(h.snapshotId, 'hex').copy(p, 0);
    p.writeUInt8(SOURCES.indexOf(h.source) + 1, 16);
    p.writeUInt32LE(h.pageSize, 20);
    p.writeBigUInt64LE(BigInt(Math.floor(h.created)), 24);
    p.writeUInt16LE(label.length, 32);
    label.copy(p, 34);
    return frame(this.crc, FrameType.HEADER, [p]);
  }

  // Chains: opens generation g (numbered 1, 2, ... in order), naming the
  // blocks that are gone since the previous one. New blocks follow as one
  // blocks() call, numbered after every block the chain ever had.
  generation(g: GenerationStart): Buffer[] {
    if (!this.chainMode) throw new Error('generation() needs an encoder made with { chain: true }');
    if (this.gen) throw new Error(`generation ${g.generation} started before generation ${this.gen.generation} ended`);
    if (g.generation !== this.generations + 1) throw new Error(`generation ${g.generation} after ${this.generations}: generations are consecutive from 1`);
    this.gen = { ...emptyGenerationTotals(g.generation), blocksRemoved: g.removed.length };
    this.racing = g.racing === true;
    return frame(this.crc, FrameType.GENERATION, [encodeGeneration(g)]);
  }

  // The generation's end record: its counts, checked by the receiver, prove it
  // arrived whole. `pass`: it was a pre-copy pass (SPEC.md, "Pre-copy passes"),
  // so another generation must follow before end().
  generationEnd(opts: { pass?: boolean } = {}): Buffer[] {
    if (!this.gen) throw new Error('generationEnd() without an open generation');
    const t = this.gen;
    this.gen = undefined;
    this.generations = t.generation;
    this.lastPass = opts.pass === true;
    return frame(this.crc, FrameType.GENERATION_END, [encodeGenerationEnd({ ...t, pass: opts.pass })]);
  }

  blocks(blocks: BlockInfo[]): Buffer[] {
    this.needGeneration('blocks');
    const parts: Buffer[] = [u32(blocks.length)];
    for (const b of blocks) {
      const name = Buffer.from(b.name, 'utf8').subarray(0, 0xffff);
      const e = Buffer.alloc(18);
      e.writeBigUInt64LE(BigInt(b.length), 0);
      e.writeBigUInt64LE(BigInt(b.address), 8);
      e.writeUInt16LE(name.length, 16);
      parts.push(e, name);
    }
    if (this.gen) this.gen.blocksAdded += blocks.length;
    return frame(this.crc, FrameType.BLOCKS, parts);
  }

  pages(batch: PageBatch): Buffer[] {
    this.needGeneration('pages');
    const n = batch.index.length;
    const meta = Buffer.alloc(8 + n * 5 + pad4(n));
    meta.writeUInt32LE(batch.block, 0);
    meta.writeUInt32LE(n, 4);
    Buffer.from(batch.index.buffer, batch.index.byteOffset, n * 4).copy(meta, 8);
    Buffer.from(batch.zero.buffer, batch.zero.byteOffset, n).copy(meta, 8 + n * 4);
    let zeros = 0;
    for (let i = 0; i < n; i++) zeros += batch.zero[i] ? 1 : 0;
    if (batch.data.length !== (n - zeros) * this.pageSizeBytes) {
      throw new Error(`page batch carries ${batch.data.length} bytes for ${n - zeros} data pages`);
    }
    this.count('pages', n);
    this.count('zeroPages', zeros);
    this.count('batches', 1);
    const packed = this.level === undefined || this.racing ? undefined : this.compressed(meta, batch.data);
    // Pages that do not compress go as they are (the reader skips inflating
    // them), and so do a racing generation's: a pre-copy's later passes must
    // outrun the target's writes, and compressing them on this thread doubled
    // their cost a page (Redis: its passes never came down to the snapshot in
    // 18 rounds; bench/RESULTS.md).
    if (!packed) return frame(this.crc, FrameType.PAGES, [meta, batch.data], 0, undefined, this.pageCrcs(batch, n - zeros));
    return frame(this.crc, FrameType.PAGES, [packed], FLAG_ZSTD, meta.length + batch.data.length);
  }

  // One context, input and output buffer for the whole stream, and a copy of
  // only the compressed bytes: zstd-napi's compress() of a concatenated batch
  // allocated two fresh 4 MiB buffers per batch, and the kernel's zeroing of
  // them cost half as much again as compressing (1 GiB of pages like Redis's,
  // 1 KiB values of one byte, at level 1: 0.73-0.91 s of CPU, 0.23-0.25 of it
  // system, against 0.40-0.53 s this way).
  private compressed(meta: Buffer, data: Buffer): Buffer | undefined {
    const c = (this.packer ??= newPacker());
    const raw = meta.length + data.length;
    if (c.src.length < raw) [c.src, c.dst] = [Buffer.allocUnsafe(raw), Buffer.allocUnsafe(c.z.compressBound(raw))];
    meta.copy(c.src, 0);
    data.copy(c.src, meta.length);
    const n = c.cctx.compress(c.dst, c.src.subarray(0, raw), this.level!);
    return n < raw ? Buffer.from(c.dst.subarray(0, n)) : undefined;
  }

  // The batch's own page CRCs when it carries one per data page (the process
  // capture engine's): the frame checksum is then combined from them.
  private pageCrcs(batch: PageBatch, dataPages: number): PartCrcs | undefined {
    const c = batch.crcs;
    return c && c.length === dataPages && dataPages > 0 ? { crcs: c, pageSize: this.pageSizeBytes } : undefined;
  }

  discard(batch: DiscardBatch): Buffer[] {
    this.needGeneration('discard');
    const n = batch.index.length;
    const meta = Buffer.alloc(8 + n * 4);
    meta.writeUInt32LE(batch.block, 0);
    meta.writeUInt32LE(n, 4);
    Buffer.from(batch.index.buffer, batch.index.byteOffset, n * 4).copy(meta, 8);
    this.count('discarded', n);
    return frame(this.crc, FrameType.DISCARD, [meta]);
  }

  state(s: StateBlob): Buffer[] {
    this.needGeneration('state');
    const kind = Buffer.from(s.kind, 'utf8');
    const head = Buffer.alloc(2 + kind.length);
    head.writeUInt16LE(kind.length, 0);
    kind.copy(head, 2);
    this.count('states', 1);
    return frame(this.crc, FrameType.STATE, [head, s.data]);
  }

  end(): Buffer[] {
    if (this.gen) throw new Error(`end() inside generation ${this.gen.generation}: end it first`);
    if (this.lastPass) throw new Error(`end() right after generation ${this.generations}, a pre-copy pass: a chain ends with a snapshot generation`);
    const t = this.totals;
    const p = Buffer.alloc(this.chainMode ? CHAIN_END_BYTES : 40);
    [t.pages, t.zeroPages, t.discarded, t.batches, t.states].forEach((v, i) => p.writeBigUInt64LE(BigInt(v), i * 8));
    if (this.chainMode) p.writeBigUInt64LE(BigInt(this.generations), 40);
    return frame(this.crc, FrameType.END, [p]);
  }

  private needGeneration(what: string): void {
    if (this.chainMode && !this.gen) throw new Error(`${what}() outside a generation: a chain stream carries it between generation() and generationEnd()`);
  }

  private count(k: 'pages' | 'zeroPages' | 'discarded' | 'batches' | 'states', n: number): void {
    this.totals[k] += n;
    if (this.gen) this.gen[k] += n;
  }
}

// Loaded only with compression on: a capture's start-up is part of its wall time.
function newPacker(): Packer {
  const z = require('zstd-napi/binding') as typeof Zstd;
  return { z, cctx: new z.CCtx(), src: Buffer.alloc(0), dst: Buffer.alloc(0) };
}
