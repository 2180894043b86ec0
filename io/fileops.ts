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
  // Copies length bytes from one file to another at the given offsets, in the
  // kernel (copy_file_range; pread/pwrite where it cannot). Returns the bytes
  // copied, fewer only when the input ends.
  copyRange(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): number;
  // Grows a pipe (F_SETPIPE_SZ); returns the size granted, or 0 if fd is not a pipe.
  setPipeSize(fd: number, bytes: number): number;
  // The file position of fd (lseek SEEK_CUR).
  tell(fd: number): number;
  // A read-only Buffer over [offset, offset+length) of a regular file (mmap,
  // MAP_POPULATE when populate is true); offset page-aligned; unmapped when
  // collected. Only the addon's guarded code may read it: JavaScript must not
  // (a truncated file raises SIGBUS; see io/native/mapped_input.cc).
  mapInput(fd: number, offset: number, length: number, populate?: boolean): Buffer;
  // Feeds PAGE records into the pipe outFd by reference (vmsplice of the data
  // file's pages, io/native/feed.cc): for the pages at index[i] (ascending) of
  // the window of windowPages pages at offset of dataFd, each after its header,
  // the i-th of heads (the first heads.length - 8*(n-1) bytes, the others 8).
  // Synchronous.
  feedPages(outFd: number, dataFd: number, offset: number, windowPages: number, index: Uint32Array, heads: Uint8Array): void;
  // write(2) of all of buf, waiting while a non-blocking fd is full.
  writeAll(fd: number, buf: Uint8Array): void;
  // Whether fd is a pipe (FIFO).
  isPipe(fd: number): boolean;
  // zlib's CRC-32 of buf continuing from crc (0 to start), at memory speed.
  // Throws code INPUT_TRUNCATED if buf is a mapInput view whose file shrank.
  crc32(buf: Uint8Array, crc?: number): number;
  // The image's per-page work for batches, in order, on a pool thread
  // (pagewrite.cc). badChecksum: the index of the job whose frame checksum
  // failed (it and those after it are not written), or -1. truncatedAt: the
  // index of the job whose pages were a mapInput view of a file that shrank
  // (those after it are not written, it may be in part), or -1; truncated says
  // where.
  // phase 'scan' only checksums and zero-tests (crcs, isData; no bitmap, no
  // write); 'write' then does the rest for jobs scanned before; neither: both.
  writePages(jobs: PageJob[], phase?: 'scan' | 'write'): Promise<PageResult>;
  // On a pool thread: starts the disk write of [writeFrom, writeTo) of a
  // regular file, and waits until [dropFrom, dropTo) is on the disk, then drops
  // it from the page cache (io/native/write_behind.cc). Rejects with code EIO,
  // ENOSPC, ... as write back failed.
  writeBehind(fd: number, dropFrom: number, dropTo: number, writeFrom: number, writeTo: number): Promise<void>;
}

export interface PageResult {
  badChecksum: number;
  truncatedAt: number;
  truncated?: string;
  duplicates: number;
  zeroRecords: number;
}

// One batch of pages for writePages. The bitmaps (present, dataBits, discarded:
// one bit per page of the block) are updated in place; crcs and isData (one slot
// per record) are filled; nothing may touch any of them until the promise settles.
// check: the frame's CRC before its data pages, and as sent; when it does not
// match, nothing of it is written.
export interface PageJob {
  fd: number;
  pageSize: number;
  base: number; // data-file offset of the block's page 0
  pages: number; // pages in the block; every index must be below it
  index: Uint32Array;
  zero: Uint8Array;
  data: Uint8Array;
  present: Uint8Array;
  dataBits: Uint8Array;
  discarded: Uint8Array;
  crcs: Uint32Array;
  isData: Uint8Array;
  check?: { seed: number; expected: number };
}

const fileopsPath = path.join(__dirname, '..', '..', 'build', 'Release', 'bgsnap_fileops.node');

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const fileops: FileOps = require(fileopsPath) as FileOps;
