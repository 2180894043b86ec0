// The bgsnap stream's decoder (the encoder is bgsnap-encode.ts, re-exported
// here). All integers little-endian.
//
//   stream  = magic frame* ; the END frame must be last
//   magic   = "BGSNAP" u16 version            (8 bytes; version 1, or 2 for a
//             chain of generations: GENERATION 7 / GENERATION_END 8 frames, chain.ts)
//
//   frame header, 16 bytes:
//   +0  u8  type        1 HEADER 2 BLOCKS 3 PAGES 4 DISCARD 5 STATE 6 END
//   +1  u8  flags       bit 0: payload is one zstd frame
//   +2  u16 reserved    0
//   +4  u32 length      payload bytes on the wire            (<= 64 MiB)
//   +8  u32 rawLength   payload bytes after decompression    (<= 64 MiB)
//   +12 u32 crc32       of header bytes 0..11, then the wire payload
//
//   HEADER   id[16] u8 source(1 qemu, 2 process) u8 0 u16 0 u32 pageSize
//            u64 createdMs u16 labelLen label
//   BLOCKS   u32 n, n × (u64 length u64 address u16 nameLen name)
//   PAGES    u32 block u32 n, n × u32 pageIndex, n × u8 zero, pad to 4,
//            then the non-zero pages back to back (pageSize each)
//   DISCARD  u32 block u32 n, n × u32 pageIndex
//   STATE    u16 kindLen kind, data to the end of the payload
//   END      u64 pages u64 zeroPages u64 discarded u64 batches u64 states
//
// Pages carry no per-page header beyond 5 bytes of index and flag, so a batch of
// 256 pages is one frame of ~1 MiB with one checksum. See SPEC.md for the rules.
import type * as zstdBinding from 'zstd-napi/binding';
import { StreamError } from './errors';
import { ChunkQueue } from './chunks';
import { crc32, crc32Combine } from './crc32';
import {
  CHAIN_VERSION, FLAG_ZSTD, FRAME_HEADER, FrameType, MAGIC, MAX_BLOCKS, MAX_PAYLOAD, READABLE_VERSIONS, SOURCES, emptyTotals, pad4,
  type Crc32Fn,
} from './bgsnap-frame';
import { CHAIN_END_BYTES, ChainRules } from './chain';
import type { BlockInfo, StreamDecoder, StreamEvent, StreamHeader, StreamTotals } from './events';

export { BgsnapEncoder, type EncoderOptions } from './bgsnap-encode';
export { CHAIN_VERSION, FRAME_HEADER, FrameType, MAGIC, MAX_PAYLOAD, VERSION, isBgsnapStream, type Crc32Fn } from './bgsnap-frame';

// ---------------------------------------------------------------- decoder

const FORMAT = 'bgsnap';

// Decodes a bgsnap stream pushed in chunks of any size. Validates every frame
// against the block table it announced, so consumers never see a page outside
// its block, whatever the bytes on the wire say.
export interface DecoderOptions {
  // Leave plain PAGES frames' checksums to the sink (PageBatch.check), which
  // checksums each page anyway, so no page is read twice. Only for sinks that
  // verify PageCheck (the image writer); every other frame is verified here.
  deferPageChecks?: boolean;
  crc32?: Crc32Fn; // a faster equal of zlib's (see EncoderOptions)
}

export class BgsnapDecoder implements StreamDecoder {
  constructor(private readonly opts: DecoderOptions = {}) {
    this.crc = opts.crc32 ?? crc32;
  }

  private readonly crc: Crc32Fn;

  private readonly q = new ChunkQueue();
  private offset = 0; // stream offset of the next unconsumed byte
  private sawMagic = false;
  private header: StreamHeader | undefined;
  private chain: ChainRules | undefined; // set for a chain stream (version 2)
  private blockPages: number[] | undefined;
  private ended = false;
  private frameNo = 0;
  private readonly counted = emptyTotals();
  private dctx: zstdBinding.DCtx | undefined;
  private error: Error | undefined;

  get bytesIn(): number {
    return this.offset + this.q.length;
  }

