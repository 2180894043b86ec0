// The network receiver behind `bgsnap-receive --listen`: accepts captures over
// TLS (or, with --insecure, plain TCP), one Session and one image each, within
// limits on concurrent streams, image size and idle time. stop() stops
// accepting and fails what is in flight, each image marked incomplete.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { checkServerAuth, type Auth } from '../net/auth';
import { Session } from './net-session';

export interface ReceiverOptions {
  root: string;
  auth: Auth;
  maxStreams: number;
  maxImageBytes: number;
  idleMs: number;
  log?: (msg: string) => void;
}

export class Receiver {
  private readonly server: net.Server;
  private readonly sessions = new Set<Session>();
  private readonly names = new Set<string>();
  private streams = 0;
  private readonly log: (msg: string) => void;

  constructor(private readonly opts: ReceiverOptions) {
    checkServerAuth(opts.auth);
    if (!fs.statSync(opts.root).isDirectory()) throw new Error(`${opts.root} is not a directory`);
    this.log = opts.log ?? (() => undefined);
    this.server = this.createServer();
    // Connections still in the handshake are bounded too, beyond the stream limit.
    this.server.maxConnections = opts.maxStreams * 2 + 16;
  }

  private createServer(): net.Server {
    const t = this.opts.auth.tls;
    const onConn = (sock: net.Socket) => this.accept(sock);
    if (!t) return net.createServer({ allowHalfOpen: true }, onConn);
    const server = tls.createServer({
      cert: t.cert, key: t.key, ca: t.ca, requestCert: t.ca !== undefined, rejectUnauthorized: t.ca !== undefined,
      minVersion: 'TLSv1.3', handshakeTimeout: this.opts.idleMs, allowHalfOpen: true,
    }, onConn);
    // A failed TLS handshake (wrong or missing client certificate) never reaches accept().
    server.on('tlsClientError', (e, sock) => this.log(`${sock.remoteAddress}:${sock.remotePort}: TLS handshake refused: ${e.message}`));
    return server;
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve(this.server.address() as net.AddressInfo);
      });
    });
  }

  get activeStreams(): number {
    return this.streams;
  }

  private accept(sock: net.Socket): void {
    const s = new Session(sock, {
      root: this.opts.root, token: this.opts.auth.token, maxImageBytes: this.opts.maxImageBytes, idleMs: this.opts.idleMs,
      admit: () => this.admit(),
      leave: () => void this.streams--,
      claim: (name) => !this.names.has(name) && !!this.names.add(name),
      release: (name) => void this.names.delete(name),
      log: this.log,
    });
    this.sessions.add(s);
    void s.done.finally(() => this.sessions.delete(s));
  }

  private admit(): string {
    if (!this.server.listening) return 'the receiver is shutting down';
    if (this.streams >= this.opts.maxStreams) return `the receiver is at its limit of ${this.opts.maxStreams} concurrent streams`;
    this.streams++;
    return '';
  }

  // Stops accepting, fails every connection in flight (their images are marked
  // incomplete and made durable), and resolves when all of them are done.
  async stop(reason: string): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sessions) s.abort(reason);
    await Promise.allSettled([...this.sessions].map((s) => s.done));
    await closed;
  }
}
