// The network transport's own messages (format/SPEC.md, "Network transport"):
// the server's CHALLENGE, the client's HELLO, the server's REPLY (READY or
// RESULT). The snapshot itself travels between them as a plain bgsnap stream.
// All integers little-endian, like the bgsnap stream. Pure encode/decode: the
// socket side is in net/.
import * as crypto from 'node:crypto';

export const NET_MAGIC = Buffer.from('BGSNET', 'latin1');
export const REPLY_MAGIC = Buffer.from('BGSR', 'latin1');
export const NET_VERSION = 1;
export const CHALLENGE_LEN = 40; // magic(6) version(1) flags(1) nonce(32)
export const HELLO_FIXED = 12; // magic(6) version(1) flags(1) nameLen(2) macLen(2)
export const REPLY_FIXED = 10; // magic(4) kind(1) code(1) length(4)
export const MAX_NAME = 128;
export const MAX_REPLY = 64 * 1024;
export const CHALLENGE_TOKEN = 1; // CHALLENGE flag: the server wants a token MAC

export enum ReplyKind { READY = 1, RESULT = 2 }
// READY codes: 0 accepted, else why refused. RESULT codes: 0 complete and durable, 1 incomplete.
export enum Refusal { OK = 0, AUTH = 1, BUSY = 2, NAME = 3, PROTOCOL = 4 }
export const RESULT_COMPLETE = 0;
export const RESULT_INCOMPLETE = 1;

// Image names a sender may give: one path component, no leading dot, so never
// "..", never hidden, never a separator.
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function encodeChallenge(nonce: Buffer, tokenRequired: boolean): Buffer {
  const b = Buffer.alloc(CHALLENGE_LEN);
  NET_MAGIC.copy(b, 0);
  b.writeUInt8(NET_VERSION, 6);
  b.writeUInt8(tokenRequired ? CHALLENGE_TOKEN : 0, 7);
  nonce.copy(b, 8);
  return b;
}

export interface Challenge { version: number; tokenRequired: boolean; nonce: Buffer }

export function decodeChallenge(b: Buffer): Challenge {
  if (!b.subarray(0, 6).equals(NET_MAGIC)) throw new Error('the peer is not a bgsnap receiver (bad challenge magic)');
  return { version: b.readUInt8(6), tokenRequired: (b.readUInt8(7) & CHALLENGE_TOKEN) !== 0, nonce: b.subarray(8, 40) };
}

export interface Hello { version: number; name: string; mac: Buffer }

export function encodeHello(name: string, mac: Buffer): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(HELLO_FIXED);
  NET_MAGIC.copy(b, 0);
  b.writeUInt8(NET_VERSION, 6);
  b.writeUInt16LE(n.length, 8);
  b.writeUInt16LE(mac.length, 10);
  return Buffer.concat([b, n, mac]);
}

// The fixed part says how many bytes follow; both are bounded before reading.
export function helloRest(fixed: Buffer): { nameLen: number; macLen: number } {
  if (!fixed.subarray(0, 6).equals(NET_MAGIC)) throw new Error('not a bgsnap network client (bad hello magic)');
  if (fixed.readUInt8(6) !== NET_VERSION) throw new Error(`network protocol version ${fixed.readUInt8(6)} is not supported (this receiver speaks ${NET_VERSION})`);
  const nameLen = fixed.readUInt16LE(8);
  const macLen = fixed.readUInt16LE(10);
  if (nameLen > MAX_NAME || (macLen !== 0 && macLen !== 32)) throw new Error('malformed hello');
  return { nameLen, macLen };
}

// HMAC-SHA256 over a fixed label, the server's fresh nonce, the TLS channel
// binding (empty on plain TCP) and the requested name: the token never crosses
// the wire, a recorded hello cannot be replayed, and a hello relayed into
// another TLS session does not verify.
export function helloMac(token: Buffer, nonce: Buffer, binding: Buffer, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const len = Buffer.alloc(2);
  len.writeUInt16LE(n.length, 0);
  return crypto.createHmac('sha256', token).update('bgsnap-net-v1\0').update(nonce).update(binding).update(len).update(n).digest();
}

export function encodeReply(kind: ReplyKind, code: number, body: unknown): Buffer {
  const json = Buffer.from(JSON.stringify(body), 'utf8').subarray(0, MAX_REPLY);
  const b = Buffer.alloc(REPLY_FIXED);
  REPLY_MAGIC.copy(b, 0);
  b.writeUInt8(kind, 4);
  b.writeUInt8(code, 5);
  b.writeUInt32LE(json.length, 6);
  return Buffer.concat([b, json]);
}

export interface Reply { kind: ReplyKind; code: number; body: Record<string, unknown> }

// Parses one REPLY from the front of buf; undefined until it is complete.
export function decodeReply(buf: Buffer): { reply: Reply; used: number } | undefined {
  if (buf.length < REPLY_FIXED) return undefined;
  if (!buf.subarray(0, 4).equals(REPLY_MAGIC)) throw new Error('the receiver sent something that is not a reply');
  const len = buf.readUInt32LE(6);
  if (len > MAX_REPLY) throw new Error(`reply of ${len} bytes is over the limit`);
  if (buf.length < REPLY_FIXED + len) return undefined;
  const body = JSON.parse(buf.subarray(REPLY_FIXED, REPLY_FIXED + len).toString('utf8')) as Record<string, unknown>;
  return { reply: { kind: buf.readUInt8(4), code: buf.readUInt8(5), body }, used: REPLY_FIXED + len };
}
