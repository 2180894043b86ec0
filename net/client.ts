// `--to tcp://HOST:PORT`: the network byte sink. A stream goes to a
// bgsnap-receive --listen over TLS (or plain TCP with --insecure). A ByteSink
// like Output, so a StreamSink drives either: every write waits for the socket to drain, so
// a slow network slows the capture instead of growing memory. close() returns
// only once the receiver acknowledged a complete, durable image.
import { once } from 'node:events';
import * as net from 'node:net';
import * as tls from 'node:tls';
import type { Command } from 'commander';
import { channelBinding, checkClientAuth, loadAuth, TOKEN_ENV, type Auth, type AuthFlags } from './auth';
import {
  CHALLENGE_LEN, decodeChallenge, decodeReply, encodeHello, helloMac, NET_VERSION, Refusal, ReplyKind, RESULT_COMPLETE, type Reply,
} from '../format/net-protocol';
import { readExact } from './read-exact';
import type { ByteSink, ReceiveSummary } from '../io/sink';

export interface NetFlags extends AuthFlags {
  to?: string;
  name?: string;
}

// The CLI flags, shared by every program that sends to a receiver.
export function addNetOptions(cmd: Command): Command {
  return cmd
    .option('--to <url>', 'send the stream to a bgsnap-receive --listen at tcp://HOST:PORT')
    .option('--name <name>', 'with --to: image name on the receiver (default: the snapshot id)')
    .option('--ca <file>', 'with --to: CA certificate(s) to verify the receiver with (enables TLS)')
    .option('--cert <file>', 'with --to: client certificate for mutual TLS')
    .option('--key <file>', 'with --to: key of --cert')
    .option('--token-file <file>', `with --to: shared token (or set ${TOKEN_ENV})`)
    .option('--insecure', 'with --to: allow plain, unencrypted TCP (loopback tests only)');
}

export function parseTcpUrl(url: string): { host: string; port: number } {
  const m = /^tcp:\/\/(\[[^\]]+\]|[^:/]+):(\d{1,5})\/?$/.exec(url);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw new Error(`--to must be tcp://HOST:PORT, got "${url}"`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

const SEND_WINDOW = 8 << 20;

export class NetOutput implements ByteSink {
  bytes = 0;
  private failure: Error | undefined;
  private result: Reply | undefined;
  private inbox = Buffer.alloc(0);
  private readonly settled: Promise<void>; // resolves on RESULT or when the connection is gone

  private constructor(private readonly sock: net.Socket, private readonly url: string) {
    this.settled = new Promise((resolve) => {
      sock.on('data', (c: Buffer) => this.onData(c, resolve));
      sock.on('close', () => {
        this.failure ??= new Error(`the connection to ${url} was lost before the receiver acknowledged the snapshot`);
        resolve();
      });
    });
    sock.on('error', (e) => (this.failure ??= new Error(`connection to ${url}: ${e.message}`)));
  }

  static async connect(flags: NetFlags): Promise<NetOutput> {
    const url = flags.to!;
    const { host, port } = parseTcpUrl(url);
    const auth = loadAuth(flags);
    checkClientAuth(auth);
    const sock = await dial(host, port, auth);
    try {
      await handshake(sock, auth, flags.name ?? '', url);
    } catch (e) {
      sock.destroy();
      throw e;
    }
    return new NetOutput(sock, url);
  }

  // A RESULT while still sending means the receiver gave up on this image.
  private onData(c: Buffer, resolve: () => void): void {
    this.inbox = Buffer.concat([this.inbox, c]);
    try {
      const r = decodeReply(this.inbox);
      if (!r) return;
      this.result = r.reply;
      if (r.reply.code !== RESULT_COMPLETE) this.failure ??= new Error(`receiver: image incomplete: ${String(r.reply.body.reason)}`);
    } catch (e) {
      this.failure ??= e as Error;
      this.sock.destroy();
    }
    resolve();
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  // Resolves when the socket can take more, or throws once the connection failed.
  // Up to SEND_WINDOW bytes may wait in the socket's buffer: waiting for it to
  // drain after every write (Node's mark is 16 KiB) made sender and receiver
  // take turns, one scheduling round trip per frame (~30 MB/s on a busy host).
  async write(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    if (!this.sock.write(buf) && this.sock.writableLength >= SEND_WINDOW) await Promise.race([once(this.sock, 'drain'), this.settled]);
    this.check();
  }

  // Resolves once the bytes were handed to the kernel (or TLS), so the caller may reuse buf.
  async writeSettled(buf: Buffer): Promise<void> {
    this.check();
    this.bytes += buf.length;
    await Promise.race([new Promise<void>((resolve) => this.sock.write(buf, () => resolve())), this.settled]);
    this.check();
  }

  // Waits for the receiver's RESULT: resolves with its summary only if the image
  // is complete and durable; any other outcome throws with the reason.
  async close(): Promise<ReceiveSummary> {
    await this.settled;
    this.sock.end();
    const r = this.result;
    if (r && r.kind === ReplyKind.RESULT && r.code === RESULT_COMPLETE) return r.body as unknown as ReceiveSummary;
    throw this.failure ?? new Error(`${this.url}: unexpected reply from the receiver`);
  }

  // Sends no more: the receiver marks the image incomplete and replies with its
  // summary (undefined if the connection is gone).
  async abandon(): Promise<ReceiveSummary | undefined> {
    this.sock.end();
    await this.settled;
    return this.result?.kind === ReplyKind.RESULT ? (this.result.body as unknown as ReceiveSummary) : undefined;
  }

  destroy(): void {
    this.sock.destroy();
  }
}

function dial(host: string, port: number, auth: Auth): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const t = auth.tls;
    const sock = t
      ? tls.connect({ host, port, ca: t.ca, cert: t.cert, key: t.key, servername: net.isIP(host) ? undefined : host, minVersion: 'TLSv1.3' as const, allowHalfOpen: true } as tls.ConnectionOptions, () => resolve(sock))
      : net.connect({ host, port, allowHalfOpen: true }, () => resolve(sock));
    // Stays attached: an error after connecting is reported by the handshake's reads.
    sock.on('error', (e) => reject(new Error(`cannot connect to tcp://${host}:${port}: ${e.message}`)));
  });
}

async function handshake(sock: net.Socket, auth: Auth, name: string, url: string): Promise<void> {
  const ch = decodeChallenge(await readExact(sock, CHALLENGE_LEN));
  if (ch.version !== NET_VERSION) throw new Error(`${url} speaks network protocol version ${ch.version}; this build speaks ${NET_VERSION}`);
  if (ch.tokenRequired && !auth.token) throw new Error(`${url} requires a token (--token-file or ${TOKEN_ENV})`);
  const mac = ch.tokenRequired ? helloMac(auth.token!, ch.nonce, channelBinding(sock), name) : Buffer.alloc(0);
  sock.write(encodeHello(name, mac));
  const reply = await readReply(sock);
  if (reply.kind !== ReplyKind.READY) throw new Error(`${url}: unexpected reply from the receiver`);
  if (reply.code !== Refusal.OK) throw new Error(`${url} refused the capture (${Refusal[reply.code] ?? reply.code}): ${String(reply.body.reason)}`);
}

async function readReply(sock: net.Socket): Promise<Reply> {
  let buf = Buffer.alloc(0);
  for (;;) {
    const r = decodeReply(buf);
    if (r) {
      if (r.used < buf.length) sock.unshift(buf.subarray(r.used));
      return r.reply;
    }
    buf = Buffer.concat([buf, await readExact(sock, 1).catch(() => {
      throw new Error('the receiver closed the connection during the handshake');
    })]);
  }
}
