// Per-block page bitmaps kept in memory while receiving: which pages arrived
// (present), which hold bytes in the data file (data; the rest are holes = zero)
// and which the target destroyed before they were saved (discarded). Stored in
// the index in chunks so a reader loads only the part it needs.

export const CHUNK_PAGES = 32768;

export class Bitset {
  readonly bits: Uint8Array;
  constructor(readonly size: number) {
    this.bits = new Uint8Array(Math.ceil(size / 8));
  }
  get(i: number): boolean {
    return (this.bits[i >>> 3] & (1 << (i & 7))) !== 0;
  }
  set(i: number): void {
    this.bits[i >>> 3] |= 1 << (i & 7);
  }
  clear(i: number): void {
    this.bits[i >>> 3] &= ~(1 << (i & 7));
  }
  count(): number {
    let n = 0;
    for (const b of this.bits) n += POPCOUNT[b];
    return n;
  }
}

const POPCOUNT = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let v = b; v; v >>= 1) n += v & 1;
  return n;
});

export class BlockPages {
  readonly present: Bitset;
  readonly data: Bitset;
  readonly discarded: Bitset;
  constructor(readonly pages: number) {
    this.present = new Bitset(pages);
    this.data = new Bitset(pages);
    this.discarded = new Bitset(pages);
  }

  chunks(): number {
    return Math.ceil(this.pages / CHUNK_PAGES);
  }

  // The three bitmaps of one chunk, back to back, as stored under bitmap/B/C.
  encodeChunk(c: number): Buffer {
    const from = (c * CHUNK_PAGES) / 8;
    const len = Math.ceil(Math.min(CHUNK_PAGES, this.pages - c * CHUNK_PAGES) / 8);
    const out = Buffer.alloc(len * 3);
    [this.present, this.data, this.discarded].forEach((s, k) => out.set(s.bits.subarray(from, from + len), k * len));
    return out;
  }

  decodeChunk(c: number, buf: Buffer): void {
    const from = (c * CHUNK_PAGES) / 8;
    const len = Math.ceil(Math.min(CHUNK_PAGES, this.pages - c * CHUNK_PAGES) / 8);
    if (buf.length !== len * 3) throw new Error(`bitmap chunk ${c} has ${buf.length} bytes, expected ${len * 3}`);
    [this.present, this.data, this.discarded].forEach((s, k) => s.bits.set(buf.subarray(k * len, (k + 1) * len), from));
  }
}
