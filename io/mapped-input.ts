// A regular file read as a stream of memory-mapped windows: each chunk is a view
// of the page cache, so the bytes are not copied into fresh buffers (which the
// kernel zeroes first) on their way to the decoder. Windows are unmapped when
// the last view of them is collected. Growth of the file while it is read is
// followed; the stream ends at the size the file has when the reader gets there.
import * as fs from 'node:fs';
import { Readable } from 'node:stream';
import { fileops } from './fileops';

const WINDOW = 64 << 20;

export function mappedFileStream(fd: number, start = 0): Readable {
  let pos = start;
  return new Readable({
    highWaterMark: 2, // windows, not bytes: up to 128 MiB mapped ahead
    objectMode: false,
    read() {
      try {
        const size = fs.fstatSync(fd).size;
        if (pos >= size) return void this.push(null);
        const base = pos - (pos % 4096);
        const len = Math.min(WINDOW, size - base);
        const view = fileops.mapFile(fd, base, len).subarray(pos - base);
        pos = base + len;
        this.push(view);
      } catch (e) {
        this.destroy(e as Error);
      }
    },
  });
}