  // Events decoded before an error in the same chunk are returned first; the
  // error is thrown by the next call, so a consumer keeps every valid frame.
  push(chunk: Buffer): StreamEvent[] {
    if (this.error) throw this.error;
    this.q.push(chunk);
    const out: StreamEvent[] = [];
    try {
      if (!this.sawMagic && !this.readMagic()) return out;
      while (this.q.length >= FRAME_HEADER) {
        const ev = this.readFrame();
        if (ev === undefined) break;
        out.push(ev);
      }
    } catch (e) {
      if (out.length === 0) throw e;
      this.error = e as Error;
    }
    return out;
  }

  finish(): StreamEvent[] {
    if (this.error) throw this.error;
    if (this.ended) return [];
    const what = !this.sawMagic ? 'the stream magic' : this.q.length > 0 ? `frame ${this.frameNo}` : 'the END frame';
    const gen = this.chain?.current;
    const where = gen !== undefined ? ` (in generation ${gen}, before its GENERATION_END)` : this.chain ? ` (after generation ${this.chain.generations})` : '';
    throw new StreamError(FORMAT, 'TRUNCATED', this.bytesIn, `input ended before ${what} was complete${where}`);
  }

  private fail(code: ConstructorParameters<typeof StreamError>[1], detail: string, at = this.offset): never {
    throw new StreamError(FORMAT, code, at, detail);
  }

  private readMagic(): boolean {
    if (this.q.length < 8) return false;
    const m = this.q.take(8);
    if (!m.subarray(0, 6).equals(MAGIC)) this.fail('BAD_MAGIC', `not a bgsnap stream (magic ${m.subarray(0, 6).toString('hex')})`, 0);
    const v = m.readUInt16LE(6);
    if (!READABLE_VERSIONS.includes(v)) this.fail('BAD_VERSION', `bgsnap stream version ${v} is not supported (this build reads versions ${READABLE_VERSIONS.join(' and ')})`, 6);
    if (v === CHAIN_VERSION) this.chain = new ChainRules((code, detail) => this.fail(code, `${detail} (frame ${this.frameNo})`));
    this.offset = 8;
    this.sawMagic = true;
    return true;
  }

  private readFrame(): StreamEvent | undefined {
    const h = this.q.peek(FRAME_HEADER);
    const type = h.readUInt8(0);
    const flags = h.readUInt8(1);
    const length = h.readUInt32LE(4);
    const rawLength = h.readUInt32LE(8);
    if (this.ended) this.fail('MALFORMED', `bytes after the END frame`);
    if (type < FrameType.HEADER || type > (this.chain ? FrameType.GENERATION_END : FrameType.END)) this.fail('UNKNOWN_FRAME', `unknown frame type ${type} (frame ${this.frameNo})`);
    if (length > MAX_PAYLOAD || rawLength > MAX_PAYLOAD) {
      this.fail('TOO_LARGE', `${FrameType[type]} frame ${this.frameNo} claims ${Math.max(length, rawLength)} bytes, limit ${MAX_PAYLOAD}`);
    }
    if ((flags & ~FLAG_ZSTD) !== 0 || h.readUInt16LE(2) !== 0) this.fail('MALFORMED', `${FrameType[type]} frame ${this.frameNo} has unknown flags ${flags}`);
    if (this.q.length < FRAME_HEADER + length) return undefined;
    const plainPages = type === FrameType.PAGES && !(flags & FLAG_ZSTD);
    if (plainPages && this.opts.deferPageChecks) return this.consumed(this.readDeferredPages(h, length, rawLength), length);
    this.q.skip(FRAME_HEADER);
    const wire = this.q.take(length);
    const pageCrcs = plainPages ? this.pageCrcs(h, wire) : undefined;
    const crc = pageCrcs ? pageCrcs.frame : this.crc(wire, this.crc(h.subarray(0, 12)));
    if (crc !== h.readUInt32LE(12)) this.fail('BAD_CHECKSUM', `bad checksum in ${FrameType[type]} frame ${this.frameNo}`);
    const payload = flags & FLAG_ZSTD ? this.inflate(wire, rawLength, type) : wire;
    if (!(flags & FLAG_ZSTD) && rawLength !== length) this.fail('MALFORMED', `frame ${this.frameNo}: raw length ${rawLength} != length ${length}`);
    const ev = this.decodePayload(type, payload);
    if (ev.type === 'pages' && pageCrcs) ev.batch.crcs = pageCrcs.pages;
    return this.consumed(ev, length);
  }

