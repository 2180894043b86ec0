// Replays an image as a QEMU 7.2 migration stream that unmodified QEMU restores
// with -incoming: the saved header and configuration, a ram START with the block
// list, one PART with every data page in address order, then the saved device
// state verbatim. Zero pages of the main RAM block are omitted (a fresh -incoming
// destination's RAM is zero); the small blocks (ROMs, ACPI tables) get explicit
// ZERO records because the destination fills them itself when it builds the machine.
import { RamPartWriter, encodeRamStart, type RamSectionInfo } from '../format/qemu-encode';
import type { ImageReader, PageRun } from './image-reader';
import type { Output } from '../io/output';
import { fileops } from '../io/fileops';
import { Progress } from '../io/progress';

const RUN = 512; // pages per read and per write: 2 MiB
const WINDOW = 2048; // pages of the data file mapped at once for the pipe feed: 8 MiB

// stdout as a pipe, written with plain syscalls (never through process.stdout,
// whose buffered writes could land after pages spliced in meanwhile): the page
// runs go in by reference (fileops.feedPages), so this side copies no page.
export class PipeFeed {
  bytes = 0;
  private constructor(readonly fd: number) {}

  // A PipeFeed on fd when it is a pipe, else undefined (write through Output).
  // BGSNAP_FEED=copy takes the copying path anyway, for comparing the two.
  static open(fd: number): PipeFeed | undefined {
    if (process.env.BGSNAP_FEED === 'copy' || !fileops.isPipe(fd)) return undefined;
    // Each record takes two pipe slots (header, page): 1 MiB holds 128 pages.
    fileops.setPipeSize(fd, 1 << 20);
    return new PipeFeed(fd);
  }

  async write(buf: Buffer): Promise<void> {
    fileops.writeAll(this.fd, buf);
    this.bytes += buf.length;
  }

  // write(2) returns once the pipe holds a copy: the caller may reuse buf.
  writeSettled(buf: Buffer): Promise<void> {
    return this.write(buf);
  }
}

type ByteOut = Pick<Output, 'write' | 'writeSettled'>;

export async function requiredState(img: ImageReader, kind: string): Promise<Buffer> {
  const b = await img.state(kind);
  if (!b) throw new Error(`${img.dir} has no ${kind} state: it was not captured from QEMU (source: ${img.header.source})`);
  return b;
}

export async function convertToQemu(img: ImageReader, out: Output | PipeFeed): Promise<void> {
  const preamble = await requiredState(img, 'qemu.preamble');
  const ram = JSON.parse((await requiredState(img, 'qemu.ram-section')).toString('utf8')) as RamSectionInfo;
  const devices = await requiredState(img, 'qemu.devices');
  // Disk blocks are not RAM: QEMU would refuse an unknown RAM block. Page
  // records name blocks by their position in the RAM block list.
  const mem = img.memoryBlocks;
  const blocks = mem.map((i) => ({ name: img.blocks[i].name, length: img.blocks[i].length }));
  await out.write(preamble);
  await out.write(encodeRamStart(blocks, ram));
  const part = new RamPartWriter(blocks, ram.sectionId);
  await out.write(part.begin());
  const main = img.mainBlock;
  const progress = new Progress('bgsnap-convert', mem.reduce((s, b) => s + img.blocks[b].pages, 0), 'pages');
  // A chain image's pages lie in several generations' files: those are read.
  const splice = out instanceof PipeFeed && !img.chain && img.format.pageSize === 4096 ? out : undefined;
  for (let r = 0; r < mem.length; r++) {
    const w = { img, part, b: mem[r], ramIndex: r, zeros: mem[r] !== main, progress };
    await (splice ? spliceBlock(w, splice) : writeBlock(w, out));
  }
  await out.write(part.end());
  await out.write(devices);
  progress.done();
}

interface BlockWork {
  img: ImageReader;
  part: RamPartWriter;
  b: number; // the block in the image
  ramIndex: number; // its position among the RAM blocks, which records name
  zeros: boolean; // write ZERO records for its zero pages
  progress: Progress;
}

// Data pages are read straight into their records (pageSlots + preadv), so each
// page is copied once on its way from the image to the stream. Two record
// buffers take turns: one is being written while the next run is read into
// the other, and a buffer is refilled only once its write settled.
async function writeBlock(w: BlockWork, out: ByteOut): Promise<void> {
  const bufs = [Buffer.allocUnsafe(RUN * (8 + 4096) + 256), Buffer.allocUnsafe(RUN * (8 + 4096) + 256)];
  const inFlight: (Promise<void> | undefined)[] = [undefined, undefined];
  let turn = 0;
  for await (const run of w.img.runs(w.b, RUN)) {
    if (run.data) {
      await inFlight[turn];
      const { out: records, slots } = w.part.pageSlots(w.ramIndex, run.first, run.count, bufs[turn]);
      w.img.readPagesInto(w.b, run.first, slots);
      const written = out.writeSettled(records);
      written.catch(() => undefined); // a failed write rejects where it is awaited, not as unhandled
      inFlight[turn] = written;
      turn ^= 1;
    } else if (w.zeros) {
      await out.write(zeroRecords(w, run));
    }
    w.progress.add(run.count);
  }
  await Promise.all(inFlight);
}

// The same records into a pipe, each page spliced from the data file's page
// cache after a header the encoder made (pageHeads): byte for byte what
// writeBlock writes. Data pages are gathered across the zero runs between them
// (a main block's zero pages are not written) into windows of up to WINDOW
// pages, one mapping and one run of vmsplice calls each; a block whose zero
// pages are written sends what it gathered before each ZERO record.
async function spliceBlock(w: BlockWork, out: PipeFeed): Promise<void> {
  const base = w.img.blocks[w.b].base;
  const idx = new Uint32Array(WINDOW);
  let n = 0;
  let start = 0;
  const flush = () => {
    if (n === 0) return;
    const pages = idx.subarray(0, n);
    const heads = w.part.pageHeads(w.ramIndex, pages);
    fileops.feedPages(out.fd, w.img.dataFd, base + start * 4096, pages[n - 1] - start + 1, pages.map((p) => p - start), heads);
    out.bytes += heads.length + n * 4096;
    n = 0;
  };
  for await (const run of w.img.runs(w.b, RUN)) {
    if (run.data) {
      for (let p = run.first; p < run.first + run.count; p++) {
        if (n > 0 && p - start >= WINDOW) flush();
        if (n === 0) start = p;
        idx[n++] = p;
      }
    } else if (w.zeros) {
      flush();
      await out.write(zeroRecords(w, run));
    }
    w.progress.add(run.count);
  }
  flush();
}

function zeroRecords(w: BlockWork, run: PageRun): Buffer {
  const index = new Uint32Array(run.count);
  for (let i = 0; i < run.count; i++) index[i] = run.first + i;
  return w.part.zeros(w.ramIndex, index);
}
