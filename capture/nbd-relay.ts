// The NBD server a libvirt domain's QEMU holds, run in the disk guard
// (capture/qemu-disk-guard.ts) so that it outlives a capture killed with
// SIGKILL. Through libvirt, QEMU's NBD node gets its connection as a passed
// file descriptor (capture/libvirt-qmp.ts, reachSocket), which its client
// cannot reopen: had the capture served it, the capture's death would end it,
// and copy-before-write would fail the guest writes it holds (EIO) until the
// backup is cancelled. So the guard does the handshake with QEMU and relays the
// transmission phase, byte for byte, to the capture's own NBD server
// (capture/nbd-target.ts) on a private Unix socket, opening the same export
// there with NBD_OPT_EXPORT_NAME.
//
// The relay reads only request and reply headers, to know which requests the
// capture has not answered yet; data passes through in the chunks the sockets
// deliver. When the capture's side goes away (or standIn() is called), the
// relay answers those itself and every later request as the --qmp stand-in
// does: writes succeed and go nowhere (standInAnswer), until QEMU disconnects
// (the guard deletes the node).
import * as net from 'node:net';
import {
  CMD, IHAVEOPT, NBDMAGIC, NbdTargetServer, Reader, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, simpleReply, standInAnswer, type NbdExport,
} from './nbd-target';

const REQUEST_HEAD = 28;
const REPLY_HEAD = 16;

export class NbdRelay {
  private readonly server: NbdTargetServer;
  private readonly links = new Set<Link>();
  private standing = false;
  onError: (err: Error) => void = () => undefined;

  constructor(exports: NbdExport[], private readonly upstreamPath: string) {
    this.server = new NbdTargetServer(exports, async () => undefined, (sock, buffered, exp) => this.relay(sock, buffered, exp));
    this.server.onError = (e) => this.onError(e);
  }

  listen(path: string): Promise<void> {
    return this.server.listen(path);
  }

  close(): void {
    this.server.close();
  }

  // The capture is gone: every connection answers for itself from now on.
  standIn(): void {
    this.standing = true;
    for (const l of this.links) l.standIn();
  }

  private async relay(sock: net.Socket, buffered: Buffer, exp: NbdExport): Promise<void> {
    const up = this.standing ? null : await openUpstream(this.upstreamPath, exp.name).catch((e: Error) => {
      this.onError(new Error(`relay of disk "${exp.name}": the capture's NBD server at ${this.upstreamPath}: ${e.message}; standing in`));
      return null;
    });
    const link = new Link(sock, up);
    this.links.add(link);
    if (this.standing) link.standIn();
    try {
      await link.run(buffered);
    } finally {
      this.links.delete(link);
    }
  }
}

// One QEMU connection and, while the capture serves it, its twin to the capture.
class Link {
  private pending = new Map<string, number>(); // handle (hex) -> command, sent up and not answered yet
  private head = Buffer.alloc(0); // a request header split across chunks
  private payloadLeft = 0; // bytes of the current write still to come from QEMU
  private current: { key: string; type: number; handle: Buffer } | null = null;
  private replies = Buffer.alloc(0); // a reply split across chunks
  private done: (err?: Error) => void = () => undefined;

  constructor(private readonly qemu: net.Socket, private up: net.Socket | null) {}

