// Replays an image as a QEMU 7.2 migration stream that unmodified QEMU restores
// with -incoming: the saved header and configuration, a ram START with the block
// list, one PART with every data page in address order, then the saved device
// state verbatim. Zero pages of the main RAM block are omitted (a fresh -incoming
// destination's RAM is zero); the small blocks (ROMs, ACPI tables) get explicit
// ZERO records because the destination fills them itself when it builds the machine.
import { RamPartWriter, encodeRamStart, type RamSectionInfo } from '../format/qemu-encode';
import type { ImageReader } from './image-reader';
import type { Output } from '../io/output';
import { Progress } from '../io/progress';

const RUN = 512; // pages per read and per write: 2 MiB

export async function requiredState(img: ImageReader, kind: string): Promise<Buffer> {
  const b = await img.state(kind);
  if (!b) throw new Error(`${img.dir} has no ${kind} state: it was not captured from QEMU (source: ${img.header.source})`);
  return b;
}

export async function convertToQemu(img: ImageReader, out: Output): Promise<void> {
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
  for (let r = 0; r < mem.length; r++) await writeBlock(img, out, part, mem[r], r, mem[r] !== main, progress);
  await out.write(part.end());
  await out.write(devices);
  progress.done();
}

// Data pages are read straight into their records (pageSlots + preadv), so each
// page is copied once on its way from the image to the stream. Records name the
// block by its position among the RAM blocks (ramIndex). Two record buffers take
// turns: one is being written while the next run is read into the other, and a
// buffer is refilled only once its write settled.
async function writeBlock(img: ImageReader, out: Output, part: RamPartWriter, b: number, ramIndex: number, zeros: boolean, progress: Progress): Promise<void> {
  const bufs = [Buffer.allocUnsafe(RUN * (8 + 4096) + 256), Buffer.allocUnsafe(RUN * (8 + 4096) + 256)];
  const inFlight: (Promise<void> | undefined)[] = [undefined, undefined];
  let turn = 0;
  for await (const run of img.runs(b, RUN)) {
    if (run.data) {
      await inFlight[turn];
      const { out: records, slots } = part.pageSlots(ramIndex, run.first, run.count, bufs[turn]);
      img.readPagesInto(b, run.first, slots);
      const written = out.writeSettled(records);
      written.catch(() => undefined); // a failed write rejects where it is awaited, not as unhandled
      inFlight[turn] = written;
      turn ^= 1;
    } else if (zeros) {
      const index = new Uint32Array(run.count);
      for (let i = 0; i < run.count; i++) index[i] = run.first + i;
      await out.write(part.zeros(ramIndex, index));
    }
    progress.add(run.count);
  }
  await Promise.all(inFlight);
}
