// One accepted connection of the network server: CHALLENGE, HELLO checked
// (token MAC in constant time, name, admission), READY, then the stream handed
// to the application's handler as a readable, then RESULT with the handler's
// summary. The handler is called only after READY, so nothing touches the disk
// before. Everything that goes wrong ends this connection only.
import * as crypto from 'node:crypto';
import type * as net from 'node:net';
import { PassThrough, type Readable } from 'node:stream';
import { channelBinding, macMatches } from './auth';
import {
  encodeChallenge, encodeReply, helloMac, helloRest, HELLO_FIXED, NAME_RE, Refusal, ReplyKind,
  RESULT_COMPLETE, RESULT_INCOMPLETE,
} from '../format/net-protocol';
import { readExact } from './read-exact';
import type { ReceiveSummary } from '../io/sink';

// What the handler gets for one admitted stream.
export interface IncomingStream {
  name: string; // '' when the sender gave none (validated: NAME_RE)
  peer: string;
  input: Readable; // the stream's bytes; fails with the reason if the connection breaks
  endInput(): void; // the stream provably ended: stop reading the connection
  failReason(): string | undefined; // the session's own reason (timeout, shutdown) beats the decoder's
}

export type StreamHandler = (s: IncomingStream) => Promise<ReceiveSummary>;

export interface SessionConfig {
  token?: Buffer;
  idleMs: number;
  admit(): string; // '' when a stream slot was taken, else why not
  leave(): void; // gives the slot back
  handle: StreamHandler;
  log(msg: string): void;
}

class Refused extends Error {
  constructor(readonly code: Refusal, message: string) {
    super(message);
  }
}

export class ServerSession {
  readonly done: Promise<void>;
  private input: PassThrough | undefined;
  private abortReason: string | undefined;
  private readonly peer: string;

  constructor(private readonly sock: net.Socket, private readonly cfg: SessionConfig) {
    this.peer = `${sock.remoteAddress}:${sock.remotePort}`;
    sock.on('error', () => undefined); // reported through 'close' and the stream's own end
    sock.setTimeout(cfg.idleMs, () => this.abort(`no data from the sender for ${cfg.idleMs / 1000} s`));
    this.done = this.run();
  }

  // Ends this connection; a stream being received fails with the reason.
  abort(reason: string): void {
    this.abortReason ??= reason;
    if (this.input) this.input.destroy(new Error(reason));
    else this.sock.destroy();
  }

  private async run(): Promise<void> {
    let admitted = false;
    try {
      const name = await this.handshake();
      admitted = true;
      const summary = await this.receive(name);
      this.reply(ReplyKind.RESULT, summary.status === 'complete' ? RESULT_COMPLETE : RESULT_INCOMPLETE, summary, true);
      this.cfg.log(`${this.peer}: image ${summary.image || '(none)'} ${summary.status}${summary.reason ? `: ${summary.reason}` : ''}`);
    } catch (e) {
      // After READY the sender is owed a RESULT even when the image could not be
      // closed cleanly (a full disk fails the index too); it stays marked incomplete.
      if (e instanceof Refused) this.reply(ReplyKind.READY, e.code, { reason: e.message }, true);
      else if (admitted) this.reply(ReplyKind.RESULT, RESULT_INCOMPLETE, { status: 'incomplete', reason: (e as Error).message }, true);
      else this.sock.destroy();
      this.cfg.log(`${this.peer}: ${e instanceof Refused ? 'refused' : 'failed'}: ${(e as Error).message}`);
    } finally {
      if (admitted) this.cfg.leave();
    }
  }

  // Everything here is bounded: the hello's length fields are checked before
  // the rest is read, and the idle timeout covers a sender that stalls.
  private async handshake(): Promise<string> {
    const nonce = crypto.randomBytes(32);
    this.sock.write(encodeChallenge(nonce, this.cfg.token !== undefined));
    let nameLen: number;
    let macLen: number;
    try {
      ({ nameLen, macLen } = helloRest(await readExact(this.sock, HELLO_FIXED)));
    } catch (e) {
      throw this.sock.destroyed ? e : new Refused(Refusal.PROTOCOL, (e as Error).message);
    }
    const rest = await readExact(this.sock, nameLen + macLen);
    const name = rest.subarray(0, nameLen).toString('utf8');
    if (this.cfg.token && !macMatches(rest.subarray(nameLen), helloMac(this.cfg.token, nonce, channelBinding(this.sock), name))) {
      throw new Refused(Refusal.AUTH, 'authentication failed');
    }
    if (name !== '' && !NAME_RE.test(name)) throw new Refused(Refusal.NAME, `invalid image name ${JSON.stringify(name)}: one path component of letters, digits, ".", "_", "-"`);
    const busy = this.cfg.admit();
    if (busy) throw new Refused(Refusal.BUSY, busy);
    this.reply(ReplyKind.READY, Refusal.OK, { name }, false);
    return name;
  }

  // The stream goes through a PassThrough this session controls, so it can end
  // the input right after the END frame (without waiting for the sender to
  // close) and fail it with a clear reason when the connection breaks. Its
  // buffer holds a few page frames: with the default 16 KiB every 64 KiB socket
  // read paused and resumed the socket, which capped a stream at ~40 MB/s.
  private async receive(name: string): Promise<ReceiveSummary> {
    const input = (this.input = new PassThrough({ highWaterMark: 4 << 20 }));
    let ended = false;
    const onData = (c: Buffer) => void (input.write(c) || this.sock.pause());
    const endInput = () => {
      ended = true;
      this.sock.setTimeout(0);
      this.sock.off('data', onData).pause();
      input.end();
    };
    input.on('drain', () => this.sock.resume());
    this.sock.on('data', onData);
    this.sock.on('end', () => ended || input.end()); // the sender closed its side: the decoder decides
    this.sock.on('close', () => ended || input.writableEnded || this.abort('the connection was lost before the END frame'));
    if (this.abortReason) input.destroy(new Error(this.abortReason));
    return this.cfg.handle({ name, peer: this.peer, input, endInput, failReason: () => this.abortReason });
  }

  // The last reply ends the connection from this side.
  private reply(kind: ReplyKind, code: number, body: unknown, last: boolean): void {
    if (this.sock.destroyed || !this.sock.writable) return;
    if (!last) return void this.sock.write(encodeReply(kind, code, body));
    // Keep reading (and dropping) what the sender still has in flight: closing
    // with unread bytes would reset the connection and lose this reply.
    this.sock.removeAllListeners('data');
    this.sock.on('data', () => undefined).resume();
    this.sock.end(encodeReply(kind, code, body));
    setTimeout(() => this.sock.destroy(), 10_000).unref(); // a peer that never closes
  }
}
