// The network receiver behind `bgsnap-receive --listen`: the shared server
// transport (net/server.ts: TLS, authentication, stream and connection limits)
// with one image per capture under ROOT, each within a size limit and under a
// name no two connections hold at once. stop() marks what is in flight
// incomplete (durably).
import * as fs from 'node:fs';
import type * as net from 'node:net';
import type { Auth } from '../net/auth';
import { NetServer } from '../net/server';
import type { IncomingStream } from '../net/server-session';
import type { ReceiveSummary } from '../io/sink';
import { NamedImageSink } from './net-image-sink';
import { receive } from './receive';

export interface ReceiverOptions {
  root: string;
  auth: Auth;
  maxStreams: number;
  maxImageBytes: number;
  idleMs: number;
  log?: (msg: string) => void;
}

export class Receiver {
  private readonly server: NetServer;
  private readonly names = new Set<string>();

  constructor(private readonly opts: ReceiverOptions) {
    this.server = new NetServer({ ...opts, handle: (s) => this.receiveImage(s) }); // checks the auth first
    if (!fs.statSync(opts.root).isDirectory()) throw new Error(`${opts.root} is not a directory`);
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    return this.server.listen(host, port);
  }

  get activeStreams(): number {
    return this.server.activeStreams;
  }

  // The image is created only once the stream header arrives (NamedImageSink).
  private receiveImage(s: IncomingStream): Promise<ReceiveSummary> {
    const sink = new NamedImageSink({
      root: this.opts.root, name: s.name || undefined, maxImageBytes: this.opts.maxImageBytes,
      claim: (name) => !this.names.has(name) && !!this.names.add(name),
      release: (name) => void this.names.delete(name),
      failReason: s.failReason, onEnd: s.endInput,
    });
    return receive(s.input, sink);
  }

  // Stops accepting, fails every stream in flight (each image marked incomplete
  // and made durable), and resolves when all of them are done.
  stop(reason: string): Promise<void> {
    return this.server.stop(reason);
  }
}
