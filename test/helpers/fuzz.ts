// Mutation fuzzing of the stream decoders and the receive path, shared by the
// bounded run in test/fuzz.test.ts and the long run in bench/fuzz.ts. Seeds
// are real streams from the real encoders (bgsnap, plain and zstd; QEMU 7.2);
// mutations are blind (flip, splice, truncate) and, for bgsnap, frame-aware
// with the CRC fixed up so the mutation reaches the payload checks.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import * as zlib from 'node:zlib';
import { BgsnapDecoder, FRAME_HEADER } from '../../format/bgsnap';
import { StreamError } from '../../format/errors';
import type { StreamDecoder } from '../../format/events';
import { QemuDecoder } from '../../format/qemu';
import { ImageWriter, imageSize } from '../../receiver/image';
import { IndexStore } from '../../receiver/index-store';
import type { ImageBlock } from '../../receiver/image';
import { receive } from '../../receiver/receive';
import { genStream } from './qemu-gen';
import { prng, randInt } from './prng';
import { generate } from './streams';
import { generateChain } from './chain-gen';
import { tmpDir } from './net';

export interface Seed {
  kind: 'bgsnap' | 'qemu';
  bytes: Buffer;
  frames?: Buffer[]; // bgsnap: each frame's bytes, magic first
}

export function seeds(): Seed[] {
  const out: Seed[] = [];
  for (let s = 1; s <= 6; s++) {
    const g = generate(100 + s, { compressLevel: s % 2 ? 1 : undefined });
    out.push({ kind: 'bgsnap', bytes: g.stream, frames: g.frames });
    out.push({ kind: 'qemu', bytes: genStream(200 + s, { records: 60 }).bytes });
    const c = generateChain(300 + s, 3); // chains (version 2): GENERATION frames, blocks added and removed
    out.push({ kind: 'bgsnap', bytes: c.stream, frames: splitFrames(c.stream) });
  }
  return out;
}

// The magic, then each frame's bytes.
function splitFrames(stream: Buffer): Buffer[] {
  const out = [stream.subarray(0, 8)];
  for (let o = 8; o < stream.length; ) {
    const end = o + FRAME_HEADER + stream.readUInt32LE(o + 4);
    out.push(stream.subarray(o, end));
    o = end;
  }
  return out;
}

type Rnd = () => number;

function blind(rnd: Rnd, b: Buffer): Buffer {
  const m = Buffer.from(b);
  switch (randInt(rnd, 0, 4)) {
    case 0: for (let i = randInt(rnd, 1, 8); i > 0; i--) m[randInt(rnd, 0, m.length - 1)] ^= 1 << randInt(rnd, 0, 7); return m;
    case 1: return m.subarray(0, randInt(rnd, 0, m.length - 1));
    case 2: { const at = randInt(rnd, 0, m.length); return Buffer.concat([m.subarray(0, at), m.subarray(randInt(rnd, 0, m.length - 1), randInt(rnd, 0, m.length)), m.subarray(at)]); }
    case 3: { const at = randInt(rnd, 0, m.length - 1); return Buffer.concat([m.subarray(0, at), m.subarray(Math.min(m.length, at + randInt(rnd, 1, 64)))]); }
    default: { const at = randInt(rnd, 0, m.length - 4); m.writeUInt32LE(interesting(rnd), at); return m; }
  }
}

function interesting(rnd: Rnd): number {
  const v = [0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffffe, 4096, 0x10000, 0x4000000];
  return v[randInt(rnd, 0, v.length - 1)];
}

// Mutates one frame (header fields or payload) and recomputes its CRC, so the
// decoder's structural checks, not the checksum, must catch the damage.
function frameAware(rnd: Rnd, frames: Buffer[]): Buffer {
  const fs_ = frames.map((f) => Buffer.from(f));
  const i = randInt(rnd, 1, fs_.length - 1);
  const f = fs_[i];
  const span = f.length - 4;
  for (let k = randInt(rnd, 1, 4); k > 0; k--) {
    const at = randInt(rnd, 0, span - 1);
    if (at >= 12 && at < 16) continue; // leave the CRC to the fix-up
    if (rnd() < 0.5) f[at] ^= 1 << randInt(rnd, 0, 7);
    else if (at + 4 <= f.length && (at < 12 || at >= 16)) f.writeUInt32LE(interesting(rnd), at);
  }
  let crc = zlib.crc32(f.subarray(0, 12));
  crc = zlib.crc32(f.subarray(FRAME_HEADER), crc);
  f.writeUInt32LE(crc, 12);
  if (rnd() < 0.2) fs_.splice(randInt(rnd, 1, fs_.length - 1), 0, f); // and sometimes repeat it
  return Buffer.concat(fs_);
}