  private consumed(ev: StreamEvent, length: number): StreamEvent {
    this.offset += FRAME_HEADER + length;
    this.frameNo++;
    return ev;
  }

  // A plain PAGES frame whose checksum the sink verifies from the CRCs of its
  // pages (PageCheck), so no page is read twice. Its metadata and its data pages
  // are taken as two ranges: pages that arrive as a chunk of their own (the
  // receiver's mapped stream file, receiver/mapped-input.ts, whose views only
  // guarded native code may read) are then neither copied nor read here. When
  // the layout does not add up, the whole frame is checked here, and a damaged
  // frame is reported as the bad checksum it is before any payload error.
  private readDeferredPages(h: Buffer, length: number, rawLength: number): StreamEvent {
    this.q.skip(FRAME_HEADER);
    const n = length >= 8 ? this.q.peek(8).readUInt32LE(4) : 0;
    const metaEnd = 8 + n * 5 + pad4(n);
    const meta = this.q.take(Math.min(length, metaEnd));
    const data = this.q.take(length - meta.length);
    const head = this.crc(h.subarray(0, 12));
    const expected = h.readUInt32LE(12);
    const intact = () => this.crc(data, this.crc(meta, head)) === expected;
    const ps = this.header?.pageSize;
    const fits = ps !== undefined && length >= 8 && meta.length === metaEnd && data.length % ps === 0;
    if (!fits && !intact()) this.fail('BAD_CHECKSUM', `bad checksum in PAGES frame ${this.frameNo}`);
    if (rawLength !== length) this.fail('MALFORMED', `frame ${this.frameNo}: raw length ${rawLength} != length ${length}`);
    let ev: StreamEvent;
    try {
      ev = this.decodePayload(FrameType.PAGES, meta, data);
    } catch (e) {
      if (fits && !intact()) this.fail('BAD_CHECKSUM', `bad checksum in PAGES frame ${this.frameNo}`);
      throw e;
    }
    if (fits && ev.type === 'pages') ev.batch.check = { seed: this.crc(meta, head), expected, frame: this.frameNo, offset: this.offset };
    return ev;
  }

  // The frame's checksum from the checksums of its data pages, which the image
  // keeps: each page is read once for both. Undefined when the payload's layout
  // does not add up (the plain checksum and the payload checks then report it).
  private pageCrcs(head: Buffer, wire: Buffer): { frame: number; pages: Uint32Array } | undefined {
    const metaEnd = this.pagesMetaEnd(wire);
    if (metaEnd === undefined) return undefined;
    const ps = this.header!.pageSize;
    let frame = this.crc(wire.subarray(0, metaEnd), this.crc(head.subarray(0, 12)));
    const pages = new Uint32Array((wire.length - metaEnd) / ps);
    for (let i = 0, o = metaEnd; i < pages.length; i++, o += ps) {
      pages[i] = this.crc(wire.subarray(o, o + ps));
      frame = crc32Combine(frame, pages[i], ps);
    }
    return { frame, pages };
  }

  private pagesMetaEnd(wire: Buffer): number | undefined {
    const ps = this.header?.pageSize;
    if (!ps || wire.length < 8) return undefined;
    const n = wire.readUInt32LE(4);
    const metaEnd = 8 + n * 5 + pad4(n);
    if (metaEnd > wire.length || (wire.length - metaEnd) % ps !== 0) return undefined;
    return metaEnd;
  }

  // Decompresses into a buffer of the size the checksummed header states, so a
  // hostile frame cannot make us allocate more than MAX_PAYLOAD.
  private inflate(wire: Buffer, rawLength: number, type: FrameType): Buffer {
    if (type !== FrameType.PAGES) this.fail('MALFORMED', `${FrameType[type]} frame ${this.frameNo} is compressed; only PAGES may be`);
    const out = Buffer.allocUnsafe(rawLength);
    let n = -1;
    try {
      // Loaded on the first compressed frame: most streams have none, and every command's start-up pays for it.
      const { DCtx } = require('zstd-napi/binding') as typeof zstdBinding;
      n = (this.dctx ??= new DCtx()).decompress(out, wire);
    } catch (e) {
      this.fail('MALFORMED', `frame ${this.frameNo}: zstd payload does not decompress to ${rawLength} bytes (${(e as Error).message})`);
    }
    if (n !== rawLength) this.fail('MALFORMED', `frame ${this.frameNo}: decompressed to ${n} bytes, header says ${rawLength}`);
    return out;
  }

