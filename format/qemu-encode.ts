// Encoder for QEMU 7.2 migration streams, the inverse of qemu.ts. A restorable
// stream is the concatenation of
//
//   preamble (kept verbatim, or encodePreamble for tests)
//   encodeRamStart(...)                       01 id "ram" inst 4 | MEM_SIZE list | EOS | 7e id
//   RamPartWriter: begin() pages()* end()     02 id | records | EOS | 7e id     (any number)
//   device tail (kept verbatim)               FULL sections | 00 EOF | 06 len JSON
//
// QEMU 7.2 accepts pages in any order, grouped into any number of PART sections;
// RAM must precede the device tail. Each call returns one Buffer sized exactly for
// its records, so writing a 2 GiB image costs one allocation per batch, not per page.

import { QEMU_MAGIC, QEMU_PAGE, QEMU_VERSION, RAM, RAM_VERSION, SEC } from './qemu.js';
import { countedBytes, writeBe64, writeCounted } from './bytes.js';

export interface RamBlockSpec {
  name: string;
  length: number; // bytes, a multiple of 4096
}

export interface RamSectionInfo {
  sectionId: number;
  instanceId: number;
  version: number; // QEMU 7.2's ram handler only loads version 4
}

// Header + CONFIGURATION with no subsections, as QEMU 7.2 on x86 writes it.
export function encodePreamble(machineType: string): Buffer {
  const name = Buffer.from(machineType, 'latin1');
  const out = Buffer.alloc(8 + 5 + name.length);
  out.writeUInt32BE(QEMU_MAGIC, 0);
  out.writeUInt32BE(QEMU_VERSION, 4);
  out[8] = SEC.CONFIG;
  out.writeUInt32BE(name.length, 9);
  name.copy(out, 13);
  return out;
}

export function encodeRamStart(blocks: readonly RamBlockSpec[], ram: RamSectionInfo = defaultRam()): Buffer {
  const names = blocks.map((b) => countedBytes(b.name));
  const idstr = countedBytes('ram');
  const size = 1 + 4 + 1 + idstr.length + 8 + 8 + names.reduce((s, n) => s + 1 + n.length + 8, 0) + 8 + 5;
  const out = Buffer.alloc(size);
  out[0] = SEC.START;
  out.writeUInt32BE(ram.sectionId, 1);
  let p = writeCounted(out, 5, idstr);
  out.writeUInt32BE(ram.instanceId, p);
  out.writeUInt32BE(ram.version, p + 4);
  let total = 0;
  for (const b of blocks) {
    if (b.length % QEMU_PAGE !== 0) throw new RangeError(`block '${b.name}' length ${b.length} not page aligned`);
    total += b.length;
  }
  p = writeBe64(out, p + 8, total + RAM.MEM_SIZE);
  blocks.forEach((b, i) => {
    p = writeCounted(out, p, names[i]);
    p = writeBe64(out, p, b.length);
  });
  p = writeBe64(out, p, RAM.EOS);
  writeFooter(out, p, ram.sectionId);
  return out;
}

export function defaultRam(): RamSectionInfo {
  return { sectionId: 2, instanceId: 0, version: RAM_VERSION };
}

function writeFooter(out: Buffer, p: number, sectionId: number): number {
  out[p] = SEC.FOOTER;
  out.writeUInt32BE(sectionId, p + 1);
  return p + 5;
}

// Writes PART sections of page records. The "last block" that CONTINUE refers to
// is the loader's global state, so it is carried across sections here too.
export class RamPartWriter {
  private readonly names: Buffer[];
  private lastBlock = -1;
  private open = false;
  private slotCache = new WeakMap<Buffer, { count: number; shift: number; slots: Buffer[] }>();

  constructor(private readonly blocks: readonly RamBlockSpec[], private readonly sectionId = 2) {
    this.names = blocks.map((b) => countedBytes(b.name));
  }

  begin(): Buffer {
    if (this.open) throw new Error('RamPartWriter: PART section already open');
    this.open = true;
    const out = Buffer.alloc(5);
    out[0] = SEC.PART;
    out.writeUInt32BE(this.sectionId, 1);
    return out;
  }

  // Records for pages of one block, in the order of `index`. zero[i] = 1 writes a
  // ZERO record; otherwise the next 4096 bytes of `data` are the page. Without
  // `zero`, every page is a PAGE record.
  pages(block: number, index: Uint32Array, data: Buffer, zero?: Uint8Array): Buffer {
    const nonZero = zero ? index.length - countOnes(zero, index.length) : index.length;
    if (data.length < nonZero * QEMU_PAGE) throw new RangeError(`need ${nonZero} pages of data, got ${data.length} bytes`);
    const out = Buffer.allocUnsafe(this.recordsSize(block, index.length, nonZero));
    let p = 0;
    let d = 0;
    for (let i = 0; i < index.length; i++) {
      const isZero = zero !== undefined && zero[i] !== 0;
      p = this.recordHead(out, p, block, index[i], isZero ? RAM.ZERO : RAM.PAGE);
      if (isZero) {
        out[p++] = 0;
      } else {
        data.copy(out, p, d, d + QEMU_PAGE);
        p += QEMU_PAGE;
        d += QEMU_PAGE;
      }
    }
    return out;
  }

