// Decoder for QEMU 7.2 to 10.x migration streams (`migrate exec:...`, plain
// precopy or background-snapshot). Only the RAM part is understood; device state
// has no length fields, so everything from the first device section on is kept
// opaque. What we cannot follow is refused by name (qemu-refusals.ts).
//
//   "QEVM" be32 3                                   file header
//   07 be32 len machine-type [05 subsection]*       CONFIGURATION (no footer)
//   01 be32 id  cnt "ram" be32 instance be32 4      START ram
//      be64 (total|0x04) {cnt name, be64 len}*      MEM_SIZE block list
//      be64 0x10                                    EOS
//   7E be32 id                                      footer
//   02|03 be32 id  record* be64 0x10  7E be32 id    PART / END ram
//      record = be64 (offset|flags) [cnt block] body
//               flags 0x08 PAGE: 4096 bytes; 0x02 ZERO: 1 fill byte
//               flag 0x20 CONTINUE: block name omitted, same block as the last
//               record of any ram section (global, not per section)
//               be64 0x200 MULTIFD_FLUSH, no body (8.1 without multifd)
//   08 be16 11 be16 0                               SWITCHOVER_START (10.0 precopy)
//   04 ... device FULL sections ... 00 EOF [06 be32 len JSON]   opaque tail
//
// Parsing is record by record over whatever bytes have arrived. An incomplete
// record is left in place and retried when more bytes come, so a record is never
// seen half-parsed. Every record except the tail is at most MAX_RECORD bytes,
// which bounds the bytes copied to stitch two chunks together.

import { randomBytes } from 'node:crypto';
import { StreamError, type StreamErrorCode } from './errors.js';
import type { BlockInfo, StreamEvent, StreamDecoder, StreamTotals } from './events.js';
import { readBe64 } from './bytes.js';
import { checkTail } from './qemu-tail.js';
import { CMD, MULTIFD, UNSUPPORTED_FLAGS, commandRefusal } from './qemu-refusals.js';
import { configSubsectionEnd } from './qemu-config.js';

export const QEMU_MAGIC = 0x5145564d; // "QEVM"
export const QEMU_VERSION = 3;
export const QEMU_PAGE = 4096;
export const RAM_VERSION = 4;

export const SEC = {
  EOF: 0x00, START: 0x01, PART: 0x02, END: 0x03, FULL: 0x04,
  SUBSECTION: 0x05, VMDESC: 0x06, CONFIG: 0x07, COMMAND: 0x08, FOOTER: 0x7e,
} as const;

export const RAM = {
  FULL: 0x01, ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20,
  XBZRLE: 0x40, HOOK: 0x80, COMPRESS_PAGE: 0x100, MULTIFD_FLUSH: 0x200,
} as const;

const FLAG_MASK = QEMU_PAGE - 1;
const MAX_RECORD = 8192; // PAGE with a 255-byte name is 4360; headers are smaller
const BATCH_PAGES = 256;
const MAX_BLOCKS = 4096;
const MAX_TAIL = 256 * 1024 * 1024;
const EMPTY = Buffer.alloc(0);

export function isQemuStream(firstBytes: Buffer): boolean {
  return firstBytes.length >= 4 && firstBytes.readUInt32BE(0) === QEMU_MAGIC;
}

export interface QemuDecoderOptions {
  snapshotId?: string; // default: 32 random hex digits
  created?: number; // default: Date.now() when the header is decoded
}

type Stage = 'magic' | 'config' | 'section' | 'memsize' | 'ram' | 'footer' | 'tail';

interface Block { name: string; length: number }

