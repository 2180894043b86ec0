// Layout of QEMU's mapped-ram migration file (QEMU >= 9.0, migration/ram.c
// mapped_ram_setup_ramblock / parse_ramblock_mapped_ram; docs/devel/migration/
// mapped-ram.rst), which a destination loads with the mapped-ram capability and
// `migrate-incoming file:FILE`. Pure layout and encoding: the caller writes the
// pieces at their offsets and fills the page regions.
//
//   preamble, whose CONFIGURATION carries the subsection
//     05 counted "configuration/capabilities" be32 1 | be32 n {counted name}*
//   (mapped-ram is a validated capability: a destination that has it on refuses a
//   stream that does not list it, and the other way round)
//   01 be32 id counted "ram" be32 instance be32 version       START ram
//   be64 (total | MEM_SIZE), then per block:
//     counted idstr, be64 length,
//     be32 1, be64 page size, be64 bitmap_offset, be64 pages_offset   (28 bytes)
//     ... bitmap at bitmap_offset: one bit per page, unsigned longs in host
//         order (x86: little-endian, so bit p is byte p/8, bit p%8), rounded to 8 bytes
//     ... pages at pages_offset (rounded up to 1 MiB): page p at pages_offset + p*4096,
//         read only where its bit is set (the file region of a clear bit is skipped)
//   the next block's idstr follows at pages_offset + length;
//   be64 EOS, 7e be32 id                                       end of START
//   device state (FULL sections, EOF, description) verbatim
//
// Checked against a file QEMU 10.0 itself wrote with `migrate file:` and
// mapped-ram on: the same offsets for the same block list. QEMU then sends PART
// and END sections holding only EOS (and a SWITCHOVER_START command); a loader
// needs none of them, so they are left out.

import { QEMU_PAGE, RAM, SEC } from './qemu.js';
import { countedBytes, writeBe64, writeCounted } from './bytes.js';
import type { RamBlockSpec, RamSectionInfo } from './qemu-encode.js';

export const MAPPED_RAM_ALIGN = 0x100000; // MAPPED_RAM_FILE_OFFSET_ALIGNMENT
const HEADER_BYTES = 28;
const CAPS_NAME = 'configuration/capabilities';

export interface MappedRamBlock extends RamBlockSpec {
  bitmapOffset: number;
  bitmapBytes: number;
  pagesOffset: number;
}

// A piece of the main stream and the file offset it goes to.
export interface Piece {
  at: number;
  bytes: Buffer;
}

export interface MappedRamPlan {
  blocks: MappedRamBlock[];
  pieces: Piece[]; // everything but bitmaps, pages and the device state
  tailAt: number; // where the device state goes
}

export function bitmapBytes(length: number): number {
  return Math.ceil(length / QEMU_PAGE / 64) * 8; // BITS_TO_LONGS(pages) * sizeof(long)
}

// The saved preamble (file header + CONFIGURATION) with the capabilities
// subsection added. A stream that already lists capabilities never reaches an
// image (the decoder refuses it), so there is none to merge with.
export function withMappedRamCapability(preamble: Buffer): Buffer {
  const name = countedBytes(CAPS_NAME);
  const cap = countedBytes('mapped-ram');
  const sub = Buffer.alloc(2 + name.length + 4 + 4 + 1 + cap.length);
  sub[0] = SEC.SUBSECTION;
  let p = writeCounted(sub, 1, name);
  p = sub.writeUInt32BE(1, p); // subsection version
  p = sub.writeUInt32BE(1, p); // one capability
  writeCounted(sub, p, cap);
  return Buffer.concat([preamble, sub]);
}

// Offsets of every block and the main-stream pieces, for a stream that starts
// with `preamble` (already carrying the capability) at file offset 0.
export function planMappedRam(preamble: Buffer, blocks: readonly RamBlockSpec[], ram: RamSectionInfo): MappedRamPlan {
  const idstr = countedBytes('ram');
  const head = Buffer.alloc(1 + 4 + 1 + idstr.length + 8 + 8);
  head[0] = SEC.START;
  head.writeUInt32BE(ram.sectionId, 1);
  let p = writeCounted(head, 5, idstr);
  p = head.writeUInt32BE(ram.instanceId, p);
  p = head.writeUInt32BE(ram.version, p);
  writeBe64(head, p, blocks.reduce((s, b) => s + b.length, 0) + RAM.MEM_SIZE);
  const pieces: Piece[] = [{ at: 0, bytes: Buffer.concat([preamble, head]) }];
  let at = preamble.length + head.length;
  const out: MappedRamBlock[] = [];
  for (const b of blocks) {
    if (b.length % QEMU_PAGE !== 0) throw new RangeError(`block '${b.name}' length ${b.length} not page aligned`);
    const { block, bytes } = blockHeader(b, at);
    pieces.push({ at, bytes });
    out.push(block);
    at = block.pagesOffset + b.length;
  }
  const end = Buffer.alloc(8 + 5);
  writeBe64(end, 0, RAM.EOS);
  end[8] = SEC.FOOTER;
  end.writeUInt32BE(ram.sectionId, 9);
  pieces.push({ at, bytes: end });
  return { blocks: out, pieces, tailAt: at + end.length };
}

// counted idstr, be64 length, then the 28-byte header; the bitmap follows it.
function blockHeader(b: RamBlockSpec, at: number): { block: MappedRamBlock; bytes: Buffer } {
  const name = countedBytes(b.name);
  const bytes = Buffer.alloc(1 + name.length + 8 + HEADER_BYTES);
  let p = writeBe64(bytes, writeCounted(bytes, 0, name), b.length);
  const bitmapOffset = at + bytes.length;
  const bitmap = bitmapBytes(b.length);
  const pagesOffset = Math.ceil((bitmapOffset + bitmap) / MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN;
  p = bytes.writeUInt32BE(1, p); // MAPPED_RAM_HDR_VERSION
  p = writeBe64(bytes, p, QEMU_PAGE);
  p = writeBe64(bytes, p, bitmapOffset);
  writeBe64(bytes, p, pagesOffset);
  return { block: { name: b.name, length: b.length, bitmapOffset, bitmapBytes: bitmap, pagesOffset }, bytes };
}
