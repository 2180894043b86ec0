// The file and pipe byte sink: a sequential output (a file, or stdout when the
// name is "-") that waits for the destination to drain, so converting a large
// image or writing a capture stream never buffers it in memory.
import * as fs from 'node:fs';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { fileops } from './fileops';
import { openPrivateFile, type CreateOptions } from './private-file';
import type { ByteSink } from './sink';

export class Output implements ByteSink {
  bytes = 0;
  private failure: Error | undefined;
  private constructor(private readonly stream: Writable, private readonly name: string) {
    stream.on('error', (e) => (this.failure ??= e));
  }

  // A file is created private (0600), never through a symbolic link, and an
  // existing one is replaced only with force (io/private-file.ts).
  static open(name: string, opts: CreateOptions = {}): Output {
    // Grow a stdout pipe so the reader can lag behind by 1 MiB instead of 64 KiB.
    if (name === '-') fileops.setPipeSize(1, 1 << 20);
    const stream = name === '-' ? process.stdout : fs.createWriteStream('', { fd: openPrivateFile(name, opts) });
    return new Output(stream, name === '-' ? 'stdout' : name);
  }

  private check(): void {
    const f = this.failure as Error | undefined;
    if (f) throw new Error(`writing ${this.name}: ${f.message}`);
  }

  async write(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    // events.once also rejects on 'error' and removes its listeners either way.
    if (!this.stream.write(buf)) await once(this.stream, 'drain').catch(() => undefined);
    this.check();
  }

  // Resolves only once the destination has taken the bytes, so the caller may
  // reuse the buffer (zero-copy page buffers go back to the capture engine).
  async writeSettled(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    await new Promise<void>((resolve, reject) => this.stream.write(buf, (e) => (e ? reject(e) : resolve())));
    this.check();
  }

  async close(): Promise<void> {
    if (this.stream === process.stdout) {
      // Not 'drain': it comes only after a write() that returned false, so with
      // bytes queued by writes that did not, it never came, the event loop
      // emptied and bgsnap-capture exited 0 without its --stats (1 run in ~15
      // of test/precopy under load). An empty write's callback runs once
      // everything queued before it was handed over (or the pipe broke).
      if (this.stream.writableLength) await new Promise<void>((resolve) => this.stream.write(Buffer.alloc(0), () => resolve()));
      return;
    }
    this.stream.end();
    await once(this.stream, 'close').catch(() => undefined);
    this.check();
  }

  // A file or pipe has no one to tell: what was written stays, without its END
  // frame, so whoever reads it finds the stream incomplete.
  async abandon(): Promise<void> {
    await this.close().catch(() => undefined);
  }
}