export class QemuDecoder implements StreamDecoder {
  bytesIn = 0;
  private stage: Stage = 'magic';
  private pending = EMPTY; // unparsed bytes, always our own copy
  private base = 0; // stream offset of buf[0] in the buffer being parsed
  private want = 'file header'; // what an incomplete record was, for TRUNCATED
  private out: StreamEvent[] = [];
  private magicBytes = EMPTY;
  private blocks: Block[] = [];
  private byName = new Map<string, number>();
  private memTotal = -1; // MEM_SIZE total; -1 until the list was seen
  private memLeft = 0;
  private lastBlock = -1;
  private multifdFlushes = 0;
  private ramId = -1;
  private sectionId = -1;
  private tail: Buffer[] = [];
  private tailLen = 0;
  private totals: StreamTotals = { pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0 };
  // The batch being filled: pages of one block, flushed on block change or when full.
  private bBlock = -1;
  private bCount = 0;
  private bIndex = new Uint32Array(BATCH_PAGES);
  private bZero = new Uint8Array(BATCH_PAGES);
  private bData = EMPTY;
  private bDataLen = 0;

  constructor(private readonly opts: QemuDecoderOptions = {}) {}

  push(chunk: Buffer): StreamEvent[] {
    const out: StreamEvent[] = (this.out = []);
    const start = this.bytesIn;
    this.bytesIn += chunk.length;
    if (this.stage === 'tail') return this.addTail(chunk, 0), out;
    const pos = this.pending.length > 0 ? this.resume(chunk, start) : 0;
    if (pos < 0) return out;
    const p = this.run(chunk, pos, chunk.length, start);
    if (this.inTail()) this.addTail(chunk, p);
    else this.pending = Buffer.from(chunk.subarray(p)); // copy: the caller may reuse chunk
    return out;
  }

  // Finishes the records that began in the leftover bytes by stitching on only
  // the head of the new chunk; the rest of the chunk is parsed in place. Returns
  // where to continue in `chunk`, or -1 when there is nothing more to parse.
  private resume(chunk: Buffer, start: number): number {
    const pend = this.pending;
    const head = Math.min(chunk.length, MAX_RECORD);
    const joined = Buffer.concat([pend, chunk.subarray(0, head)]);
    const p = this.run(joined, 0, pend.length, start - pend.length);
    this.pending = EMPTY;
    if (this.inTail()) {
      this.addTail(joined, p);
      this.addTail(chunk, head);
      return -1;
    }
    if (p >= pend.length) return p - pend.length;
    if (head < chunk.length) this.fail('TOO_LARGE', start - pend.length + p, `record over ${MAX_RECORD} bytes`);
    this.pending = joined.subarray(p);
    return -1;
  }

  finish(): StreamEvent[] {
    const out: StreamEvent[] = (this.out = []);
    if (this.stage !== 'tail') {
      const inside = this.pending.length > 0 ? 'inside' : 'before';
      this.fail('TRUNCATED', this.bytesIn, `stream ended ${inside} ${this.want}`);
    }
    const tail = Buffer.concat(this.tail, this.tailLen);
    checkTail(tail, this.bytesIn - tail.length);
    this.emitState('qemu.devices', tail);
    out.push({ type: 'end', totals: { ...this.totals } });
    return out;
  }

  // Parses records starting before `limit`; returns where parsing stopped (the
  // start of an incomplete record, or the tail's first byte).
  private run(buf: Buffer, pos: number, limit: number, base: number): number {
    this.base = base;
    while (pos < limit) {
      const np = this.step(buf, pos, limit);
      if (this.inTail() || np === pos) return np;
      pos = np;
    }
    return pos;
  }

  private inTail(): boolean {
    return this.stage === 'tail';
  }

  private step(buf: Buffer, pos: number, limit: number): number {
    switch (this.stage) {
      case 'ram': return this.ramRecords(buf, pos, limit);
      case 'memsize': return this.memSizeEntry(buf, pos);
      case 'section': return this.sectionHeader(buf, pos);
      case 'footer': return this.footer(buf, pos);
      case 'magic': return this.magic(buf, pos);
      case 'config': return this.config(buf, pos);
      default: return pos;
    }
  }

  private fail(code: StreamErrorCode, offset: number, detail: string): never {
    throw new StreamError('qemu', code, offset, detail);
  }

