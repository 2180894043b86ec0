// Writes an image's memory as flat bytes. For a QEMU image: one block (by default
// the main RAM block, which for guests up to 3 GiB is guest-physical RAM from
// address 0). For a process image: every mapping back to back, with a JSON map
// (OUT.map.json) of where each one starts. Holes stay holes when OUT is a file.
import * as fs from 'node:fs';
import { openPrivateFile, type CreateOptions } from '../io/private-file';
import type { ImageReader } from './image-reader';
import { Progress } from '../io/progress';

export interface RawLayout {
  name: string;
  address: number;
  length: number;
  offset: number; // in the output file
}

export function rawLayout(img: ImageReader, blockName?: string): { block: number; offset: number }[] {
  if (blockName !== undefined) {
    const i = img.blocks.findIndex((b) => b.name === blockName);
    if (i < 0) throw new Error(`image has no block named "${blockName}" (blocks: ${img.blocks.map((b) => b.name).join(', ')})`);
    return [{ block: i, offset: 0 }];
  }
  if (img.header.source === 'qemu') {
    return [{ block: img.mainBlock, offset: 0 }];
  }
  let off = 0;
  return img.blocks.map((b, i) => ({ block: i, offset: (off += b.length) - b.length }));
}

// Writes with positioned writes into a file truncated to full size, so zero pages
// are never written and stay sparse.
export async function convertToRaw(img: ImageReader, outPath: string, blockName?: string, opts: CreateOptions = {}): Promise<RawLayout[]> {
  const layout = rawLayout(img, blockName);
  const size = layout.reduce((s, l) => Math.max(s, l.offset + img.blocks[l.block].length), 0);
  const fd = openPrivateFile(outPath, opts);
  try {
    fs.ftruncateSync(fd, size);
    const buf = Buffer.allocUnsafe(256 * img.format.pageSize);
    const progress = new Progress('bgsnap-convert', layout.reduce((s, l) => s + img.blocks[l.block].pages, 0), 'pages');
    for (const l of layout) {
      for await (const run of img.runs(l.block)) {
        progress.add(run.count);
        if (!run.data) continue;
        const bytes = img.readPages(l.block, run.first, run.count, buf);
        fs.writeSync(fd, bytes, 0, bytes.length, l.offset + run.first * img.format.pageSize);
      }
    }
    fs.fsyncSync(fd);
    progress.done();
  } finally {
    fs.closeSync(fd);
  }
  return layout.map((l) => ({ name: img.blocks[l.block].name, address: img.blocks[l.block].address, length: img.blocks[l.block].length, offset: l.offset }));
}
