// Loads the small file-operations addon built from io/native (node-gyp target
// bgsnap_fileops). It is separate from the capture addon so that the receiver,
// convert and inspect never load ptrace or userfaultfd code. Compiled to
// dist/io/fileops.js, so the build dir is two up.
import * as path from 'node:path';

export interface FileOps {
  // Deallocates [offset, offset+length) keeping the file size (a zero page becomes a hole).
  punchHole(fd: number, offset: number, length: number): void;
  // Next offset >= offset that holds data, or -1 past the last data.
  seekData(fd: number, offset: number): number;
  // Next offset >= offset that is a hole (or the file's end).
  seekHole(fd: number, offset: number): number;
  // Grows a pipe (F_SETPIPE_SZ); returns the size granted, or 0 if fd is not a pipe.
  setPipeSize(fd: number, bytes: number): number;
}

const fileopsPath = path.join(__dirname, '..', '..', 'build', 'Release', 'bgsnap_fileops.node');

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const fileops: FileOps = require(fileopsPath) as FileOps;