  private need(buf: Buffer, pos: number, n: number, what: string): boolean {
    if (buf.length - pos >= n) return true;
    this.want = what;
    return false;
  }

  private magic(buf: Buffer, pos: number): number {
    if (!this.need(buf, pos, 8, 'file header')) return pos;
    const magic = buf.readUInt32BE(pos);
    if (magic !== QEMU_MAGIC) this.fail('BAD_MAGIC', this.base + pos, `bad magic 0x${magic.toString(16)}, expected "QEVM"`);
    const version = buf.readUInt32BE(pos + 4);
    if (version !== QEMU_VERSION) {
      const why = version === 2 ? ' (SaveVM v2 format is obsolete)' : '';
      this.fail('BAD_VERSION', this.base + pos + 4, `unknown stream version ${version}${why}, expected 3`);
    }
    this.magicBytes = Buffer.from(buf.subarray(pos, pos + 8));
    this.stage = 'config';
    return pos + 8;
  }

  // CONFIGURATION is a vmstate: be32 length + machine type, then optional
  // subsections. Needs one byte of lookahead to know whether a subsection follows.
  private config(buf: Buffer, pos: number): number {
    const what = 'CONFIGURATION section';
    if (!this.need(buf, pos, 1, what)) return pos;
    if (buf[pos] !== SEC.CONFIG) this.fail('MALFORMED', this.base + pos, `expected CONFIGURATION (07), got ${hex(buf[pos])}`);
    if (!this.need(buf, pos, 5, what)) return pos;
    const len = buf.readUInt32BE(pos + 1);
    if (len === 0 || len > 255) this.fail('MALFORMED', this.base + pos + 1, `machine type name length ${len}`);
    let end = pos + 5 + len;
    for (;;) {
      if (!this.need(buf, end, 1, what)) return pos;
      if (buf[end] !== SEC.SUBSECTION) break;
      const next = configSubsectionEnd(buf, end, this.base);
      if (next < 0) return (this.want = 'CONFIGURATION subsection'), pos;
      end = next;
    }
    const label = buf.toString('latin1', pos + 5, pos + 5 + len);
    const header = {
      snapshotId: this.opts.snapshotId ?? randomBytes(16).toString('hex'),
      source: 'qemu' as const, pageSize: QEMU_PAGE, created: this.opts.created ?? Date.now(), label,
    };
    this.out.push({ type: 'header', header });
    this.emitState('qemu.preamble', Buffer.concat([this.magicBytes, buf.subarray(pos, end)]));
    this.stage = 'section';
    this.want = 'a section header';
    return end;
  }

  private sectionHeader(buf: Buffer, pos: number): number {
    if (!this.need(buf, pos, 1, 'a section header')) return pos;
    const type = buf[pos];
    switch (type) {
      case SEC.EOF: return this.enterTail(pos);
      case SEC.START: case SEC.FULL: return this.namedSection(buf, pos, type);
      case SEC.PART: case SEC.END: return this.ramPart(buf, pos);
      case SEC.COMMAND: return this.command(buf, pos);
      default: this.fail('UNKNOWN_FRAME', this.base + pos, `unknown section type 0x${hex(type)}`);
    }
  }

  // COMMAND: 08 be16 cmd be16 len data. Only SWITCHOVER_START passes, dropped: it
  // carries no state, only tells a destination's VFIO devices iteration is over.
  private command(buf: Buffer, pos: number): number {
    if (!this.need(buf, pos, 5, 'COMMAND section')) return pos;
    const cmd = buf.readUInt16BE(pos + 1);
    const len = buf.readUInt16BE(pos + 3);
    if (cmd !== CMD.SWITCHOVER_START) this.fail('UNSUPPORTED', this.base + pos, commandRefusal(cmd));
    if (len !== 0) this.fail('MALFORMED', this.base + pos, `SWITCHOVER_START command with ${len} bytes of data, expected 0`);
    return pos + 5;
  }

