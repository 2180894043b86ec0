// Chain streams (bgsnap version 2, format/SPEC.md, "Chains of generations") at the codec level:
// round trips over random chains and random chunking, and a named StreamError
// for every rule a chain can break. Version 1 streams are covered by
// bgsnap-codec.test.ts and must still decode as before.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BgsnapDecoder, BgsnapEncoder, FrameType } from '../format/bgsnap';
import { frame } from '../format/bgsnap-frame';
import { emptyGenerationTotals, encodeGenerationEnd } from '../format/chain';
import { crc32 } from '../format/crc32';
import { StreamError } from '../format/errors';
import type { StreamEvent } from '../format/events';
import { generateChain } from './helpers/chain-gen';
import { decodeChunked, makeHeader, generate } from './helpers/streams';
import { prng, randInt } from './helpers/prng';

const decode = (stream: Buffer, cuts: number[] = []) => decodeChunked(stream, cuts);

function expectError(stream: Buffer, code: string, re: RegExp): void {
  try {
    decode(stream);
  } catch (e) {
    assert.instance(e, StreamError);
    assert.is((e as StreamError).code, code, (e as Error).message);
    assert.match((e as Error).message, re);
    return;
  }
  assert.unreachable(`expected ${code}`);
}

test('round trip: random chains, random chunk splits; each generation replays to its expected pages', () => {
  for (let seed = 1; seed <= 40; seed++) {
    const c = generateChain(seed);
    const rnd = prng(seed * 13);
    const cuts = Array.from({ length: randInt(rnd, 0, 30) }, () => randInt(rnd, 0, c.stream.length)).sort((a, b) => a - b);
    const events = decode(c.stream, cuts);
    assert.equal(events[0].type === 'header' && events[0].header.chain, true, 'the header says chain');
    const end = events[events.length - 1];
    assert.equal(end.type === 'end' && end.totals.generations, 5, `seed ${seed}: END counts 5 generations`);
    let gen = 0;
    let pages = new Map<string, Buffer | null | 'discarded'>();
    const live = new Set<number>();
    let nextBlock = 0;
    for (const ev of events) {
      if (ev.type === 'generation') {
        gen = ev.generation.generation;
        assert.is(ev.generation.instant, c.gens[gen - 1].instant);
        ev.generation.removed.forEach((b) => live.delete(b));
        pages = new Map([...pages].filter(([k]) => live.has(Number(k.split(':')[0]))));
      } else if (ev.type === 'blocks') {
        ev.blocks.forEach((b) => { assert.equal(b, c.blocks[nextBlock]); live.add(nextBlock++); });
      } else if (ev.type === 'pages') {
        let d = 0;
        ev.batch.index.forEach((p, i) => pages.set(`${ev.batch.block}:${p}`, ev.batch.zero[i] ? null : Buffer.from(ev.batch.data.subarray(d * 4096, ++d * 4096))));
      } else if (ev.type === 'discard') {
        ev.batch.index.forEach((p) => pages.set(`${ev.batch.block}:${p}`, 'discarded'));
      } else if (ev.type === 'generation-end') {
        assert.is(ev.totals.generation, gen);
        assert.equal([...live].sort((a, b) => a - b), c.gens[gen - 1].live, `seed ${seed} generation ${gen}: live blocks`);
        assert.equal(pages, c.gens[gen - 1].pages, `seed ${seed} generation ${gen}: pages`);
      }
    }
  }
});

// A chain built frame by frame, so a test can break one rule.
function chainFrames(edit: (enc: BgsnapEncoder, f: Buffer[]) => void): Buffer {
  const enc = new BgsnapEncoder({ chain: true });
  const f: Buffer[] = [enc.magic(), ...enc.header(makeHeader())];
  edit(enc, f);
  return Buffer.concat(f);
}

function gen1(enc: BgsnapEncoder, f: Buffer[], blocks = 2): void {
  f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }));
  f.push(...enc.blocks(Array.from({ length: blocks }, (_, i) => ({ name: `b${i}`, length: 4096 * 4, address: i << 20 }))));
  for (let b = 0; b < blocks; b++) f.push(...enc.pages({ block: b, index: Uint32Array.of(0, 1, 2, 3), zero: new Uint8Array(4).fill(1), data: Buffer.alloc(0) }));
  f.push(...enc.generationEnd());
}

const raw = (type: FrameType, p: Buffer) => frame(crc32, type, [p]);

