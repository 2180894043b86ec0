// A queue of received chunks that hands out byte ranges without joining the whole
// backlog: a range inside one chunk is a zero-copy view, only a range that spans
// chunks is copied. Decoders peek, decide whether a unit is complete, then take.

export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  private avail = 0;

  get length(): number {
    return this.avail;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.avail += chunk.length;
  }

  // Returns the next n bytes without consuming them (n <= length).
  peek(n: number): Buffer {
    const first = this.chunks[0];
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    let pos = this.head;
    for (const c of this.chunks) {
      const k = Math.min(n - off, c.length - pos);
      c.copy(out, off, pos, pos + k);
      off += k;
      pos = 0;
      if (off === n) break;
    }
    return out;
  }

  // Consumes and returns the next n bytes (n <= length).
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  skip(n: number): void {
    this.avail -= n;
    while (n > 0) {
      const rest = this.chunks[0].length - this.head;
      if (n < rest) {
        this.head += n;
        return;
      }
      n -= rest;
      this.chunks.shift();
      this.head = 0;
    }
  }
}