export function mutate(rnd: Rnd, s: Seed): Buffer {
  if (s.frames && rnd() < 0.6) return frameAware(rnd, s.frames);
  let b = blind(rnd, s.bytes);
  if (rnd() < 0.3 && b.length > 0) b = blind(rnd, b);
  return b;
}

function chunks(rnd: Rnd, b: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let o = 0; o < b.length;) {
    const n = randInt(rnd, 1, rnd() < 0.5 ? 64 : 65536);
    out.push(b.subarray(o, o + n));
    o += n;
  }
  return out;
}

// Decoder only: the one allowed failure is a StreamError. Returns what broke, or ''.
export function decodeOnce(rnd: Rnd, s: Seed, bytes: Buffer): string {
  const dec: StreamDecoder = s.kind === 'bgsnap' ? new BgsnapDecoder() : new QemuDecoder();
  try {
    for (const c of chunks(rnd, bytes)) dec.push(c);
    dec.finish();
  } catch (e) {
    if (!(e instanceof StreamError)) return `${s.kind} decoder threw ${(e as Error).name}: ${(e as Error).stack}`;
  }
  return '';
}

export const FUZZ_MAX_IMAGE = 256 << 20;

// Through receive() into a real ImageWriter: must resolve (never throw), and
// leave nothing but data + index in the image dir, the data file no larger than
// the block layout the index records (or empty when no layout was accepted).
export async function receiveOnce(rnd: Rnd, bytes: Buffer, dir: string): Promise<string> {
  const w = await ImageWriter.create(dir, { force: true, maxImageBytes: FUZZ_MAX_IMAGE });
  try {
    await receive(Readable.from(chunks(rnd, bytes)), w);
  } catch (e) {
    return `receive threw: ${(e as Error).stack}`;
  }
  // A chain image has one data file per generation after the first (data.K).
  const extra = fs.readdirSync(dir).filter((e) => e !== 'data' && e !== 'index' && !/^data\.\d+$/.test(e));
  if (extra.length) return `unexpected files in the image: ${extra.join(', ')}`;
  const idx = await IndexStore.open(path.join(dir, 'index'), false);
  const blocks = (await idx.getJson<ImageBlock[]>('blocks')) ?? [];
  await idx.close();
  for (const f of fs.readdirSync(dir).filter((e) => e.startsWith('data'))) {
    const size = fs.statSync(path.join(dir, f)).size;
    if (size > imageSize(blocks) || size > FUZZ_MAX_IMAGE) return `${f} is ${size} bytes, layout allows ${imageSize(blocks)}`;
  }
  return '';
}

export interface FuzzReport { cases: number; received: number; failures: string[] }

// Runs for `ms` milliseconds from `seed`; every case is reproducible from its number.
export async function fuzz(seed: number, ms: number, receiveEvery = 8): Promise<FuzzReport> {
  const base = seeds();
  const dir = tmpDir('fuzz');
  const r: FuzzReport = { cases: 0, received: 0, failures: [] };
  const end = Date.now() + ms;
  try {
    while (Date.now() < end && r.failures.length < 5) {
      const rnd = prng(seed * 1_000_003 + r.cases);
      const s = base[randInt(rnd, 0, base.length - 1)];
      const bytes = mutate(rnd, s);
      const bad = decodeOnce(rnd, s, bytes) || (r.cases % receiveEvery === 0 ? (r.received++, await receiveOnce(rnd, bytes, path.join(dir, 'img'))) : '');
      if (bad) r.failures.push(`seed ${seed} case ${r.cases}: ${bad}`);
      r.cases++;
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return r;
}
