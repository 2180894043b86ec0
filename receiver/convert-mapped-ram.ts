// Writes an image as QEMU's mapped-ram migration file (format/qemu-mapped-ram.ts),
// which QEMU >= 9.0 restores with the mapped-ram capability and
// `migrate-incoming file:FILE`, with multifd reading pages in parallel.
//
// Images already keep every page at a fixed offset, so each run of data pages is
// one copy_file_range from the image's data file into the block's page region:
// no page passes through this process (a chain generation's pages are read and
// written instead, since they sit in several layers). Zero pages stay holes in the output.
// The main RAM block's zero pages get a clear bit (QEMU skips them; a fresh
// destination's RAM is zero, as QEMU's own mapped-ram save assumes); the small
// blocks (ROMs, ACPI tables), which the destination fills itself when it builds
// the machine, get every bit set, so their zero pages are read back as zeroes
// from the holes instead of keeping the destination's own content.
import * as fs from 'node:fs';
import { fileops } from '../io/fileops';
import { openPrivateFile, type CreateOptions } from '../io/private-file';
import { Progress } from '../io/progress';
import { planMappedRam, withMappedRamCapability, type MappedRamBlock } from '../format/qemu-mapped-ram';
import type { RamSectionInfo } from '../format/qemu-encode';
import type { ImageReader } from './image-reader';
import { requiredState } from './convert-qemu';

const RUN = 16384; // pages per copy at most (64 MiB), so progress moves

export interface MappedRamResult {
  size: number; // the file's length
  dataBytes: number; // page bytes copied
}

export async function convertToMappedRam(img: ImageReader, outPath: string, create: CreateOptions = {}): Promise<MappedRamResult> {
  const preamble = withMappedRamCapability(await requiredState(img, 'qemu.preamble'));
  const ram = JSON.parse((await requiredState(img, 'qemu.ram-section')).toString('utf8')) as RamSectionInfo;
  const devices = await requiredState(img, 'qemu.devices');
  const mem = img.memoryBlocks; // disks are not RAM blocks
  const plan = planMappedRam(preamble, mem.map((i) => ({ name: img.blocks[i].name, length: img.blocks[i].length })), ram);
  const fd = openPrivateFile(outPath, create); // 0600, never through a symbolic link: it holds guest memory
  let dataBytes = 0;
  try {
    const size = plan.tailAt + devices.length;
    fs.ftruncateSync(fd, size); // the page regions start as holes
    for (const piece of plan.pieces) writeAt(fd, piece.bytes, piece.at);
    writeAt(fd, devices, plan.tailAt);
    const progress = new Progress('bgsnap-convert', mem.reduce((s, b) => s + img.blocks[b].pages, 0), 'pages');
    for (let r = 0; r < mem.length; r++) {
      dataBytes += await copyBlock(img, fd, mem[r], plan.blocks[r], mem[r] === img.mainBlock, progress);
    }
    fs.fsyncSync(fd);
    progress.done();
    return { size, dataBytes };
  } finally {
    fs.closeSync(fd);
  }
}

// Copies the block's data runs into its page region and writes its bitmap.
async function copyBlock(img: ImageReader, fd: number, b: number, mr: MappedRamBlock, main: boolean, progress: Progress): Promise<number> {
  const ps = img.format.pageSize;
  const blk = img.blocks[b];
  const bitmap = Buffer.alloc(mr.bitmapBytes);
  if (main) Buffer.from((await img.pages(b)).data.bits).copy(bitmap);
  else fillBits(bitmap, blk.pages);
  let copied = 0;
  for await (const run of img.runs(b, RUN)) {
    if (run.data && img.chain) copyThrough(img, fd, b, mr, run.first, run.count);
    else if (run.data) {
      const len = run.count * ps;
      const n = fileops.copyRange(img.dataFd, blk.base + run.first * ps, fd, mr.pagesOffset + run.first * ps, len);
      if (n !== len) throw new Error(`${img.dir}/data ends inside block ${blk.name} (page ${run.first}): copied ${n} of ${len} bytes`);
    }
    if (run.data) copied += run.count * ps;
    progress.add(run.count);
  }
  writeAt(fd, bitmap, mr.bitmapOffset);
  return copied;
}

// A chain generation's pages sit in several layers of the data file, not at
// the block's own offsets: they are read (ImageReader resolves each page) and
// written, 1 MiB at a time.
function copyThrough(img: ImageReader, fd: number, b: number, mr: MappedRamBlock, first: number, count: number): void {
  const ps = img.format.pageSize;
  const buf = Buffer.allocUnsafe(256 * ps);
  for (let p = first; p < first + count; p += 256) {
    const n = Math.min(256, first + count - p);
    writeAt(fd, img.readPages(b, p, n, buf), mr.pagesOffset + p * ps);
  }
}

function fillBits(bitmap: Buffer, pages: number): void {
  bitmap.fill(0xff, 0, pages >>> 3);
  for (let p = pages & ~7; p < pages; p++) bitmap[p >>> 3] |= 1 << (p & 7);
}

function writeAt(fd: number, buf: Buffer, at: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done, at + done);
}
