// CRC-32 (IEEE, as zlib computes it) of a frame assembled from the CRCs of its
// pieces. A receiver needs both the frame's checksum (to trust the wire) and a
// checksum per page (kept in the image for --verify); reading every page twice
// for them cost a third of the receiver's CPU. Appending a piece B to a message
// A has crc(A‖B) = S_len(B)(crc(A)) ^ crc(B), where S_n, "run n zero bytes
// through the register", is linear (zlib's crc32_combine). For a fixed n it is
// four 256-entry tables, one per byte of the CRC.
import * as zlib from 'node:zlib';

// zlib's crc32 treats a zero-length buffer without memory (new ArrayBuffer(0),
// an empty native buffer) as a request for the initial value and returns 0
// instead of the running checksum, so empty pieces must not be fed to it.
export function crc32(data: Uint8Array, crc = 0): number {
  return data.length === 0 ? crc : zlib.crc32(data, crc);
}

const shifts = new Map<number, Uint32Array[]>();

// The tables of S_n. crc32(zeros(n), c) = S_n(c) ^ crc32(zeros(n), 0): the
// register's pre- and post-inversion add a constant, removed by the XOR.
function shiftTables(n: number): Uint32Array[] {
  let t = shifts.get(n);
  if (t) return t;
  const zeros = Buffer.alloc(n);
  const base = zlib.crc32(zeros, 0);
  t = [0, 1, 2, 3].map((k) => Uint32Array.from({ length: 256 }, (_, v) => (zlib.crc32(zeros, (v << (8 * k)) >>> 0) ^ base) >>> 0));
  shifts.set(n, t);
  return t;
}

// crc(A‖B) from crc(A), crc(B) and the length of B.
export function crc32Combine(crcA: number, crcB: number, lenB: number): number {
  const [t0, t1, t2, t3] = shiftTables(lenB);
  return (t0[crcA & 255] ^ t1[(crcA >>> 8) & 255] ^ t2[(crcA >>> 16) & 255] ^ t3[crcA >>> 24] ^ crcB) >>> 0;
}