  private namedSection(buf: Buffer, pos: number, type: number): number {
    const kind = type === SEC.START ? 'START' : 'FULL';
    if (!this.need(buf, pos, 6, `${kind} section header`)) return pos;
    const n = buf[pos + 5];
    if (n === 0) this.fail('MALFORMED', this.base + pos + 5, `${kind} section with an empty idstr`);
    if (!this.need(buf, pos, 6 + n + 8, `${kind} section header`)) return pos;
    const id = buf.readUInt32BE(pos + 1);
    const idstr = buf.toString('latin1', pos + 6, pos + 6 + n);
    if (idstr !== 'ram') {
      if (type === SEC.FULL) return this.enterTail(pos);
      this.fail('UNSUPPORTED', this.base + pos,
        `iterable section '${idstr}' (START, id ${id}): only RAM can be parsed; another live handler is active`);
    }
    if (this.ramId >= 0) this.fail('MALFORMED', this.base + pos, `second ram ${kind} section (id ${id})`);
    const instanceId = buf.readUInt32BE(pos + 6 + n);
    const version = buf.readUInt32BE(pos + 10 + n);
    if (version !== RAM_VERSION) this.fail('BAD_VERSION', this.base + pos, `ram section version ${version}, expected 4`);
    this.emitState('qemu.ram-section', Buffer.from(JSON.stringify({ sectionId: id, instanceId, version })));
    this.ramId = this.sectionId = id;
    this.stage = 'ram';
    return pos + 14 + n;
  }

  private ramPart(buf: Buffer, pos: number): number {
    const kind = buf[pos] === SEC.PART ? 'PART' : 'END';
    if (!this.need(buf, pos, 5, `${kind} section header`)) return pos;
    const id = buf.readUInt32BE(pos + 1);
    if (this.ramId < 0 || id !== this.ramId) {
      const ram = this.ramId < 0 ? 'no ram START seen yet' : `ram has id ${this.ramId}`;
      this.fail('MALFORMED', this.base + pos, `${kind} section for unknown section id ${id} (${ram})`);
    }
    this.sectionId = id;
    this.stage = 'ram';
    return pos + 5;
  }

  private footer(buf: Buffer, pos: number): number {
    if (!this.need(buf, pos, 5, `footer of section ${this.sectionId}`)) return pos;
    const id = buf.readUInt32BE(pos + 1);
    const detail = `footer mismatch: expected 7e ${this.sectionId}, got ${hex(buf[pos])} ${id}`;
    if (buf[pos] !== SEC.FOOTER || id !== this.sectionId) this.fail('MALFORMED', this.base + pos, detail);
    this.stage = 'section';
    this.want = 'a section header';
    return pos + 5;
  }

  private enterTail(pos: number): number {
    if (this.memTotal < 0 || this.memLeft > 0) this.fail('MALFORMED', this.base + pos, 'device state before the ram block list');
    this.checkMultifd(pos);
    this.flush();
    this.stage = 'tail';
    return pos;
  }

  // MULTIFD_FLUSH is a no-op without multifd (QEMU 8.1 sent it regardless). With
  // multifd, data pages travel on other channels and none on this one.
  private checkMultifd(pos: number): void {
    if (this.multifdFlushes === 0 || this.totals.pages > this.totals.zeroPages) return;
    this.fail('UNSUPPORTED', this.base + pos, `${this.multifdFlushes} MULTIFD_FLUSH records and no data page: ${MULTIFD}`);
  }

  private addTail(buf: Buffer, from: number): void {
    if (from >= buf.length) return;
    this.tailLen += buf.length - from;
    if (this.tailLen > MAX_TAIL) this.fail('TOO_LARGE', this.bytesIn, `device tail over ${MAX_TAIL} bytes`);
    this.tail.push(Buffer.from(buf.subarray(from)));
  }

