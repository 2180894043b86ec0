// A write-only NBD server that QEMU's backup job writes into: QEMU opens it as a
// block node (blockdev-add driver=nbd, server on our private Unix socket) and a
// blockdev-backup with sync=full copies the disk into it, copy-before-write
// keeping the copy at the instant the backup started. Each write is handed to
// `onWrite`; the reply waits for it, so a slow consumer slows QEMU's job (and,
// through copy-before-write, guest writes to not-yet-copied clusters) instead of
// growing memory.
//
// Protocol: the NBD "fixed newstyle" handshake and simple replies (NBD's
// doc/proto.md). We answer NBD_OPT_GO/INFO/EXPORT_NAME and refuse every other
// option as unsupported (structured replies, meta contexts, extended headers),
// which QEMU's client accepts and falls back from. Exports are named after the
// drive id; one connection per export.
import * as net from 'node:net';

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPT = { EXPORT_NAME: 1, ABORT: 2, INFO: 6, GO: 7 };
const REP = { ACK: 1, INFO: 3, ERR_UNSUP: 0x80000001, ERR_UNKNOWN: 0x80000006 };
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, WRITE_ZEROES: 6 };
const NBD_EIO = 5;
const NBD_EINVAL = 22;
const NBD_ENOTSUP = 95;
// HAS_FLAGS | SEND_WRITE_ZEROES: no reads are offered (a backup target is
// never read), no TRIM, and no FLUSH: writes are in the stream once answered
// (durability is the receiver's), and without the flag QEMU's client does not
// send one, so the flushes in QEMU's stops need no round trip through us.
const TRANSMISSION_FLAGS = 1 | 64;

export interface NbdExport {
  name: string;
  size: number;
}

// data === null: the range reads as zeroes (NBD_CMD_WRITE_ZEROES).
export type NbdWriteHandler = (exportName: string, offset: number, length: number, data: Buffer | null) => Promise<void>;

// A connection past its handshake, given to whoever serves its requests
// instead of this server (the disk guard's relay, capture/nbd-relay.ts), with
// the bytes already read after the handshake. Resolves when it is over.
export type NbdTakeOver = (sock: net.Socket, buffered: Buffer, exp: NbdExport) => Promise<void>;

// What the stand-in answers a request nobody else will: writes succeed and go
// nowhere, reads (never offered) fail.
export function standInAnswer(type: number): number {
  if (type === CMD.READ) return NBD_EINVAL;
  return type === CMD.WRITE || type === CMD.WRITE_ZEROES || type === CMD.FLUSH ? 0 : NBD_ENOTSUP;
}

// Reads exact byte counts from a socket, pausing it while nobody waits.
export class Reader {
  private chunks: Buffer[] = [];
  private have = 0;
  private wake: (() => void) | null = null;
  private ended: Error | null = null;
  private readonly onData = (c: Buffer) => {
    this.chunks.push(c);
    this.have += c.length;
    if (this.have > 64 << 20) this.sock.pause(); // one max-size write plus slack
    this.wake?.();
  };
  private readonly onEnd = (e?: Error) => ((this.ended = e ?? new Error('NBD peer closed the connection')), this.wake?.());
  private readonly onClose = () => this.onEnd();

  constructor(private readonly sock: net.Socket) {
    sock.on('data', this.onData).on('end', this.onClose).on('close', this.onClose).on('error', this.onEnd);
  }

  // Stops reading; the socket is left paused (a stream without a 'data'
  // listener keeps flowing and would drop bytes) and what was read but not
  // asked for is returned.
  detach(): Buffer {
    this.sock.pause();
    this.sock.off('data', this.onData).off('end', this.onClose).off('close', this.onClose).off('error', this.onEnd);
    return Buffer.concat(this.chunks);
  }

  async read(n: number): Promise<Buffer> {
    while (this.have < n) {
      if (this.ended) throw this.ended;
      this.sock.resume();
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.have -= n;
    return all.subarray(0, n);
  }
}

export class NbdTargetServer {
  private readonly server = net.createServer((s) => void this.serve(s));
  private readonly sockets = new Set<net.Socket>();
  private failure: Error | null = null;
  private discarding = false;
  // Exports a client opened (handshake done): the disk guard's stand-in waits
  // on this to know QEMU reconnected to it.
  readonly opened = new Set<string>();
  onError: (err: Error) => void = () => undefined;

  constructor(private readonly exports: NbdExport[], private readonly onWrite: NbdWriteHandler, private readonly takeOver?: NbdTakeOver) {}