test('refused: another version, named; chain frames in a version 1 stream', () => {
  const v3 = chainFrames(() => undefined);
  v3.writeUInt16LE(3, 6);
  expectError(v3, 'BAD_VERSION', /version 3 is not supported \(this build reads versions 1 and 2\)/);
  const v1 = generate(1).frames;
  const withGen = Buffer.concat([v1[0], v1[1], ...raw(FrameType.GENERATION, Buffer.alloc(16))]);
  expectError(withGen, 'UNKNOWN_FRAME', /unknown frame type 7/);
});

test('refused: frames outside a generation, a second BLOCKS, pages of a removed block', () => {
  const enc0 = new BgsnapEncoder();
  const loose = chainFrames((_e, f) => f.push(...raw(FrameType.BLOCKS, Buffer.concat(enc0.blocks([{ name: 'x', length: 4096, address: 0 }]).slice(1)))));
  expectError(loose, 'MALFORMED', /BLOCKS frame outside a generation/);
  const twice = chainFrames((enc, f) => {
    f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }), ...enc.blocks([]), ...enc.blocks([]));
  });
  expectError(twice, 'BLOCK_MISMATCH', /second BLOCKS frame in generation 1/);
  const dead = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...enc.generation({ generation: 2, instant: 2, removed: [1] }));
    f.push(...enc.pages({ block: 1, index: Uint32Array.of(0), zero: Uint8Array.of(1), data: Buffer.alloc(0) }));
  });
  expectError(dead, 'BLOCK_MISMATCH', /block 1, removed before generation 2/);
  const notLive = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...raw(FrameType.GENERATION, Buffer.from([2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0])));
  });
  expectError(notLive, 'BLOCK_MISMATCH', /generation 2 removes block 9, which is not live/);
});

test('refused: generations out of order, END inside a generation, end records that do not match', () => {
  const skip = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...raw(FrameType.GENERATION, Buffer.from([3, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])));
  });
  expectError(skip, 'MALFORMED', /generation 3 follows generation 1/);
  const endInside = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...enc.generation({ generation: 2, instant: 2, removed: [] }));
    const t = Buffer.alloc(48);
    t.writeBigUInt64LE(8n, 0); t.writeBigUInt64LE(8n, 8); t.writeBigUInt64LE(2n, 24); t.writeBigUInt64LE(1n, 40);
    f.push(...raw(FrameType.END, t));
  });
  expectError(endInside, 'MALFORMED', /END frame inside generation 2/);
  const lost = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...enc.generation({ generation: 2, instant: 2, removed: [] }));
    enc.pages({ block: 0, index: Uint32Array.of(1), zero: Uint8Array.of(1), data: Buffer.alloc(0) }); // counted, never sent
    f.push(...enc.generationEnd());
  });
  expectError(lost, 'TOTALS_MISMATCH', /GENERATION_END of generation 2 says pages=1, generation carried 0/);
  const short = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...enc.generation({ generation: 2, instant: 2, removed: [] }), ...raw(FrameType.GENERATION_END, Buffer.alloc(40)));
  });
  expectError(short, 'MALFORMED', /GENERATION_END frame has 40 bytes, expected 56/);
});

test('refused before allocating: a GENERATION claiming more removed blocks than it carries, a BLOCKS frame claiming more blocks', () => {
  const big = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...raw(FrameType.GENERATION, Buffer.from([2, 0, 0, 0, 0xff, 0xff, 0xff, 0x0f, 2, 0, 0, 0, 0, 0, 0, 0])));
  });
  expectError(big, 'MALFORMED', /268435455 removed blocks need 1073741836 bytes, frame has 16/);
  const blocks = chainFrames((enc, f) => {
    f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }), ...raw(FrameType.BLOCKS, Buffer.from([0, 0, 1, 0])));
  });
  expectError(blocks, 'MALFORMED', /claims 65536 blocks in 4 bytes/);
});

test('a chain cut inside a generation is TRUNCATED and names that generation; whole generations before it decoded', () => {
  const c = generateChain(7);
  const cut = c.stream.subarray(0, c.genStarts[3] + Math.floor((c.genStarts[4] - c.genStarts[3]) / 2));
  const dec = new BgsnapDecoder();
  const events = dec.push(cut);
  assert.is(events.filter((e) => e.type === 'generation-end').length, 3, 'generations 1-3 ended');
  try {
    dec.finish();
    assert.unreachable('must throw');
  } catch (e) {
    assert.is((e as StreamError).code, 'TRUNCATED');
    assert.match((e as Error).message, /in generation 4, before its GENERATION_END/);
  }
});