  // One MEM_SIZE list entry: counted name, be64 used_length. Optional per-block
  // fields (postcopy page size, x-ignore-shared address) are not self-describing;
  // neither capability can be on for the streams we accept.
  private memSizeEntry(buf: Buffer, pos: number): number {
    const what = 'MEM_SIZE block list entry';
    if (!this.need(buf, pos, 1, what)) return pos;
    const n = buf[pos];
    // An EOS here (00...) means the total is larger than the listed blocks.
    if (n === 0) this.fail('MALFORMED', this.base + pos, `RAM block name of length 0, or MEM_SIZE total ${this.memTotal} too large`);
    if (!this.need(buf, pos, 1 + n + 8, what)) return pos;
    const name = buf.toString('latin1', pos + 1, pos + 1 + n);
    const length = readBe64(buf, pos + 1 + n);
    const sum = `MEM_SIZE total ${this.memTotal} is not the sum of the block lengths (at '${name}')`;
    if (length < 0 || length > this.memLeft) this.fail('MALFORMED', this.base + pos, sum);
    if (length % QEMU_PAGE !== 0) this.fail('MALFORMED', this.base + pos, `block '${name}' length ${length} not page aligned`);
    if (this.byName.has(name)) this.fail('MALFORMED', this.base + pos, `block '${name}' listed twice`);
    if (this.blocks.length >= MAX_BLOCKS) this.fail('TOO_LARGE', this.base + pos, `over ${MAX_BLOCKS} RAM blocks`);
    this.byName.set(name, this.blocks.length);
    this.blocks.push({ name, length });
    this.memLeft -= length;
    if (this.memLeft === 0) this.endBlockList();
    return pos + 1 + n + 8;
  }

  private endBlockList(): void {
    this.out.push({ type: 'blocks', blocks: this.blocks.map((b): BlockInfo => ({ ...b, address: 0 })) });
    this.stage = 'ram';
  }

  // The hot loop: page records are handled inline; anything else goes through
  // ramControl. Nothing is changed until a record is known to be complete.
  private ramRecords(buf: Buffer, pos: number, limit: number): number {
    while (pos < limit) {
      if (buf.length - pos < 8) return (this.want = 'a RAM record'), pos;
      const lo = buf.readUInt32BE(pos + 4);
      const flags = lo & FLAG_MASK;
      if ((flags & ~RAM.CONTINUE) !== RAM.PAGE && (flags & ~RAM.CONTINUE) !== RAM.ZERO) {
        return this.ramControl(buf, pos, flags);
      }
      let p = pos + 8;
      let block = this.lastBlock;
      if ((flags & RAM.CONTINUE) === 0) {
        if (!this.need(buf, p, 1, 'a RAM record block name')) return pos;
        const n = buf[p];
        if (!this.need(buf, p, 1 + n, 'a RAM record block name')) return pos;
        block = this.lookupBlock(buf, p, n);
        p += 1 + n;
      } else if (block < 0) {
        this.fail('MALFORMED', this.base + pos, 'CONTINUE record with no previous block');
      }
      const offset = buf.readUInt32BE(pos) * 0x1_0000_0000 + (lo - flags);
      const blk = this.blocks[block];
      if (offset + QEMU_PAGE > blk.length) this.outOfBounds(pos, offset, blk);
      const zero = flags & RAM.ZERO;
      if (!this.need(buf, p, zero ? 1 : QEMU_PAGE, zero ? 'a ZERO record' : 'PAGE data')) return pos;
      if (zero && buf[p] !== 0) this.fail('MALFORMED', this.base + p, `ZERO record with fill byte 0x${hex(buf[p])}`);
      this.lastBlock = block;
      this.addPage(block, offset / QEMU_PAGE, buf, zero ? -1 : p);
      pos = zero ? p + 1 : p + QEMU_PAGE;
    }
    return pos;
  }