  // PAGE records for count consecutive pages from page first, with the page
  // bytes left unfilled: slots are the views where each page's 4096 bytes go, so
  // the caller reads the pages straight into place (one copy from the image
  // into the stream instead of two).
  // With `into` (a buffer the caller reuses once the previous records were
  // written), nothing is allocated: a fresh buffer per batch cost the kernel a
  // page fault and a zeroed page for every page of it, and the slot views for a
  // given layout are kept, so a 2 GiB replay makes no garbage per page.
  pageSlots(block: number, first: number, count: number, into?: Buffer): { out: Buffer; slots: Buffer[] } {
    const size = this.recordsSize(block, count, count);
    if (into && into.length < size) throw new RangeError(`buffer of ${into.length} bytes for ${size} bytes of records`);
    const out = into ? into.subarray(0, size) : Buffer.allocUnsafe(size);
    const shift = size - count * (8 + QEMU_PAGE); // the block name, in the first record only
    for (let i = 0, p = 0; i < count; i++) p = this.recordHead(out, p, block, first + i, RAM.PAGE) + QEMU_PAGE;
    const cached = into && this.slotCache.get(into);
    if (cached && cached.count === count && cached.shift === shift) return { out, slots: cached.slots };
    const slots: Buffer[] = [];
    for (let i = 0; i < count; i++) {
      const at = shift + i * (8 + QEMU_PAGE) + 8;
      slots.push(out.subarray(at, at + QEMU_PAGE));
    }
    if (into) this.slotCache.set(into, { count, shift, slots });
    return { out, slots };
  }

  // The headers alone of PAGE records for the pages of `index`, back to back
  // (the first one may name the block, the others are 8 bytes): for a writer
  // that puts each header in front of its page itself (vmsplice, no copy of the
  // page). Header + page, in order, are the bytes pages() would make.
  pageHeads(block: number, index: Uint32Array): Buffer {
    const size = this.recordsSize(block, index.length, index.length) - index.length * QEMU_PAGE;
    const out = Buffer.allocUnsafe(size);
    for (let i = 0, p = 0; i < index.length; i++) p = this.recordHead(out, p, block, index[i], RAM.PAGE);
    return out;
  }

  // ZERO records (9 bytes each with CONTINUE): cheaper than pages, and safe on a
  // destination whose memory is not known to be zero.
  zeros(block: number, index: Uint32Array): Buffer {
    const out = Buffer.allocUnsafe(this.recordsSize(block, index.length, 0));
    let p = 0;
    for (let i = 0; i < index.length; i++) {
      p = this.recordHead(out, p, block, index[i], RAM.ZERO);
      out[p++] = 0;
    }
    return out;
  }

  end(): Buffer {
    if (!this.open) throw new Error('RamPartWriter: no PART section open');
    this.open = false;
    const out = Buffer.alloc(8 + 5);
    writeFooter(out, writeBe64(out, 0, RAM.EOS), this.sectionId);
    return out;
  }

  private recordsSize(block: number, count: number, nonZero: number): number {
    if (!this.open) throw new Error('RamPartWriter: call begin() first');
    if (block < 0 || block >= this.blocks.length) throw new RangeError(`no block ${block}`);
    const nameBytes = count > 0 && block !== this.lastBlock ? 1 + this.names[block].length : 0;
    return count * 8 + nameBytes + (count - nonZero) + nonZero * QEMU_PAGE;
  }

  private recordHead(out: Buffer, p: number, block: number, index: number, flag: number): number {
    const offset = index * QEMU_PAGE;
    if (offset + QEMU_PAGE > this.blocks[block].length) {
      throw new RangeError(`page ${index} past end of block '${this.blocks[block].name}'`);
    }
    if (block === this.lastBlock) {
      // writeBe64 inlined: once per page of a replay, and the value is known valid
      const v = offset + flag + RAM.CONTINUE;
      out.writeUInt32BE(Math.floor(v / 0x1_0000_0000), p);
      out.writeUInt32BE(v >>> 0, p + 4);
      return p + 8;
    }
    this.lastBlock = block;
    return writeCounted(out, writeBe64(out, p, offset + flag), this.names[block]);
  }
}

function countOnes(a: Uint8Array, n: number): number {
  let c = 0;
  for (let i = 0; i < n; i++) if (a[i] !== 0) c++;
  return c;
}