test('the encoder refuses misuse: pages outside a generation, generations out of order', () => {
  const enc = new BgsnapEncoder({ chain: true });
  enc.header(makeHeader());
  assert.throws(() => enc.pages({ block: 0, index: Uint32Array.of(0), zero: Uint8Array.of(1), data: Buffer.alloc(0) }), /outside a generation/);
  assert.throws(() => enc.generation({ generation: 2, instant: 0, removed: [] }), /consecutive from 1/);
  assert.throws(() => new BgsnapEncoder().generation({ generation: 1, instant: 0, removed: [] }), /chain: true/);
});

// Pre-copy passes (SPEC.md, "Pre-copy passes"): GENERATION_END's flags, bit 0.
function passChain(passes: boolean[], end = true): Buffer {
  return chainFrames((enc, f) => {
    passes.forEach((pass, i) => {
      if (i === 0) f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }), ...enc.blocks([{ name: 'b0', length: 4096 * 4, address: 0 }]));
      else f.push(...enc.generation({ generation: i + 1, instant: i + 1, removed: [] }));
      // The same page twice in one generation: a pass may repeat pages.
      f.push(...enc.pages({ block: 0, index: Uint32Array.of(0, 1, 2, 3, 1), zero: Uint8Array.of(1, 1, 1, 1, 1), data: Buffer.alloc(0) }));
      f.push(...enc.generationEnd({ pass }));
    });
    if (end) f.push(...enc.end());
  });
}

test('pass flag: round trip as bit 0 at +12; pass: true only on passes, absent otherwise', () => {
  assert.is(encodeGenerationEnd({ ...emptyGenerationTotals(1), pass: true }).readUInt32LE(12), 1);
  assert.is(encodeGenerationEnd(emptyGenerationTotals(1)).readUInt32LE(12), 0);
  const stream = passChain([true, true, true, false]);
  for (const cuts of [[], [7, 100, 101, 333]]) {
    const ends = decode(stream, cuts).flatMap((e) => (e.type === 'generation-end' ? [e.totals] : []));
    assert.equal(ends.map((t) => t.pass), [true, true, true, undefined]);
    assert.not.ok('pass' in ends[3], 'a snapshot generation has no pass field');
    assert.equal(ends.map((t) => t.pages), [5, 5, 5, 5], 'repeated pages are counted as records');
  }
});

test('pass flag: unknown bits refused by name; counts still checked on a pass; END right after a pass refused', () => {
  for (const flags of [2, 3, 0x80000000]) {
    const bad = chainFrames((enc, f) => {
      f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }), ...enc.blocks([]));
      const p = encodeGenerationEnd({ ...emptyGenerationTotals(1) });
      p.writeUInt32LE(flags, 12);
      f.push(...raw(FrameType.GENERATION_END, p));
    });
    expectError(bad, 'MALFORMED', new RegExp(`GENERATION_END of generation 1 has flags 0x${flags.toString(16)}; this build knows only bit 0 \\(PASS\\)`));
  }
  const lost = chainFrames((enc, f) => {
    gen1(enc, f);
    f.push(...enc.generation({ generation: 2, instant: 2, removed: [] }));
    enc.pages({ block: 0, index: Uint32Array.of(1), zero: Uint8Array.of(1), data: Buffer.alloc(0) }); // counted, never sent
    f.push(...enc.generationEnd({ pass: true }));
  });
  expectError(lost, 'TOTALS_MISMATCH', /GENERATION_END of generation 2 says pages=1, generation carried 0/);
  const endAfterPass = Buffer.concat([passChain([true, true], false), ...raw(FrameType.END, chainEndPayload(10, 2))]);
  expectError(endAfterPass, 'MALFORMED', /END frame right after generation 2, a pre-copy pass; a pass must be followed by a generation/);
  const enc = new BgsnapEncoder({ chain: true });
  enc.header(makeHeader());
  enc.generation({ generation: 1, instant: 1, removed: [] });
  enc.generationEnd({ pass: true });
  assert.throws(() => enc.end(), /end\(\) right after generation 1, a pre-copy pass/);
});

// A chain END payload: pages (all zero records), one batch per generation, then the generation count.
function chainEndPayload(pages: number, generations: number): Buffer {
  const t = Buffer.alloc(48);
  t.writeBigUInt64LE(BigInt(pages), 0); t.writeBigUInt64LE(BigInt(pages), 8); t.writeBigUInt64LE(BigInt(generations), 24); t.writeBigUInt64LE(BigInt(generations), 40);
  return t;
}

test.run();
