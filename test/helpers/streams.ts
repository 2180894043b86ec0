// Builds bgsnap streams for tests: a random snapshot (blocks, pages sent in random
// order with duplicates and zero pages) encoded with the real encoder, plus the
// expected final content of every page (last version wins).
import { BgsnapDecoder, BgsnapEncoder } from '../../format/bgsnap';
import type { BlockInfo, StreamEvent, StreamHeader } from '../../format/events';
import { prng, randInt } from './prng';

export interface Generated {
  stream: Buffer;
  frames: Buffer[]; // each frame's bytes, magic first
  blocks: BlockInfo[];
  expect: Map<string, Buffer | null>; // "block:page" -> final bytes, null = zero
  pageSize: number;
}

export function pageBytes(seed: number, pageSize: number): Buffer {
  const b = Buffer.alloc(pageSize);
  for (let o = 0; o < pageSize; o += 4) b.writeUInt32LE((seed * 2654435761 + o) >>> 0, o);
  return b;
}

export function makeHeader(pageSize = 4096): StreamHeader {
  return { snapshotId: 'ab'.repeat(16), source: 'qemu', pageSize, created: 1700000000000, label: 'test' };
}

export function generate(seed: number, opts: { compressLevel?: number; blocks?: number } = {}): Generated {
  const rnd = prng(seed);
  const pageSize = 4096;
  const enc = new BgsnapEncoder({ compressLevel: opts.compressLevel });
  const blocks: BlockInfo[] = [];
  for (let i = 0; i < (opts.blocks ?? randInt(rnd, 1, 4)); i++) {
    blocks.push({ name: `blk${i}`, length: randInt(rnd, 1, 40) * pageSize, address: i * 0x100000 });
  }
  const frames: Buffer[] = [enc.magic(), Buffer.concat(enc.header(makeHeader(pageSize))), Buffer.concat(enc.blocks(blocks))];
  const expect = new Map<string, Buffer | null>();
  const batches = randInt(rnd, 1, 12);
  for (let b = 0; b < batches; b++) frames.push(Buffer.concat(randomBatch(rnd, enc, blocks, pageSize, expect)));
  // cover every page so the image can be complete
  blocks.forEach((blk, i) => {
    const missing: number[] = [];
    for (let p = 0; p < blk.length / pageSize; p++) if (!expect.has(`${i}:${p}`)) missing.push(p);
    if (missing.length === 0) return;
    const index = Uint32Array.from(missing);
    missing.forEach((p) => expect.set(`${i}:${p}`, null));
    frames.push(Buffer.concat(enc.pages({ block: i, index, zero: new Uint8Array(index.length).fill(1), data: Buffer.alloc(0) })));
  });
  frames.push(Buffer.concat(enc.state({ kind: 'test.state', data: Buffer.from('hello') })));
  frames.push(Buffer.concat(enc.end()));
  return { stream: Buffer.concat(frames), frames, blocks, expect, pageSize };
}

function randomBatch(
  rnd: () => number, enc: BgsnapEncoder, blocks: BlockInfo[], pageSize: number, expect: Map<string, Buffer | null>,
): Buffer[] {
  const block = randInt(rnd, 0, blocks.length - 1);
  const pages = blocks[block].length / pageSize;
  const n = randInt(rnd, 1, 30);
  const index = new Uint32Array(n);
  const zero = new Uint8Array(n);
  const data: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    index[i] = randInt(rnd, 0, pages - 1);
    zero[i] = rnd() < 0.25 ? 1 : 0;
    const bytes = zero[i] ? null : pageBytes(randInt(rnd, 1, 1e9), pageSize);
    if (bytes) data.push(bytes);
    expect.set(`${block}:${index[i]}`, bytes);
  }
  return enc.pages({ block, index, zero, data: Buffer.concat(data) });
}

// Decodes a stream fed in pieces cut at `cuts` (offsets): a decoder must not
// care where reads end.
export function decodeChunked(stream: Buffer, cuts: number[]): StreamEvent[] {
  const dec = new BgsnapDecoder();
  const out: StreamEvent[] = [];
  let last = 0;
  for (const c of [...cuts, stream.length]) {
    out.push(...dec.push(stream.subarray(last, c)));
    last = c;
  }
  return [...out, ...dec.finish()];
}
