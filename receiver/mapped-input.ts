// A bgsnap stream file read for the image writer without copying its pages: the
// frame headers, the page frames' metadata and every other frame are read with
// pread (copies, a few KiB per MiB of pages), and the data pages of each plain
// PAGES frame are handed on as a view of a memory mapping of the file. The
// decoder takes those pages as a range of their own (format/bgsnap.ts,
// deferPageChecks) without reading them, and the page writer in the fileops
// addon checksums, zero-tests and pwrites them straight from the page cache.
//
// Safe against the file being truncated while mapped (which raises SIGBUS on a
// read of a vanished page): no JavaScript reads the mapped views; the addon's
// reads of them run under a SIGBUS guard and pwrite from a vanished page fails
// with EFAULT (io/native/mapped_input.cc), and either ends the stream as
// TRUNCATED, as a read() at the new end would. A pread past the new end
// returns short, and the decoder reports the frame it cut.
import * as fs from 'node:fs';
import { Readable } from 'node:stream';
import { FLAG_ZSTD, FRAME_HEADER, FrameType, MAGIC, MAX_PAYLOAD, pad4 } from '../format/bgsnap-frame';
import { fileops } from '../io/fileops';

// Bytes mapped at a time; views keep their window until collected. Each window
// is external memory to V8, and each one made it run a full GC: 64 MiB windows
// cost 28 full GCs on a 1.76 GiB stream and 0.15-0.2 s more CPU than 256 MiB (7).
const WINDOW = 256 << 20;
// One pread covers a frame header and the metadata of up to ~790 pages, or
// several small frames; under 4 KiB, Buffer.allocUnsafe takes it from its pool
// (larger buffers made ~7% of the receiver's CPU time go to garbage collection).
const LOOKAHEAD = 4000;
const PLAIN_CHUNK = 8 << 20; // a stream that is not bgsnap (QEMU's) is just read

// The stream file on fd from byte start, as a Readable of Buffers for
// receive() into an image (a sink that checks pages: ImageWriter).
// populate: map windows with MAP_POPULATE. Off by default: the same CPU time
// (measured on tmpfs), but page tables are then filled by the page writer's
// thread as it goes, in parallel, and a file not in the page cache is not read
// 256 MiB at a time on the event loop.
export function mappedStreamFile(fd: number, start: number, opts: { populate?: boolean } = {}): Readable {
  return Readable.from(new FileFrames(fd, start, opts.populate ?? false).chunks(), { objectMode: true, highWaterMark: 8 });
}

class FileFrames {
  private pos: number;
  private buf = Buffer.alloc(0); // copied bytes of the file from bufPos
  private bufPos = 0;
  private win: { off: number; view: Buffer } | undefined;

  constructor(private readonly fd: number, start: number, private readonly populate: boolean) {
    this.pos = start;
  }

  *chunks(): Generator<Buffer> {
    const magic = this.read(MAGIC.length + 2);
    if (magic.length) yield magic;
    if (magic.length < MAGIC.length || !magic.subarray(0, MAGIC.length).equals(MAGIC)) return yield* this.plain();
    for (;;) {
      const h = this.read(FRAME_HEADER, false);
      if (h.length < FRAME_HEADER) return void (h.length && (yield h));
      const length = h.readUInt32LE(4);
      // Over the limit: the decoder refuses the header; nothing to read after it.
      if (length > MAX_PAYLOAD) return yield this.read(FRAME_HEADER);
      const meta = this.pagesMeta(h, length);
      if (meta === undefined) {
        const frame = this.read(FRAME_HEADER + length);
        yield frame;
        if (frame.length < FRAME_HEADER + length) return;
        continue;
      }
      const head = this.read(FRAME_HEADER + meta);
      yield head;
      if (head.length < FRAME_HEADER + meta) return;
      const data = this.pages(length - meta);
      if (data.length) yield data;
      if (data.length < length - meta) return;
    }
  }

  // The metadata length of a plain PAGES frame with data pages after it, the
  // same split the decoder makes; undefined for any other frame.
  private pagesMeta(h: Buffer, length: number): number | undefined {
    if (h.readUInt8(0) !== FrameType.PAGES || h.readUInt8(1) & FLAG_ZSTD || length < 8) return undefined;
    const head = this.read(FRAME_HEADER + 8, false);
    if (head.length < FRAME_HEADER + 8) return undefined;
    const n = head.readUInt32LE(FRAME_HEADER + 4);
    const meta = 8 + n * 5 + pad4(n);
    return meta < length ? meta : undefined;
  }

  // len bytes from pos, copied (pread through a look-ahead buffer); fewer only
  // where the file ends. consume: advance pos past them.
  private read(len: number, consume = true): Buffer {
    if (this.pos < this.bufPos || this.pos + len > this.bufPos + this.buf.length) this.fill(len);
    const at = this.pos - this.bufPos;
    const out = this.buf.subarray(at, Math.min(at + len, this.buf.length));
    if (consume) this.pos += out.length;
    return out;
  }

  private fill(len: number): void {
    const buf = Buffer.allocUnsafe(Math.max(len, LOOKAHEAD));
    let got = 0;
    while (got < buf.length) {
      const n = fs.readSync(this.fd, buf, got, buf.length - got, this.pos + got);
      if (n === 0) break;
      got += n;
    }
    this.buf = buf.subarray(0, got);
    this.bufPos = this.pos;
  }

  // len bytes of data pages from pos: a view of the mapped window holding them
  // (a new window when they are not all in the current one). Where the file is
  // already shorter, a copy of what is left, so the decoder reports the cut.
  private pages(len: number): Buffer {
    const end = this.pos + len;
    if (!this.win || this.pos < this.win.off || end > this.win.off + this.win.view.length) {
      const size = fs.fstatSync(this.fd).size;
      if (end > size) return this.read(len);
      const off = this.pos - (this.pos % 4096);
      this.win = { off, view: fileops.mapInput(this.fd, off, Math.min(Math.max(WINDOW, end - off), size - off), this.populate) };
    }
    const view = this.win.view.subarray(this.pos - this.win.off, end - this.win.off);
    this.pos = end;
    return view;
  }

  private *plain(): Generator<Buffer> {
    for (;;) {
      const b = this.read(PLAIN_CHUNK);
      if (b.length === 0) return;
      yield b;
    }
  }
}
