// A SnapshotSink that writes the events as a bgsnap stream into a ByteSink: a
// file, a pipe or a network receiver. Frames are written without copying page
// data and each write waits for the destination to drain, so a slow reader
// slows the producer instead of growing memory. Behind a network peer, finish()
// resolves complete only once the remote image is durable.
import { BgsnapEncoder, type EncoderOptions } from '../format/bgsnap';
import type { StreamEvent, StreamTotals } from '../format/events';
import type { ByteSink, ReceiveSummary, SnapshotSink } from './sink';
import { fileops } from './fileops';

// An encoder whose frame checksums use the addon's CRC-32 (carry-less multiply,
// several times zlib's speed on pages just written): checksumming was most of
// the JavaScript cost per page of a capture.
export function fastEncoder(opts: EncoderOptions = {}): BgsnapEncoder {
  return new BgsnapEncoder({ ...opts, crc32: (data, crc = 0) => fileops.crc32(data, crc) });
}

export class StreamSink implements SnapshotSink {
  private started = false;
  private inputBytes: number | undefined;
  private header = { snapshotId: '', source: '' };
  private readonly startedAt = Date.now();

  constructor(private readonly out: ByteSink, private readonly enc = fastEncoder(), private readonly name = '') {}

  // Set by receive() when relaying a stream: bytes of the input consumed, reported
  // as streamBytes like a local image does (else: the bytes this sink wrote).
  set streamBytes(n: number) {
    this.inputBytes = n;
  }

  get bytes(): number {
    return this.out.bytes;
  }

  get totals(): Readonly<StreamTotals> {
    return this.enc.totals;
  }

  get pageSize(): number {
    return this.enc.pageSize;
  }

  async write(ev: StreamEvent): Promise<void> {
    if (!this.started) {
      this.started = true;
      // A relayed chain stays a chain: the magic says so (version 2).
      if (ev.type === 'header' && ev.header.chain) this.enc.chain = true;
      await this.out.write(this.enc.magic());
    }
    if (ev.type === 'header') this.header = { snapshotId: ev.header.snapshotId, source: ev.header.source };
    const parts = this.frames(ev);
    // Writes complete in order: once the last part is taken, all of them are, and
    // the page batch's buffers are free again.
    for (let i = 0; i < parts.length - 1; i++) await this.out.write(parts[i]);
    if (parts.length) await (ev.type === 'pages' ? this.out.writeSettled(parts[parts.length - 1]) : this.out.write(parts[parts.length - 1]));
  }

  private frames(ev: StreamEvent): Buffer[] {
    switch (ev.type) {
      case 'header': return this.enc.header(ev.header);
      case 'blocks': return this.enc.blocks(ev.blocks);
      case 'pages': return this.enc.pages(ev.batch);
      case 'discard': return this.enc.discard(ev.batch);
      case 'state': return this.enc.state(ev.state);
      case 'generation': return this.enc.generation(ev.generation);
      case 'generation-end': return this.enc.generationEnd({ pass: ev.totals.pass }); // a relay keeps the flag
      case 'end': return this.enc.end();
    }
  }

  async finish(): Promise<ReceiveSummary> {
    let remote: ReceiveSummary | void;
    try {
      remote = await this.out.close();
    } catch (e) {
      return this.summary('incomplete', (e as Error).message, await this.out.abandon());
    }
    return this.summary('complete', '', remote);
  }

  // The input broke here: stop writing, so a receiver marks its image incomplete;
  // the reason reported is this side's, which is the real cause.
  async fail(reason: string): Promise<ReceiveSummary> {
    return this.summary('incomplete', reason, await this.out.abandon());
  }

  // A receiver's summary when there is one; else what this sink wrote: every
  // record as it came (a stream keeps duplicates; nothing was dropped).
  private summary(status: ReceiveSummary['status'], reason: string, remote: ReceiveSummary | void): ReceiveSummary {
    const t = this.enc.totals;
    const own: ReceiveSummary = {
      status, reason, image: this.name, ...this.header, pagesReceived: t.pages, uniquePages: t.pages, dataPages: t.pages - t.zeroPages,
      zeroPages: t.zeroPages, duplicatePages: 0, discardedPages: t.discarded, streamBytes: 0, imageBytes: this.out.bytes,
      imageSize: this.out.bytes, seconds: (Date.now() - this.startedAt) / 1000,
    };
    return { ...own, ...(remote ?? {}), status, reason, streamBytes: this.inputBytes ?? this.out.bytes };
  }
}
