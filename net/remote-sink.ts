// A SnapshotSink that forwards decoded events to a remote receiver: re-encodes
// them as a bgsnap stream over a NetOutput. It lets anything that produces
// events (bgsnap-receive reading stdin, a relay, the shared sink test suite)
// store into a receiver on another host, with the same guarantees as a local
// image: finish() resolves complete only after the remote image is durable.
import { BgsnapEncoder } from '../format/bgsnap';
import type { StreamEvent } from '../format/events';
import { NetOutput, type NetFlags } from './client';
import type { ReceiveSummary, SnapshotSink } from '../io/sink';

export class RemoteSink implements SnapshotSink {
  streamBytes = 0; // bytes of the input stream consumed, as for a local image
  private readonly enc = new BgsnapEncoder();
  private started = false;

  private constructor(private readonly out: NetOutput) {}

  static async connect(flags: NetFlags): Promise<RemoteSink> {
    return new RemoteSink(await NetOutput.connect(flags));
  }

  async write(ev: StreamEvent): Promise<void> {
    if (!this.started) {
      this.started = true;
      await this.out.write(this.enc.magic());
    }
    for (const part of this.frames(ev)) await this.out.write(part);
  }

  private frames(ev: StreamEvent): Buffer[] {
    switch (ev.type) {
      case 'header': return this.enc.header(ev.header);
      case 'blocks': return this.enc.blocks(ev.blocks);
      case 'pages': return this.enc.pages(ev.batch);
      case 'discard': return this.enc.discard(ev.batch);
      case 'state': return this.enc.state(ev.state);
      case 'end': return this.enc.end();
    }
  }

  async finish(): Promise<ReceiveSummary> {
    try {
      return { ...(await this.out.close()), streamBytes: this.streamBytes };
    } catch (e) {
      const remote = await this.out.abandon();
      return { ...incomplete(remote), reason: (e as Error).message, streamBytes: this.streamBytes };
    }
  }

  // The input broke here: stop sending, so the receiver marks the remote image
  // incomplete; the reason reported is this side's, which is the real cause.
  async fail(reason: string): Promise<ReceiveSummary> {
    const remote = await this.out.abandon();
    return { ...incomplete(remote), reason, streamBytes: this.streamBytes };
  }
}

function incomplete(remote: ReceiveSummary | undefined): ReceiveSummary {
  return {
    image: '', snapshotId: '', source: '', pagesReceived: 0, uniquePages: 0, dataPages: 0, zeroPages: 0, duplicatePages: 0,
    discardedPages: 0, streamBytes: 0, imageBytes: 0, imageSize: 0, seconds: 0, ...remote, status: 'incomplete', reason: '',
  };
}