  private outOfBounds(pos: number, offset: number, blk: Block): never {
    const where = `page offset 0x${offset.toString(16)} past end of block '${blk.name}' (0x${blk.length.toString(16)})`;
    this.fail('OUT_OF_BOUNDS', this.base + pos, where);
  }

  private lookupBlock(buf: Buffer, p: number, n: number): number {
    if (n === 0) this.fail('MALFORMED', this.base + p, 'RAM block name of length 0');
    if (this.memTotal < 0 || this.memLeft > 0) this.fail('MALFORMED', this.base + p, 'page record before the MEM_SIZE block list');
    const name = buf.toString('latin1', p + 1, p + 1 + n);
    const block = this.byName.get(name);
    if (block === undefined) this.fail('BLOCK_MISMATCH', this.base + p, `unknown RAM block '${name}'`);
    return block;
  }

  private ramControl(buf: Buffer, pos: number, flags: number): number {
    if (flags === RAM.MULTIFD_FLUSH) return this.multifdFlushes++, pos + 8;
    for (const [bit, why] of UNSUPPORTED_FLAGS) {
      if (flags & bit) this.fail('UNSUPPORTED', this.base + pos, `RAM record flags 0x${flags.toString(16)}, ${why}`);
    }
    if (flags === RAM.EOS) return (this.stage = 'footer'), pos + 8;
    if (flags === RAM.MEM_SIZE) return this.memSizeStart(buf, pos);
    const known = RAM.ZERO | RAM.PAGE | RAM.CONTINUE | RAM.MEM_SIZE | RAM.EOS;
    if (flags & ~known) this.fail('UNSUPPORTED', this.base + pos, `unknown RAM record flags 0x${flags.toString(16)}`);
    this.fail('MALFORMED', this.base + pos, `invalid RAM record flag combination 0x${flags.toString(16)}`);
  }

  private memSizeStart(buf: Buffer, pos: number): number {
    if (this.memTotal >= 0) this.fail('MALFORMED', this.base + pos, 'second MEM_SIZE block list');
    const total = readBe64(buf, pos) - RAM.MEM_SIZE;
    if (total < 0) this.fail('TOO_LARGE', this.base + pos, 'MEM_SIZE total over 2^53');
    this.memTotal = this.memLeft = total;
    if (total === 0) this.endBlockList();
    else this.stage = 'memsize';
    return pos + 8;
  }

  private addPage(block: number, index: number, buf: Buffer, dataAt: number): void {
    if (this.bCount > 0 && (this.bBlock !== block || this.bCount === BATCH_PAGES)) this.flush();
    const i = this.bCount++;
    this.bBlock = block;
    this.bIndex[i] = index;
    this.totals.pages++;
    this.bZero[i] = dataAt < 0 ? 1 : 0;
    if (dataAt < 0) return void this.totals.zeroPages++;
    if (this.bData.length === 0) this.bData = Buffer.allocUnsafe(BATCH_PAGES * QEMU_PAGE);
    buf.copy(this.bData, this.bDataLen, dataAt, dataAt + QEMU_PAGE);
    this.bDataLen += QEMU_PAGE;
  }

  private flush(): void {
    const n = this.bCount;
    if (n === 0) return;
    // A mostly-zero batch gets an exact-size copy so the 1 MiB slab is not pinned.
    const used = this.bData.subarray(0, this.bDataLen);
    const data = this.bDataLen * 2 < this.bData.length ? Buffer.from(used) : used;
    const batch = { block: this.bBlock, index: this.bIndex.slice(0, n), zero: this.bZero.slice(0, n), data };
    this.out.push({ type: 'pages', batch });
    this.totals.batches++;
    this.bCount = 0;
    this.bData = this.bDataLen * 2 < this.bData.length ? this.bData : EMPTY;
    this.bDataLen = 0;
  }

  private emitState(kind: string, data: Buffer): void {
    this.out.push({ type: 'state', state: { kind, data } });
    this.totals.states++;
  }
}

function hex(b: number): string {
  return b.toString(16).padStart(2, '0');
}
