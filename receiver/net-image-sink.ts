// The receiver's sink for one network capture: names the image (the sender's
// name, or the snapshot id from the stream header), refuses to replace a
// complete image or one another connection is writing, and creates the image
// only once the stream header has arrived, so a sender that never gets that far
// leaves nothing under ROOT.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { StreamEvent } from '../format/events';
import { fsyncDir, ImageWriter } from './image';
import { IndexStore } from './index-store';
import type { ReceiveSummary, SnapshotSink } from '../io/sink';

export interface NamedSinkOptions {
  root: string;
  name?: string; // validated by the session (NAME_RE)
  maxImageBytes: number;
  claim(name: string): boolean; // false if another connection holds the name
  release(name: string): void;
  onEnd(): void; // the END frame was decoded: stop reading the connection
  failReason(): string | undefined; // the session's own reason (timeout, shutdown) beats the decoder's
}

export class NamedImageSink implements SnapshotSink {
  private writer: ImageWriter | undefined;
  private claimed: string | undefined;
  private bytes = 0;
  readonly checksPages = true; // the ImageWriter beneath verifies page frames

  constructor(private readonly opts: NamedSinkOptions) {}

  get imageName(): string | undefined {
    return this.claimed;
  }

  set streamBytes(n: number) {
    this.bytes = n;
    if (this.writer) this.writer.streamBytes = n;
  }

  async write(ev: StreamEvent): Promise<void> {
    if (ev.type === 'header') this.writer = await this.open(this.opts.name ?? ev.header.snapshotId);
    if (!this.writer) throw new Error(`${ev.type} before the stream header`);
    await this.writer.write(ev);
    if (ev.type === 'end') this.opts.onEnd();
  }

  // The decoder's batches (see ImageWriter.writeOwned).
  writeOwned(ev: StreamEvent): void | Promise<void> {
    if (ev.type === 'pages' && this.writer) return this.writer.writeOwned(ev);
    return this.write(ev);
  }

  private async open(name: string): Promise<ImageWriter> {
    if (!this.opts.claim(name)) throw new Error(`image ${name} is being received by another connection`);
    this.claimed = name;
    const dir = path.join(this.opts.root, name);
    const replace = await replaceable(dir);
    const w = await ImageWriter.create(dir, { force: replace, maxImageBytes: this.opts.maxImageBytes });
    await fsyncDir(this.opts.root); // the new image's directory entry
    return w;
  }

  async finish(): Promise<ReceiveSummary> {
    if (!this.writer) return this.fail('the stream ended before its header');
    return this.done(this.writer.finish());
  }

  async fail(reason: string): Promise<ReceiveSummary> {
    reason = this.opts.failReason() ?? reason;
    if (!this.writer) return this.done(Promise.resolve(emptySummary(reason, this.bytes)));
    return this.done(this.writer.fail(reason));
  }

  private async done(p: Promise<ReceiveSummary>): Promise<ReceiveSummary> {
    try {
      return { ...(await p), image: this.claimed ?? '' }; // the name, not the receiver's path
    } finally {
      if (this.claimed) this.opts.release(this.claimed);
    }
  }
}

// Whether an existing entry may be replaced: nothing there, or an image (or the
// remains of one) that is not complete. Anything else is refused.
async function replaceable(dir: string): Promise<boolean> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch {
    return false;
  }
  if (!st.isDirectory()) throw new Error(`${path.basename(dir)} exists under the receiver's directory and is not an image`);
  // A chain image also has one data file per later generation (data.K).
  const entries = fs.readdirSync(dir).filter((e) => e !== 'data' && e !== 'index' && !/^data\.\d+$/.test(e));
  if (entries.length) throw new Error(`${path.basename(dir)} exists and is not an image; not replacing it`);
  if (!fs.existsSync(path.join(dir, 'index'))) return true;
  // An index that cannot be opened (held by another process, damaged) is refused,
  // not removed: an operator should look at it.
  const index = await IndexStore.open(path.join(dir, 'index'), false).catch((e: Error) => {
    throw new Error(`image ${path.basename(dir)} exists and cannot be checked (${e.message}); not replacing it`);
  });
  try {
    const status = await index.getJson<{ status: string }>('status');
    if (status?.status === 'complete') throw new Error(`image ${path.basename(dir)} already exists and is complete; not overwriting it`);
  } finally {
    await index.close();
  }
  return true;
}

function emptySummary(reason: string, streamBytes: number): ReceiveSummary {
  return {
    status: 'incomplete', reason, image: '', snapshotId: '', source: '', pagesReceived: 0, uniquePages: 0, dataPages: 0, zeroPages: 0,
    duplicatePages: 0, discardedPages: 0, streamBytes, imageBytes: 0, imageSize: 0, seconds: 0,
  };
}
