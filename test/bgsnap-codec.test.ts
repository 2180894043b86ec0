// bgsnap codec: round trips over random snapshots and random chunking, and a
// clear StreamError for every kind of malformed input.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BgsnapDecoder, BgsnapEncoder } from '../format/bgsnap';
import { StreamError } from '../format/errors';
import { crc32, crc32Combine } from '../format/crc32';
import type { StreamEvent } from '../format/events';
import { decodeChunked, generate, makeHeader, pageBytes } from './helpers/streams';
import { prng, randInt } from './helpers/prng';

function applyPages(events: StreamEvent[], pageSize: number): Map<string, Buffer | null> {
  const got = new Map<string, Buffer | null>();
  for (const ev of events) {
    if (ev.type !== 'pages') continue;
    let d = 0;
    const { block, index, zero, data } = ev.batch;
    for (let i = 0; i < index.length; i++) {
      got.set(`${block}:${index[i]}`, zero[i] ? null : Buffer.from(data.subarray(d, (d += pageSize))));
    }
  }
  return got;
}

function expectError(stream: Buffer, code: string, re?: RegExp): StreamError {
  try {
    decodeChunked(stream, []);
  } catch (e) {
    assert.instance(e, StreamError);
    assert.is((e as StreamError).code, code, (e as Error).message);
    if (re) assert.match((e as Error).message, re);
    return e as StreamError;
  }
  assert.unreachable(`expected ${code}`);
  throw new Error('unreachable');
}

test('round trip: random snapshots, random chunk splits, last version wins', () => {
  for (let seed = 1; seed <= 60; seed++) {
    const g = generate(seed, { compressLevel: seed % 3 === 0 ? 3 : undefined });
    const rnd = prng(seed * 7);
    const cuts = Array.from({ length: randInt(rnd, 0, 20) }, () => randInt(rnd, 0, g.stream.length)).sort((a, b) => a - b);
    const events = decodeChunked(g.stream, cuts);
    assert.equal(events.map((e) => e.type).filter((t) => t !== 'pages'), ['header', 'blocks', 'state', 'end'], `seed ${seed}`);
    const blocks = events.find((e) => e.type === 'blocks');
    assert.equal(blocks && blocks.type === 'blocks' && blocks.blocks, g.blocks);
    const got = applyPages(events, g.pageSize);
    assert.is(got.size, g.expect.size, `seed ${seed}`);
    for (const [k, v] of g.expect) assert.ok(v === null ? got.get(k) === null : v.equals(got.get(k)!), `seed ${seed} page ${k}`);
  }
});

test('byte-at-a-time decoding gives the same events', () => {
  const g = generate(99, { compressLevel: 1 });
  const cuts = Array.from({ length: g.stream.length - 1 }, (_, i) => i + 1);
  assert.is(decodeChunked(g.stream, cuts).length, decodeChunked(g.stream, []).length);
});

test('compression shrinks compressible pages and round-trips', () => {
  const enc = new BgsnapEncoder({ compressLevel: 3 });
  enc.header(makeHeader());
  const data = Buffer.alloc(4096 * 8, 0x41);
  const f = Buffer.concat(enc.pages({ block: 0, index: Uint32Array.from([0, 1, 2, 3, 4, 5, 6, 7]), zero: new Uint8Array(8), data }));
  assert.ok(f.length < data.length / 10, `compressed frame ${f.length} bytes`);
});

// The encoder reuses one input and output buffer for the whole stream: batches
// that grow, shrink and grow again must each decode to their own pages, and a
// batch that does not compress goes uncompressed (flags 0), still decodable.
test('compressed batches of changing sizes keep their own pages; incompressible ones go raw', () => {
  const enc = new BgsnapEncoder({ compressLevel: 1 });
  const rnd = prng(5);
  const parts = [enc.magic(), ...enc.header(makeHeader()), ...enc.blocks([{ name: 'a', length: 4096 * 64, address: 0 }])];
  const want = new Map<string, Buffer | null>();
  const flags: number[] = [];
  let first = 0;
  for (const [n, random] of [[8, false], [2, false], [16, true], [1, false], [32, false], [3, true]] as const) {
    const data = Buffer.alloc(4096 * n);
    for (let i = 0; i < n; i++) {
      const page = data.subarray(i * 4096, (i + 1) * 4096);
      if (random) for (let b = 0; b < page.length; b++) page[b] = randInt(rnd, 0, 255);
      else page.fill(0x30 + ((first + i) % 40));
      want.set(`0:${first + i}`, Buffer.from(page));
    }
    const frame = enc.pages({ block: 0, index: Uint32Array.from({ length: n }, (_, i) => first + i), zero: new Uint8Array(n), data });
    flags.push(frame[0][1]);
    parts.push(...frame);
    first += n;
  }
  assert.equal(flags, [1, 1, 0, 1, 1, 0], 'zstd only where it made the batch smaller');
  const got = applyPages(decodeChunked(Buffer.concat([...parts, ...enc.end()]), []), 4096);
  assert.is(got.size, want.size);
  for (const [k, v] of want) assert.ok(v!.equals(got.get(k)!), `page ${k}`);
});

test('a batch of only zero pages whose data buffer has no memory keeps a valid checksum', () => {
  // Native zero-copy batches hand over an empty buffer backed by no memory;
  // zlib's crc32 then returned 0 instead of the running checksum.
  const enc = new BgsnapEncoder();
  const head = [enc.magic(), ...enc.header(makeHeader()), ...enc.blocks([{ name: 'a', length: 8192, address: 0 }])];
  const noMemory = Buffer.from(new ArrayBuffer(0));
  const pages = enc.pages({ block: 0, index: Uint32Array.from([0, 1]), zero: Uint8Array.from([1, 1]), data: noMemory });
  const events = decodeChunked(Buffer.concat([...head, ...pages, ...enc.end()]), []);
  assert.equal(events.map((e) => e.type), ['header', 'blocks', 'pages', 'end']);
});