  listen(path: string): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(path, () => (this.server.off('error', reject), resolve()));
    });
  }

  close(): void {
    this.server.close();
    for (const s of this.sockets) s.destroy();
  }

  // From now on every write succeeds and goes nowhere. Used while a capture
  // is given up: copy-before-write in QEMU 7.2 fails the guest's own write
  // when its copy fails (on-cbw-error=break-guest-write, which blockdev-backup
  // cannot change), so the target keeps saying yes until the jobs are gone.
  discard(): void {
    this.discarding = true;
  }

  get error(): Error | null {
    return this.failure;
  }

  private async serve(sock: net.Socket): Promise<void> {
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    const r = new Reader(sock);
    try {
      const exp = await this.handshake(sock, r);
      if (exp) this.opened.add(exp.name);
      if (exp && this.takeOver) await this.takeOver(sock, r.detach(), exp);
      else if (exp) await this.transmit(sock, r, exp);
    } catch (err) {
      const e = err as Error;
      if (!/closed the connection/.test(e.message)) {
        this.failure ??= new Error(`NBD target: ${e.message}`);
        this.onError(this.failure);
      }
    } finally {
      sock.destroy();
    }
  }

  private async handshake(sock: net.Socket, r: Reader): Promise<NbdExport | null> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(1 | 2, 16); // FIXED_NEWSTYLE | NO_ZEROES
    sock.write(hello);
    const clientFlags = (await r.read(4)).readUInt32BE(0);
    for (;;) {
      const head = await r.read(16);
      if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new Error('bad option magic from the NBD client');
      const opt = head.readUInt32BE(8);
      const data = await r.read(head.readUInt32BE(12));
      if (opt === OPT.ABORT) return null;
      if (opt === OPT.EXPORT_NAME) return this.exportName(sock, data.toString('utf8'), clientFlags);
      if (opt !== OPT.GO && opt !== OPT.INFO) {
        optReply(sock, opt, REP.ERR_UNSUP);
        continue;
      }
      const exp = this.find(data.subarray(4, 4 + data.readUInt32BE(0)).toString('utf8'));
      if (!exp) {
        optReply(sock, opt, REP.ERR_UNKNOWN);
        continue;
      }
      const info = Buffer.alloc(12);
      info.writeUInt16BE(0, 0); // NBD_INFO_EXPORT
      info.writeBigUInt64BE(BigInt(exp.size), 2);
      info.writeUInt16BE(TRANSMISSION_FLAGS, 10);
      optReply(sock, opt, REP.INFO, info);
      optReply(sock, opt, REP.ACK);
      if (opt === OPT.GO) return exp;
    }
  }

  private exportName(sock: net.Socket, name: string, clientFlags: number): NbdExport {
    const exp = this.find(name);
    if (!exp) throw new Error(`NBD client asked for unknown export "${name}"`);
    const b = Buffer.alloc(clientFlags & 2 ? 10 : 134);
    b.writeBigUInt64BE(BigInt(exp.size), 0);
    b.writeUInt16BE(TRANSMISSION_FLAGS, 8);
    sock.write(b);
    return exp;
  }

  private find(name: string): NbdExport | undefined {
    return this.exports.find((e) => e.name === name);
  }

  // Requests are handled one at a time, in order: the reply to a write is sent
  // only once onWrite took its data.
  private async transmit(sock: net.Socket, r: Reader, exp: NbdExport): Promise<void> {
    for (;;) {
      const req = await r.read(28);
      if (req.readUInt32BE(0) !== REQUEST_MAGIC) throw new Error('bad request magic from the NBD client');
      const type = req.readUInt16BE(6);
      const handle = req.subarray(8, 16);
      const offset = Number(req.readBigUInt64BE(16));
      const length = req.readUInt32BE(24);
      if (type === CMD.DISC) return;
      const data = type === CMD.WRITE ? await r.read(length) : null;
      simpleReply(sock, handle, await this.apply(exp, type, offset, length, data));
    }
  }

  private async apply(exp: NbdExport, type: number, offset: number, length: number, data: Buffer | null): Promise<number> {
    if (type === CMD.FLUSH) return 0;
    if (type !== CMD.WRITE && type !== CMD.WRITE_ZEROES) return type === CMD.READ ? NBD_EINVAL : NBD_ENOTSUP;
    if (offset + length > exp.size) return NBD_EINVAL;
    if (this.discarding) return 0;
    try {
      await this.onWrite(exp.name, offset, length, data);
      return 0;
    } catch (err) {
      if (this.discarding) return 0; // the capture was given up while this write waited
      this.failure ??= new Error(`disk "${exp.name}" at offset ${offset}: ${(err as Error).message}`);
      this.onError(this.failure);
      return NBD_EIO;
    }
  }
}

function optReply(sock: net.Socket, opt: number, type: number, data = Buffer.alloc(0)): void {
  const b = Buffer.alloc(20);
  b.writeBigUInt64BE(REPLY_MAGIC, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  sock.write(Buffer.concat([b, data]));
}

export function simpleReply(sock: net.Socket, handle: Buffer, error: number): void {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  handle.copy(b, 8);
  sock.write(b);
}
