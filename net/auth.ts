// What both ends of the network transport need to authenticate: the TLS
// material from --cert/--key/--ca, the shared token from --token-file or
// BGSNAP_TOKEN, the TLS channel binding, and a constant-time MAC check.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import type * as net from 'node:net';
import * as tls from 'node:tls';

export const TOKEN_ENV = 'BGSNAP_TOKEN';
const MIN_TOKEN = 16;

export interface AuthFlags {
  cert?: string;
  key?: string;
  ca?: string;
  tokenFile?: string;
  insecure?: boolean;
}

export interface Auth {
  tls?: { cert?: Buffer; key?: Buffer; ca?: Buffer };
  token?: Buffer;
  insecure: boolean;
}

function read(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new Error(`cannot read ${what} ${file}: ${(e as Error).message}`);
  }
}

// A token shorter than 16 bytes is refused: it would be guessable offline from
// one recorded hello (the MAC is over a public nonce).
export function loadToken(file: string | undefined): Buffer | undefined {
  const text = file !== undefined ? read(file, 'token file').toString('utf8') : process.env[TOKEN_ENV];
  if (text === undefined) return undefined;
  const token = Buffer.from(text.trim(), 'utf8');
  if (token.length < MIN_TOKEN) throw new Error(`the token must be at least ${MIN_TOKEN} characters (${file ?? TOKEN_ENV})`);
  return token;
}

export function loadAuth(f: AuthFlags): Auth {
  const anyTls = f.cert !== undefined || f.key !== undefined || f.ca !== undefined;
  if ((f.cert === undefined) !== (f.key === undefined)) throw new Error('--cert and --key go together');
  return {
    tls: anyTls ? { cert: f.cert ? read(f.cert, 'certificate') : undefined, key: f.key ? read(f.key, 'key') : undefined, ca: f.ca ? read(f.ca, 'CA') : undefined } : undefined,
    token: loadToken(f.tokenFile),
    insecure: f.insecure === true,
  };
}

// The receiver must encrypt unless told --insecure, and must authenticate every
// sender: by client certificate (--ca makes TLS mutual) or by token.
export function checkServerAuth(a: Auth): void {
  if (a.tls && !(a.tls.cert && a.tls.key)) throw new Error('TLS needs --cert and --key on the receiver');
  if (!a.tls && !a.insecure) throw new Error('refusing plain TCP: give --cert/--key (TLS) or, for loopback tests only, --insecure');
  if (!a.tls?.ca && !a.token) throw new Error(`no way to authenticate senders: give --ca (mutual TLS) or a token (--token-file or ${TOKEN_ENV})`);
}

export function checkClientAuth(a: Auth): void {
  if (!a.tls && !a.insecure) throw new Error('refusing plain TCP: give --ca (and --cert/--key for mutual TLS) or, for loopback tests only, --insecure');
}

// Exported keying material of the TLS session (RFC 5705/8446): the same on both
// ends of one session, different in any other, so a MAC over it cannot be relayed.
export function channelBinding(sock: net.Socket): Buffer {
  return sock instanceof tls.TLSSocket ? sock.exportKeyingMaterial(32, 'EXPORTER-bgsnap-token', Buffer.alloc(0)) : Buffer.alloc(0);
}

export function macMatches(got: Buffer, want: Buffer): boolean {
  return got.length === want.length && crypto.timingSafeEqual(got, want);
}
