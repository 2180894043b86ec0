// Shared by the thin CLIs: one way to report an error (program name, message,
// errno code when there is one) and to exit non-zero, and --stats output.
import * as fs from 'node:fs';
import type { Readable } from 'node:stream';
import { fileops } from '../io/fileops';
import { mappedStreamFile } from '../receiver/mapped-input';

export function fatal(prog: string, err: unknown): never {
  const e = err as Error & { code?: string };
  const code = e.code && !e.message.includes(e.code) ? ` [${e.code}]` : '';
  process.stderr.write(`${prog}: ${e.message ?? String(err)}${code}\n`);
  process.exit(typeof (err as { exitCode?: number }).exitCode === 'number' ? (err as { exitCode: number }).exitCode : 1);
}

export function main(prog: string, fn: () => Promise<number | void>): void {
  // What we create holds a snapshot's memory. io/private-file.ts makes our own
  // files 0600 and directories 0700 whatever the umask; this also covers the
  // files LevelDB creates in an image's index (0644 under umask 022 otherwise,
  // though inside a 0700 directory).
  process.umask(0o077);
  fn().then(
    (code) => process.exit(code ?? 0),
    (err) => fatal(prog, err),
  );
}

export function writeStats(file: string | undefined, stats: unknown): void {
  if (file) fs.writeFileSync(file, JSON.stringify(stats, null, 2) + '\n');
}

export function parseIntArg(name: string) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`${name} must be a non-negative number, got "${v}"`);
    return n;
  };
}

// stdin as a stream. For an image (forImage), a regular file holding a bgsnap
// stream is mapped (receiver/mapped-input.ts): its pages go from the page cache
// to the image with one copy, and a truncation of the file while it is read
// ends the stream with its reason instead of a SIGBUS. Otherwise a regular file
// is read in 8 MiB chunks, so few 1 MiB page frames straddle two chunks (those
// get copied again). A pipe is grown to 1 MiB (the default pipe-max-size) so
// the writer runs ahead while we work instead of the two taking turns over 64 KiB.
// BGSNAP_INPUT=read keeps a file read rather than mapped (bench/receive-throughput.ts
// compares the two).
export function stdinStream(forImage = false): Readable {
  if (fs.fstatSync(0).isFile()) {
    if (forImage && process.env.BGSNAP_INPUT !== 'read') return mappedStreamFile(0, fileops.tell(0));
    return fs.createReadStream('', { fd: 0, start: fileops.tell(0), highWaterMark: 8 << 20, autoClose: false });
  }
  fileops.setPipeSize(0, 1 << 20);
  return process.stdin;
}
