// Writes one drive of a whole-VM snapshot as a sparse raw disk image: the
// drive's contents at the snapshot instant, holes where the snapshot holds
// zeroes or unallocated ranges. QEMU then runs it as -drive format=raw.
import * as fs from 'node:fs';
import { openPrivateFile, type CreateOptions } from '../io/private-file';
import type { ImageReader } from './image-reader';
import { Progress } from '../io/progress';

export async function convertToDisk(img: ImageReader, driveId: string, outPath: string, create: CreateOptions = {}): Promise<{ size: number; dataBytes: number }> {
  const drives = await img.drives();
  const drive = drives.find((d) => d.id === driveId);
  if (!drive) {
    throw new Error(`image ${img.dir} holds no drive "${driveId}" (drives: ${drives.map((d) => d.id).join(', ') || 'none; captured without disks'})`);
  }
  // 0600, never through a symbolic link: the file holds the guest's disk.
  const fd = openPrivateFile(outPath, create);
  let dataBytes = 0;
  try {
    fs.ftruncateSync(fd, drive.size);
    const pageSize = img.format.pageSize;
    const buf = Buffer.allocUnsafe(256 * pageSize);
    const progress = new Progress('bgsnap-convert', img.blocks[drive.block].pages, 'pages');
    for await (const run of img.runs(drive.block)) {
      progress.add(run.count);
      if (!run.data) continue;
      const bytes = img.readPages(drive.block, run.first, run.count, buf);
      const at = run.first * pageSize;
      const len = Math.min(bytes.length, drive.size - at); // the last page may pass the disk's end
      fs.writeSync(fd, bytes, 0, len, at);
      dataBytes += len;
    }
    fs.fsyncSync(fd);
    progress.done();
  } finally {
    fs.closeSync(fd);
  }
  return { size: drive.size, dataBytes };
}