test('bad magic, unknown version', () => {
  const g = generate(1);
  expectError(Buffer.concat([Buffer.from('NOTASNAP'), g.stream.subarray(8)]), 'BAD_MAGIC', /not a bgsnap stream/);
  // Version 2 is a chain (chain-codec.test.ts); 3 is unknown.
  const v3 = Buffer.from(g.stream);
  v3.writeUInt16LE(3, 6);
  expectError(v3, 'BAD_VERSION', /version 3 is not supported/);
});

test('unknown frame type, bad checksum, oversized length', () => {
  const g = generate(2);
  const at = g.frames[0].length + g.frames[1].length; // the BLOCKS frame
  const unknown = Buffer.from(g.stream);
  unknown[at] = 42;
  expectError(unknown, 'UNKNOWN_FRAME', /unknown frame type 42/);
  const flipped = Buffer.from(g.stream);
  flipped[at + 20] ^= 1;
  const e = expectError(flipped, 'BAD_CHECKSUM', /BLOCKS frame 1/);
  assert.is(e.offset, at);
  const huge = Buffer.from(g.stream);
  huge.writeUInt32LE(0x7fffffff, at + 4);
  expectError(huge, 'TOO_LARGE');
});

test('a flipped bit anywhere in a PAGES frame (meta or page data) fails its checksum', () => {
  const enc = new BgsnapEncoder();
  const head = [enc.magic(), ...enc.header(makeHeader()), ...enc.blocks([{ name: 'a', length: 4 * 4096, address: 0 }])];
  const data = Buffer.concat([pageBytes(1, 4096), pageBytes(2, 4096), pageBytes(3, 4096)]);
  const pages = Buffer.concat(enc.pages({ block: 0, index: Uint32Array.from([0, 1, 2, 3]), zero: Uint8Array.from([0, 0, 1, 0]), data }));
  const at = Buffer.concat(head).length;
  for (const off of [16 + 9, 16 + 28, pages.length - 1, pages.length - 4096, pages.length - 5000]) {
    const bad = Buffer.concat([...head, pages, ...enc.end()]);
    bad[at + off] ^= 0x10;
    expectError(bad, 'BAD_CHECKSUM', /bad checksum in PAGES frame 2/);
  }
});

test('combined page checksums equal the checksum of the whole', () => {
  const rnd = prng(3);
  for (let i = 0; i < 50; i++) {
    const a = Buffer.from(Array.from({ length: randInt(rnd, 0, 300) }, () => randInt(rnd, 0, 255)));
    const b = Buffer.from(Array.from({ length: randInt(rnd, 1, 9000) }, () => randInt(rnd, 0, 255)));
    assert.is(crc32Combine(crc32(a), crc32(b), b.length), crc32(Buffer.concat([a, b])));
  }
});

test('the decoder hands the sink the checksum of each data page', () => {
  const g = generate(77);
  for (const ev of decodeChunked(g.stream, [])) {
    if (ev.type !== 'pages') continue;
    const { data, crcs } = ev.batch;
    assert.ok(crcs, 'uncompressed PAGES frames carry page checksums');
    for (let i = 0; i < crcs!.length; i++) assert.is(crcs![i], crc32(data.subarray(i * 4096, (i + 1) * 4096)));
  }
});

test('page index past its block, unknown block, second block table', () => {
  const enc = new BgsnapEncoder();
  const head = [enc.magic(), ...enc.header(makeHeader()), ...enc.blocks([{ name: 'a', length: 8192, address: 0 }])];
  const page = pageBytes(1, 4096);
  const past = Buffer.concat([...head, ...enc.pages({ block: 0, index: Uint32Array.from([2]), zero: new Uint8Array(1), data: page })]);
  expectError(past, 'OUT_OF_BOUNDS', /page 2 is past the end of block 0/);
  const nob = Buffer.concat([...head, ...enc.pages({ block: 3, index: Uint32Array.from([0]), zero: new Uint8Array(1), data: page })]);
  expectError(nob, 'BLOCK_MISMATCH', /names block 3/);
  const twice = Buffer.concat([...head, ...enc.blocks([{ name: 'b', length: 4096, address: 0 }])]);
  expectError(twice, 'BLOCK_MISMATCH', /second BLOCKS/);
});

test('a dropped frame fails the END totals', () => {
  const g = generate(5, { blocks: 2 });
  const pagesAt = 3; // first random batch
  const dropped = Buffer.concat(g.frames.filter((_, i) => i !== pagesAt));
  expectError(dropped, 'TOTALS_MISMATCH', /END frame says pages=/);
});

test('truncated at every frame boundary and inside frames: TRUNCATED, never an end event', () => {
  const g = generate(7);
  const bounds: number[] = [];
  g.frames.reduce((o, f) => (bounds.push(o, o + 5, o + Math.floor(f.length / 2)), o + f.length), 0);
  for (const cut of bounds.filter((b) => b < g.stream.length)) {
    const dec = new BgsnapDecoder();
    const evs = dec.push(g.stream.subarray(0, cut));
    assert.not.ok(evs.some((e) => e.type === 'end'), `cut ${cut}`);
    try {
      dec.finish();
      assert.unreachable(`cut ${cut} finished`);
    } catch (e) {
      assert.is((e as StreamError).code, 'TRUNCATED', `cut ${cut}: ${(e as Error).message}`);
    }
  }
});

test('bytes after END are refused', () => {
  const g = generate(8);
  expectError(Buffer.concat([g.stream, g.frames[1]]), 'MALFORMED', /after the END frame/);
});

test.run();