  // rest: a PAGES frame's data pages when p holds only its metadata.
  private decodePayload(type: FrameType, p: Buffer, rest?: Buffer): StreamEvent {
    if (type !== FrameType.HEADER && !this.header) this.fail('MALFORMED', `${FrameType[type]} frame before the HEADER frame`);
    switch (type) {
      case FrameType.HEADER: return this.decodeHeader(p);
      case FrameType.BLOCKS: return this.decodeBlocks(p);
      case FrameType.PAGES: return this.decodePages(p, rest);
      case FrameType.DISCARD: return this.decodeDiscard(p);
      case FrameType.STATE: return this.decodeState(p);
      case FrameType.GENERATION: return { type: 'generation', generation: this.chain!.start(p) };
      case FrameType.GENERATION_END: return { type: 'generation-end', totals: this.chain!.end(p) };
      default: return this.decodeEnd(p);
    }
  }

  private need(p: Buffer, n: number, what: string): void {
    if (p.length < n) this.fail('MALFORMED', `${what} in frame ${this.frameNo} needs ${n} bytes, payload has ${p.length}`);
  }

  private decodeHeader(p: Buffer): StreamEvent {
    if (this.header) this.fail('MALFORMED', `second HEADER frame`);
    this.need(p, 34, 'HEADER');
    const source = SOURCES[p.readUInt8(16) - 1];
    if (!source) this.fail('MALFORMED', `unknown source kind ${p.readUInt8(16)}`);
    const pageSize = p.readUInt32LE(20);
    if (pageSize < 512 || pageSize > 1 << 21 || (pageSize & (pageSize - 1)) !== 0) this.fail('MALFORMED', `page size ${pageSize} is not a power of two in 512..2M`);
    const labelLen = p.readUInt16LE(32);
    this.need(p, 34 + labelLen, 'HEADER label');
    const header: StreamHeader = {
      snapshotId: p.subarray(0, 16).toString('hex'),
      source,
      pageSize,
      created: Number(p.readBigUInt64LE(24)),
      label: p.subarray(34, 34 + labelLen).toString('utf8'),
      ...(this.chain ? { chain: true } : {}),
    };
    this.header = header;
    return { type: 'header', header };
  }

  private decodeBlocks(p: Buffer): StreamEvent {
    if (this.blockPages && !this.chain) this.fail('BLOCK_MISMATCH', `second BLOCKS frame: the block table is fixed once sent`);
    this.chain?.inside('BLOCKS');
    this.need(p, 4, 'BLOCKS');
    const n = p.readUInt32LE(0);
    if (n * 18 > p.length - 4) this.fail('MALFORMED', `BLOCKS frame ${this.frameNo} claims ${n} blocks in ${p.length} bytes`);
    if (n > MAX_BLOCKS) this.fail('TOO_LARGE', `${n} blocks, limit ${MAX_BLOCKS}`);
    const blocks: BlockInfo[] = [];
    let o = 4;
    const ps = this.header!.pageSize;
    for (let i = 0; i < n; i++) {
      this.need(p, o + 18, `block ${i}`);
      const length = Number(p.readBigUInt64LE(o));
      const address = Number(p.readBigUInt64LE(o + 8));
      const nameLen = p.readUInt16LE(o + 16);
      this.need(p, o + 18 + nameLen, `block ${i} name`);
      if (length % ps !== 0 || length / ps > 0xffffffff) this.fail('MALFORMED', `block ${i} length ${length} is not a multiple of the page size or is too large`);
      blocks.push({ name: p.subarray(o + 18, o + 18 + nameLen).toString('utf8'), length, address });
      o += 18 + nameLen;
    }
    this.blockPages = blocks.map((b) => b.length / ps);
    this.chain?.addBlocks(this.blockPages);
    return { type: 'blocks', blocks };
  }

