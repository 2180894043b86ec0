// The bgsnap stream's framing, shared by its encoder (bgsnap-encode.ts) and
// decoder (bgsnap.ts): magic, versions, frame types, limits and the frame
// header with its checksum. See SPEC.md.
import { crc32Combine } from './crc32';
import type { SourceKind, StreamTotals } from './events';

export const MAGIC = Buffer.from('BGSNAP', 'latin1');
export const VERSION = 1; // one snapshot
export const CHAIN_VERSION = 2; // a chain of generations (SPEC.md, "Chains of generations")
export const READABLE_VERSIONS = [VERSION, CHAIN_VERSION];
export const FRAME_HEADER = 16;
export const MAX_PAYLOAD = 64 * 1024 * 1024;
export const MAX_BLOCKS = 1 << 20; // in one table, or over a whole chain
export const FLAG_ZSTD = 1;

export enum FrameType { HEADER = 1, BLOCKS = 2, PAGES = 3, DISCARD = 4, STATE = 5, END = 6, GENERATION = 7, GENERATION_END = 8 }
export const SOURCES: SourceKind[] = ['qemu', 'process'];

// zlib's crc32(data, crc); callers with a faster equal function (the fileops
// addon's, io/native/crc32.cc) pass it in, since format/ does no I/O and loads no addon.
export type Crc32Fn = (data: Uint8Array, crc?: number) => number;

export function isBgsnapStream(first: Buffer): boolean {
  return first.length >= MAGIC.length && first.subarray(0, MAGIC.length).equals(MAGIC);
}

export function emptyTotals(): StreamTotals {
  return { pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0 };
}

export function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v, 0);
  return b;
}

export function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

// The last part may come with the CRC-32 of each of its pages (a producer
// that checksummed them while they were in its cache): they are combined into
// the frame's checksum instead of reading the part again.
export interface PartCrcs {
  crcs: Uint32Array;
  pageSize: number;
}

export function frame(crcFn: Crc32Fn, type: FrameType, parts: Buffer[], flags = 0, rawLength?: number, lastCrcs?: PartCrcs): Buffer[] {
  const length = parts.reduce((s, p) => s + p.length, 0);
  if (length > MAX_PAYLOAD) throw new Error(`bgsnap frame of ${length} bytes exceeds ${MAX_PAYLOAD}`);
  const h = Buffer.alloc(FRAME_HEADER);
  h.writeUInt8(type, 0);
  h.writeUInt8(flags, 1);
  h.writeUInt32LE(length, 4);
  h.writeUInt32LE(rawLength ?? length, 8);
  let crc = crcFn(h.subarray(0, 12), 0);
  const read = lastCrcs ? parts.length - 1 : parts.length;
  for (let i = 0; i < read; i++) crc = parts[i].length ? crcFn(parts[i], crc) : crc;
  if (lastCrcs) for (const c of lastCrcs.crcs) crc = crc32Combine(crc, c, lastCrcs.pageSize);
  h.writeUInt32LE(crc, 12);
  return [h, ...parts];
}
