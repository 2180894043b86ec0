// The file and pipe byte sink: a sequential output (a file, or stdout when the
// name is "-") that waits for the destination to drain, so converting a large
// image or writing a capture stream never buffers it in memory.
import * as fs from 'node:fs';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { fileops } from './fileops';
import { openPrivateFile, type CreateOptions } from './private-file';
import type { ByteSink } from './sink';

// A regular file is written behind: each full window's disk write starts as
// soon as write(2) took it, and what is BEHIND_LAG behind that is waited for
// on a pool thread, then dropped from the page cache. A failed write back
// (EIO, ENOSPC) fails this output, at close at the latest, where the file is
// made durable (the SnapshotSink contract) and leaves the page cache.
// - The writer never waits for the disk: a slower disk leaves more in the
//   page cache, as a plain write would. A capture that waited let the target's
//   faulted writers wait for the disk (851 ms in one Redis round).
// - Small windows: on a 2-core guest the host's work for a burst of writes
//   stalls the guest. Redis's clients during a pre-copy capture, 4 hand-run
//   rounds each: 8 MiB windows, max 25-37 ms; 1 MiB, 17-20 ms.
// - Why at all (io/native/write_behind.cc): 1 GB of 1 MiB writes, plain then
//   fsync, took 3.3-3.4 s and 1.5-1.7 s of system time; behind, 2.2 s and 0.5 s.
const BEHIND_WINDOW = 1 << 20;
const BEHIND_LAG = 32 << 20;

export class Output implements ByteSink {
  bytes = 0;
  private failure: Error | undefined;
  private settled = 0; // bytes write(2) took
  private started = 0; // bytes whose write back was started
  private dropped = 0; // bytes on the disk and out of the page cache
  private behind: Promise<void> = Promise.resolve(); // the write back in flight, if any
  private busy = false;
  private constructor(private readonly stream: Writable, private readonly name: string, private readonly fd = -1) {
    stream.on('error', (e) => (this.failure ??= e));
  }

  // A file is created private (0600), never through a symbolic link, and an
  // existing one is replaced only with force (io/private-file.ts).
  static open(name: string, opts: CreateOptions = {}): Output {
    // Grow a stdout pipe so the reader can lag behind by 1 MiB instead of 64 KiB.
    if (name === '-') fileops.setPipeSize(1, 1 << 20);
    if (name === '-') return new Output(process.stdout, 'stdout');
    const fd = openPrivateFile(name, opts); // or a FIFO or device: nothing to write behind
    return new Output(fs.createWriteStream('', { fd }), name, fs.fstatSync(fd).isFile() ? fd : -1);
  }

  // After write(2) took n more bytes: starts the disk write of the full
  // windows not yet started, and drops what is BEHIND_LAG behind them, in one
  // pool job at a time (what arrives meanwhile waits for the next).
  private took(n: number): void {
    this.settled += n;
    const next = this.settled - (this.settled % BEHIND_WINDOW);
    if (this.fd < 0 || this.busy || next <= this.started) return;
    const [dropFrom, dropTo, writeFrom] = [this.dropped, Math.max(this.dropped, next - BEHIND_LAG), this.started];
    [this.dropped, this.started, this.busy] = [dropTo, next, true];
    this.behind = fileops.writeBehind(this.fd, dropFrom, dropTo, writeFrom, next).then(
      () => void (this.busy = false),
      (e: Error) => void (this.failure ??= e),
    );
  }

  private check(): void {
    const f = this.failure as NodeJS.ErrnoException | undefined;
    if (f) throw Object.assign(new Error(`writing ${this.name}: ${f.message}`), { code: f.code });
  }

  async write(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    // events.once also rejects on 'error' and removes its listeners either way.
    const n = buf.length;
    if (!this.stream.write(buf, (e) => e || this.took(n))) await once(this.stream, 'drain').catch(() => undefined);
    this.check();
  }

  // Resolves only once the destination has taken the bytes, so the caller may
  // reuse the buffer (zero-copy page buffers go back to the capture engine).
  async writeSettled(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    await new Promise<void>((resolve, reject) => this.stream.write(buf, (e) => (e ? reject(e) : resolve())));
    this.took(buf.length);
    this.check();
  }

  async close(): Promise<void> {
    if (this.stream === process.stdout) return this.handedOver();
    // Once only: abandon() after a close() that failed finds the file closed.
    if (!this.stream.writableEnded) {
      if (this.fd >= 0) await this.durable();
      this.stream.end();
      await once(this.stream, 'close').catch(() => undefined);
    }
    this.check();
  }

  // Everything written is on the disk (fdatasync: a stream that ended is
  // complete only once it is), and out of the page cache. A failure is left
  // for check().
  private async durable(): Promise<void> {
    await this.handedOver();
    await this.behind;
    if (this.failure) return;
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (e) => (e ? reject(e) : resolve()))).catch((e: Error) => {
      this.failure ??= e;
    });
    if (!this.failure) await fileops.writeBehind(this.fd, 0, this.settled, 0, 0).catch(() => undefined); // on disk: only the drop is left
  }

  // Every byte queued so far was handed to write(2) (or the pipe broke). Not
  // 'drain': it comes only after a write() that returned false, so with bytes
  // queued by writes that did not, it never came, the event loop emptied and
  // bgsnap-capture exited 0 without its --stats (1 run in ~15 of test/precopy
  // under load). An empty write's callback runs once everything queued before
  // it was handed over.
  private async handedOver(): Promise<void> {
    if (this.stream.writableLength) await new Promise<void>((resolve) => this.stream.write(Buffer.alloc(0), () => resolve()));
  }

  // A file or pipe has no one to tell: what was written stays, without its END
  // frame, so whoever reads it finds the stream incomplete.
  async abandon(): Promise<void> {
    await this.close().catch(() => undefined);
  }
}