  private checkIndexes(block: number, index: Uint32Array, what: string): void {
    if (!this.blockPages && !this.chain) this.fail('BLOCK_MISMATCH', `${what} frame ${this.frameNo} before the BLOCKS frame`);
    const limit = this.chain ? this.chain.liveBlock(block, what) : this.blockPages![block];
    if (limit === undefined) this.fail('BLOCK_MISMATCH', `${what} frame ${this.frameNo} names block ${block}; the table has ${this.blockPages!.length}`);
    for (let i = 0; i < index.length; i++) {
      if (index[i] >= limit) this.fail('OUT_OF_BOUNDS', `${what} frame ${this.frameNo}: page ${index[i]} is past the end of block ${block} (${limit} pages)`);
    }
  }

  private readIndexes(p: Buffer, n: number): Uint32Array {
    const index = new Uint32Array(n);
    p.copy(Buffer.from(index.buffer), 0, 8, 8 + n * 4);
    return index;
  }

  private decodePages(p: Buffer, rest?: Buffer): StreamEvent {
    this.need(p, 8, 'PAGES');
    const block = p.readUInt32LE(0);
    const n = p.readUInt32LE(4);
    const metaEnd = 8 + n * 4 + n + pad4(n);
    this.need(p, metaEnd, 'PAGES index');
    const index = this.readIndexes(p, n);
    this.checkIndexes(block, index, 'PAGES');
    const zero = new Uint8Array(n);
    zero.set(p.subarray(8 + n * 4, 8 + n * 5));
    let zeros = 0;
    for (let i = 0; i < n; i++) zeros += zero[i] ? 1 : 0;
    const dataLen = (n - zeros) * this.header!.pageSize;
    const total = p.length + (rest?.length ?? 0);
    if (total !== metaEnd + dataLen) this.fail('MALFORMED', `PAGES frame ${this.frameNo}: ${n - zeros} data pages need ${dataLen} bytes, frame carries ${total - metaEnd}`);
    this.counted.pages += n;
    this.counted.zeroPages += zeros;
    this.counted.batches += 1;
    this.chain?.count('pages', n);
    this.chain?.count('zeroPages', zeros);
    this.chain?.count('batches', 1);
    return { type: 'pages', batch: { block, index, zero, data: rest ?? p.subarray(metaEnd) } };
  }

  private decodeDiscard(p: Buffer): StreamEvent {
    this.need(p, 8, 'DISCARD');
    const block = p.readUInt32LE(0);
    const n = p.readUInt32LE(4);
    if (p.length !== 8 + n * 4) this.fail('MALFORMED', `DISCARD frame ${this.frameNo}: ${n} indexes need ${8 + n * 4} bytes, frame has ${p.length}`);
    const index = this.readIndexes(p, n);
    this.checkIndexes(block, index, 'DISCARD');
    this.counted.discarded += n;
    this.chain?.count('discarded', n);
    return { type: 'discard', batch: { block, index } };
  }

  private decodeState(p: Buffer): StreamEvent {
    this.chain?.inside('STATE');
    this.chain?.count('states', 1);
    this.need(p, 2, 'STATE');
    const kindLen = p.readUInt16LE(0);
    this.need(p, 2 + kindLen, 'STATE kind');
    this.counted.states += 1;
    return { type: 'state', state: { kind: p.subarray(2, 2 + kindLen).toString('utf8'), data: p.subarray(2 + kindLen) } };
  }

  // The END frame carries the sender's totals; the stream counts as ended only
  // when they equal what this decoder saw, so a lost frame can never pass.
  private decodeEnd(p: Buffer): StreamEvent {
    const size = this.chain ? CHAIN_END_BYTES : 40;
    if (p.length !== size) this.fail('MALFORMED', `END frame has ${p.length} bytes, expected ${size}`);
    const v = [0, 1, 2, 3, 4].map((i) => Number(p.readBigUInt64LE(i * 8)));
    const totals: StreamTotals = { pages: v[0], zeroPages: v[1], discarded: v[2], batches: v[3], states: v[4] };
    for (const k of Object.keys(totals) as (keyof StreamTotals)[]) {
      if (totals[k] !== this.counted[k]) this.fail('TOTALS_MISMATCH', `END frame says ${k}=${totals[k]}, stream carried ${this.counted[k]}`);
    }
    if (this.chain) {
      totals.generations = Number(p.readBigUInt64LE(40));
      this.chain.checkEnd(totals.generations);
    }
    this.ended = true;
    return { type: 'end', totals };
  }
}