  run(buffered: Buffer): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.done = (err) => (err ? reject(err) : resolve());
      this.qemu.on('data', (c: Buffer) => this.fromQemu(c));
      this.qemu.on('close', () => this.end()).on('error', () => this.end());
      if (this.up) {
        this.up.on('data', (c: Buffer) => this.fromUp(c));
        this.up.on('close', () => this.standIn()).on('error', () => this.standIn());
        this.up.resume();
      }
      if (buffered.length) this.fromQemu(buffered);
      this.qemu.resume();
    });
  }

  private end(err?: Error): void {
    this.up?.destroy();
    this.up = null;
    this.qemu.destroy();
    this.done(err);
  }

  // Answers what the capture has not, except a write whose data is still
  // coming (answered once it is all read: requestDone).
  standIn(): void {
    if (!this.up) return;
    const up = this.up;
    this.up = null;
    up.destroy();
    const partial = this.payloadLeft > 0 ? this.current?.key : undefined;
    for (const [key, type] of this.pending) {
      if (key !== partial) simpleReply(this.qemu, Buffer.from(key, 'hex'), standInAnswer(type));
    }
    this.pending.clear();
    this.qemu.resume(); // it may have been paused waiting for the capture to drain
  }

  // Whole chunks go up as they came; only the headers in them are read.
  private fromQemu(c: Buffer): void {
    if (this.up && !this.up.write(c)) {
      this.qemu.pause();
      this.up.once('drain', () => this.qemu.resume());
    }
    for (let at = 0; at < c.length;) {
      if (this.payloadLeft > 0) {
        const n = Math.min(this.payloadLeft, c.length - at);
        this.payloadLeft -= n;
        at += n;
        if (this.payloadLeft === 0) this.requestDone();
        continue;
      }
      const take = c.subarray(at, at + REQUEST_HEAD - this.head.length);
      at += take.length;
      this.head = this.head.length ? Buffer.concat([this.head, take]) : Buffer.from(take);
      if (this.head.length < REQUEST_HEAD) return; // the rest comes with the next chunk
      const h = this.head;
      this.head = Buffer.alloc(0);
      if (!this.request(h)) return;
    }
  }

  // False: nothing more is to be read from this connection.
  private request(h: Buffer): boolean {
    if (h.readUInt32BE(0) !== REQUEST_MAGIC) return this.end(new Error('bad request magic from QEMU\'s NBD client')), false;
    const type = h.readUInt16BE(6);
    const handle = Buffer.from(h.subarray(8, 16));
    this.current = { key: handle.toString('hex'), type, handle };
    if (type === CMD.DISC) return (this.up ? this.up.end() : this.end()), false;
    if (this.up) this.pending.set(this.current.key, type);
    this.payloadLeft = type === CMD.WRITE ? h.readUInt32BE(24) : 0;
    if (this.payloadLeft === 0) this.requestDone();
    return true;
  }

  // A request fully read from QEMU: the capture answers it, or we do.
  private requestDone(): void {
    const cur = this.current!;
    this.current = null;
    if (!this.up) simpleReply(this.qemu, cur.handle, standInAnswer(cur.type));
  }

  // The capture's replies go to QEMU whole, so that a stand-in reply can never
  // land inside one.
  private fromUp(c: Buffer): void {
    if (!this.up) return;
    let all = this.replies.length ? Buffer.concat([this.replies, c]) : c;
    const whole = all.length - (all.length % REPLY_HEAD);
    for (let at = 0; at < whole; at += REPLY_HEAD) {
      if (all.readUInt32BE(at) !== SIMPLE_REPLY_MAGIC) return this.end(new Error('bad reply magic from the capture\'s NBD server'));
      this.pending.delete(all.toString('hex', at + 8, at + 16));
    }
    if (whole) this.qemu.write(all.subarray(0, whole));
    all = all.subarray(whole);
    this.replies = all.length ? Buffer.from(all) : Buffer.alloc(0);
  }
}

// The client side of the capture's handshake (fixed newstyle, no zeroes,
// NBD_OPT_EXPORT_NAME), leaving the socket paused at the transmission phase.
async function openUpstream(path: string, name: string): Promise<net.Socket> {
  const sock = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.createConnection({ path });
    s.once('error', reject);
    s.once('connect', () => (s.off('error', reject), resolve(s)));
  });
  const r = new Reader(sock);
  try {
    const hello = await r.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC || hello.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not an NBD server');
    const opt = Buffer.alloc(20);
    opt.writeUInt32BE(1 | 2, 0); // FIXED_NEWSTYLE | NO_ZEROES
    opt.writeBigUInt64BE(IHAVEOPT, 4);
    opt.writeUInt32BE(1, 12); // NBD_OPT_EXPORT_NAME
    opt.writeUInt32BE(Buffer.byteLength(name), 16);
    sock.write(Buffer.concat([opt, Buffer.from(name)]));
    await r.read(10); // size and transmission flags: QEMU got them from us already
    if (r.detach().length) throw new Error('unexpected bytes after the handshake');
    return sock;
  } catch (e) {
    sock.destroy();
    throw e;
  }
}
