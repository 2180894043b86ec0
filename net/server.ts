// The network server transport behind `bgsnap-receive --listen`: accepts
// senders over TLS (or, with --insecure, plain TCP), one ServerSession each,
// within limits on concurrent streams and idle time, and hands each admitted
// stream to the application's handler. stop() stops accepting and fails what is
// in flight.
import * as net from 'node:net';
import * as tls from 'node:tls';
import { checkServerAuth, type Auth } from './auth';
import { ServerSession, type StreamHandler } from './server-session';

export interface NetServerOptions {
  auth: Auth;
  maxStreams: number;
  idleMs: number;
  handle: StreamHandler;
  log?: (msg: string) => void;
}

export class NetServer {
  private readonly server: net.Server;
  private readonly sessions = new Set<ServerSession>();
  private streams = 0;
  private readonly log: (msg: string) => void;

  constructor(private readonly opts: NetServerOptions) {
    checkServerAuth(opts.auth);
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
    const s = new ServerSession(sock, {
      token: this.opts.auth.token, idleMs: this.opts.idleMs, handle: this.opts.handle, log: this.log,
      admit: () => this.admit(),
      leave: () => void this.streams--,
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

  // Stops accepting, fails every connection in flight (the handler decides what
  // that means for its stream), and resolves when all of them are done.
  async stop(reason: string): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sessions) s.abort(reason);
    await Promise.allSettled([...this.sessions].map((s) => s.done));
    await closed;
  }
}
