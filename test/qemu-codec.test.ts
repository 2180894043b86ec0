// Round trips through the QEMU 7.2 encoder and decoder on generated streams, split
// invariance, and one test per malformed-input class. Streams are generated with a
// seeded PRNG so a failure names a reproducible seed.

import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { StreamError } from '../format/errors.js';
import type { StreamEvent } from '../format/events.js';
import { QemuDecoder, isQemuStream } from '../format/qemu.js';
import { RamPartWriter, encodePreamble, encodeRamStart } from '../format/qemu-encode.js';
import { canon, decodeChunks, decoder, flatten, genStream, int, randomPage, splitAt, writeParts } from './helpers/qemu-gen.js';
import { prng } from './helpers/prng.js';

function expectError(bytes: Buffer, code: string, match?: RegExp): StreamError {
  const d = decoder();
  try {
    d.push(bytes);
    d.finish();
  } catch (e) {
    assert.instance(e, StreamError);
    const err = e as StreamError;
    assert.is(err.code, code, err.message);
    if (match) assert.match(err.message, match);
    return err;
  }
  assert.unreachable(`expected ${code}, stream decoded`);
  throw new Error('unreachable');
}

const ram = { sectionId: 2, instanceId: 0, version: 4 };
const blocks = [{ name: 'pc.ram', length: 8 * 4096 }, { name: 'pc.bios', length: 2 * 4096 }];
const tailBytes = Buffer.from([0x00]);

// preamble + START + one PART whose body is `records` (raw bytes) + tail.
function withRecords(records: Buffer, tail = tailBytes): Buffer {
  const part = Buffer.from([0x02, 0, 0, 0, 2]);
  const eos = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2]);
  return Buffer.concat([encodePreamble('pc-i440fx-7.2'), encodeRamStart(blocks, ram), part, records, eos, tail]);
}

function zeroRec(offset: number, name: string): Buffer {
  return Buffer.concat([word(offset, 0x02, name), Buffer.from([0])]);
}

function word(offset: number, flags: number, name?: string): Buffer {
  const w = Buffer.alloc(8);
  w.writeUInt32BE(Math.floor(offset / 2 ** 32), 0);
  w.writeUInt32BE((offset % 2 ** 32) + flags, 4);
  if (name === undefined) return w;
  return Buffer.concat([w, Buffer.from([name.length]), Buffer.from(name, 'latin1')]);
}

test('isQemuStream checks the magic', () => {
  assert.ok(isQemuStream(encodePreamble('pc')));
  assert.not.ok(isQemuStream(Buffer.from('QEV')));
  assert.not.ok(isQemuStream(Buffer.from('BGSNAP00')));
});

test('round trip: events match the generated records (property, 60 seeds)', () => {
  for (let seed = 1; seed <= 60; seed++) {
    const g = genStream(seed);
    const ev = decodeChunks([g.bytes]);
    const msg = `seed ${seed}`;
    assert.equal(ev.map((e) => e.type), expectedTypes(ev), msg);
    const hdr = ev[0] as Extract<StreamEvent, { type: 'header' }>;
    assert.is(hdr.header.label, 'pc-i440fx-7.2', msg);
    assert.is(hdr.header.pageSize, 4096);
    const blocksEv = ev.find((e) => e.type === 'blocks') as Extract<StreamEvent, { type: 'blocks' }>;
    assert.equal(blocksEv.blocks, g.blocks.map((b) => ({ ...b, address: 0 })), msg);
    const got = flatten(ev);
    assert.is(got.length, g.records.length, msg);
    got.forEach((rec, i) => {
      const want = g.records[i];
      assert.equal([rec.block, rec.index, rec.zero], [want.block, want.index, want.zero], `${msg} record ${i}`);
      if (!want.zero) assert.ok(rec.data!.equals(want.data!), `${msg} data ${i}`);
    });
    checkStatesAndTotals(ev, g, msg);
  }
});

function expectedTypes(ev: StreamEvent[]): string[] {
  const pages = ev.filter((e) => e.type === 'pages').length;
  return ['header', 'state', 'state', 'blocks', ...Array(pages).fill('pages'), 'state', 'end'];
}

function checkStatesAndTotals(ev: StreamEvent[], g: ReturnType<typeof genStream>, msg: string): void {
  const states = ev.filter((e) => e.type === 'state').map((e) => (e as Extract<StreamEvent, { type: 'state' }>).state);
  assert.equal(states.map((s) => s.kind), ['qemu.preamble', 'qemu.ram-section', 'qemu.devices'], msg);
  assert.ok(states[0].data.equals(g.preamble), msg);
  const rs = JSON.parse(states[1].data.toString()) as { sectionId: number; instanceId: number; version: number };
  assert.is(rs.instanceId, 0);
  assert.is(rs.version, 4);
  assert.ok(states[2].data.equals(g.tail), msg);
  const end = ev[ev.length - 1] as Extract<StreamEvent, { type: 'end' }>;
  const batches = ev.filter((e) => e.type === 'pages') as Extract<StreamEvent, { type: 'pages' }>[];
  assert.equal(end.totals, {
    pages: g.records.length, zeroPages: g.records.filter((r) => r.zero).length,
    discarded: 0, batches: batches.length, states: 3,
  }, msg);
  for (let i = 0; i < batches.length; i++) {
    const b = batches[i].batch;
    assert.ok(b.index.length > 0 && b.index.length <= 256, msg);
    assert.is(b.data.length, 4096 * b.zero.filter((z) => z === 0).length, msg);
    if (i > 0 && b.index.length < 256) assert.ok(true);
  }
}

test('re-encoding decoded events reproduces the same records and bytes', () => {
  for (let seed = 100; seed < 130; seed++) {
    const g = genStream(seed, { parts: 1 });
    const ev = decodeChunks([g.bytes]);
    const w = new RamPartWriter(g.blocks, JSON.parse(stateOf(ev, 'qemu.ram-section').toString()).sectionId);
    const out = [stateOf(ev, 'qemu.preamble'), g.bytes.subarray(g.ramStart, g.ramStart + encodeRamStart(g.blocks).length), w.begin()];
    for (const e of ev) if (e.type === 'pages') out.push(w.pages(e.batch.block, e.batch.index, e.batch.data, e.batch.zero));
    out.push(w.end(), stateOf(ev, 'qemu.devices'));
    assert.ok(Buffer.concat(out).equals(g.bytes), `seed ${seed}: re-encoded stream differs`);
  }
});

function stateOf(ev: StreamEvent[], kind: string): Buffer {
  for (const e of ev) if (e.type === 'state' && e.state.kind === kind) return e.state.data;
  throw new Error(`no state ${kind}`);
}

test('random chunk splits give identical events (property)', () => {
  for (let seed = 200; seed < 240; seed++) {
    const g = genStream(seed);
    const want = canon(decodeChunks([g.bytes]));
    const r = prng(seed);
    for (let k = 0; k < 4; k++) {
      const cuts = Array.from({ length: 1 + int(r, 30) }, () => int(r, g.bytes.length + 1));
      assert.equal(canon(decodeChunks(splitAt(g.bytes, cuts))), want, `seed ${seed} cuts ${cuts}`);
    }
  }
});

test('every single split point, and 1-byte chunks, give identical events', () => {
  const g = genStream(7, { records: 6, parts: 3, maxPages: 4 });
  const want = canon(decodeChunks([g.bytes]));
  for (let c = 0; c <= g.bytes.length; c++) {
    const got = canon(decodeChunks(splitAt(g.bytes, [c])));
    if (got.join('\n') !== want.join('\n')) assert.equal(got, want, `split at ${c}`);
  }
  const ones = Array.from({ length: g.bytes.length }, (_, i) => g.bytes.subarray(i, i + 1));
  assert.equal(canon(decodeChunks(ones)), want);
});

test('batches: one block per batch, at most 256 pages, CONTINUE carried across PART sections', () => {
  const bl = [{ name: 'pc.ram', length: 600 * 4096 }, { name: 'pc.bios', length: 4096 }];
  const recs = Array.from({ length: 600 }, (_, i) => ({ block: 0, index: i, zero: i % 3 === 0, data: i % 3 ? randomPage(prng(i)) : undefined }));
  recs.splice(300, 0, { block: 1, index: 0, zero: true, data: undefined });
  const parts = writeParts(bl, 9, recs, 7);
  const named = parts.map((p) => p.includes(Buffer.from('\x06pc.ram', 'latin1'))).filter(Boolean).length;
  assert.is(named, 2, 'block name written only when the block changes, not per section');
  const ev = decodeChunks([encodePreamble('m'), encodeRamStart(bl, { ...ram, sectionId: 9 }), ...parts, tailBytes]);
  const sizes = ev.filter((e) => e.type === 'pages').map((e) => (e as Extract<StreamEvent, { type: 'pages' }>).batch.index.length);
  assert.equal(sizes, [256, 44, 1, 256, 44]);
  assert.is(flatten(ev).length, 601);
});

test('RAM in one FULL section, and PART followed by END, both decode', () => {
  const g = genStream(5, { records: 20, parts: 2 });
  const want = flatten(decodeChunks([g.bytes]));
  const s = Buffer.from(g.bytes);
  s[g.ramStart] = 0x04; // START -> FULL: QEMU 7.2 loads this too
  const lastPart = s.lastIndexOf(Buffer.from([0x02, 0, 0, 0, s[g.ramStart + 4]]), s.length - g.tail.length);
  assert.ok(lastPart > g.ramStart);
  s[lastPart] = 0x03; // the final PART becomes END, as in plain precopy
  assert.equal(flatten(decodeChunks([s])), want);
});

test('end is reported for EOF without VMDESCRIPTION, and for an empty device list', () => {
  const ev = decodeChunks([withRecords(zeroRec(0, 'pc.ram'))]);
  assert.is(ev[ev.length - 1].type, 'end');
});

test('bad magic, version 2, unknown version', () => {
  const good = withRecords(Buffer.alloc(0));
  const bad = Buffer.from(good);
  bad.write('QEVN', 0, 'latin1');
  expectError(bad, 'BAD_MAGIC', /magic/);
  const v2 = Buffer.from(good);
  v2.writeUInt32BE(2, 4);
  expectError(v2, 'BAD_VERSION', /obsolete/);
  v2.writeUInt32BE(4, 4);
  expectError(v2, 'BAD_VERSION', /version 4/);
  expectError(Buffer.concat([good.subarray(0, 8), Buffer.from([0x01])]), 'MALFORMED', /CONFIGURATION/);
});

test('unknown section type, COMMAND, non-ram START, stray PART', () => {
  const pre = Buffer.concat([encodePreamble('pc-i440fx-7.2'), encodeRamStart(blocks, ram)]);
  expectError(Buffer.concat([pre, Buffer.from([0x09, 0, 0, 0, 2])]), 'UNKNOWN_FRAME', /0x09/);
  expectError(Buffer.concat([pre, Buffer.from([0x7e, 0, 0, 0, 2])]), 'UNKNOWN_FRAME', /0x7e/);
  expectError(Buffer.concat([pre, Buffer.from([0x08, 0, 1, 0, 0])]), 'UNSUPPORTED', /OPEN_RETURN_PATH.*postcopy/);
  const start = encodeRamStart(blocks, ram);
  const blockStart = Buffer.from([0x01, 0, 0, 0, 3, 5, ...Buffer.from('block'), 0, 0, 0, 0, 0, 0, 0, 1]);
  expectError(Buffer.concat([pre, blockStart]), 'UNSUPPORTED', /'block'/);
  expectError(Buffer.concat([encodePreamble('m'), blockStart]), 'UNSUPPORTED', /iterable/);
  expectError(Buffer.concat([pre, Buffer.from([0x02, 0, 0, 0, 7])]), 'MALFORMED', /unknown section id 7/);
  expectError(Buffer.concat([pre, start]), 'MALFORMED', /second ram/);
  const v5 = Buffer.from(start);
  v5.writeUInt32BE(5, 13);
  expectError(Buffer.concat([encodePreamble('m'), v5]), 'BAD_VERSION', /ram section version 5/);
  expectError(Buffer.concat([encodePreamble('m'), Buffer.from([0])]), 'MALFORMED', /before the ram block list/);
});

// QEMU 10 precopy (machine types >= 10.0) sends MIG_CMD_SWITCHOVER_START between
// the last ram PART and the ram END section; it carries no state.
test('QEMU 10: SWITCHOVER_START between ram sections is accepted at every split and dropped', () => {
  const page = randomPage(prng(7));
  const rec = (sec: number, flags: number, body: Buffer) => Buffer.concat([Buffer.from([sec, 0, 0, 0, 2]), word(0, flags, 'pc.ram'), body,
    Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2])]);
  const pre = Buffer.concat([encodePreamble('pc-i440fx-10.0'), encodeRamStart(blocks, ram)]);
  const cmd = Buffer.from([0x08, 0, 11, 0, 0]);
  const with11 = Buffer.concat([pre, rec(0x02, 0x02, Buffer.from([0])), cmd, rec(0x03, 0x08, page), tailBytes]);
  const without = Buffer.concat([pre, rec(0x02, 0x02, Buffer.from([0])), rec(0x03, 0x08, page), tailBytes]);
  const want = canon(decodeChunks([without]));
  for (let cut = 1; cut < with11.length; cut += cut < pre.length ? 7 : 1) {
    assert.equal(canon(decodeChunks(splitAt(with11, [cut]))), want, `split at ${cut}`);
  }
  const flat = flatten(decodeChunks([with11]));
  assert.ok(flat[1].data!.equals(page), 'the page after the command is the END section\'s page');
  expectError(Buffer.concat([pre, Buffer.from([0x08, 0, 11, 0, 1, 0])]), 'MALFORMED', /SWITCHOVER_START.*1 bytes/);
});

// QEMU 8.1 put MULTIFD_FLUSH (a bare be64 0x200) in the main channel with
// multifd off: after the block list, at each full round, and before the last EOS.
test('QEMU 8.1: MULTIFD_FLUSH records without multifd change nothing; with no data page at all they mean multifd', () => {
  const flush = word(0, 0x200);
  const page = randomPage(prng(8));
  const start = encodeRamStart(blocks, ram);
  const startWithFlush = Buffer.concat([start.subarray(0, start.length - 13), flush, start.subarray(start.length - 13)]);
  const body = (f: Buffer) => Buffer.concat([zeroRec(0, 'pc.ram'), f, word(4096, 0x08 | 0x20), page, f]);
  const part = (f: Buffer) => Buffer.concat([Buffer.from([0x02, 0, 0, 0, 2]), body(f), Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2])]);
  const with81 = Buffer.concat([encodePreamble('pc-i440fx-8.1'), startWithFlush, part(flush), tailBytes]);
  const without = Buffer.concat([encodePreamble('pc-i440fx-8.1'), start, part(Buffer.alloc(0)), tailBytes]);
  assert.equal(canon(decodeChunks(splitAt(with81, [start.length + 20, with81.length - 30]))), canon(decodeChunks([without])));
  const zerosOnly = Buffer.concat([encodePreamble('pc-i440fx-8.1'), startWithFlush, Buffer.from([0x02, 0, 0, 0, 2]), zeroRec(0, 'pc.ram'), flush,
    Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2]), tailBytes]);
  expectError(zerosOnly, 'UNSUPPORTED', /2 MULTIFD_FLUSH records and no data page.*turn multifd off/);
});

test('other COMMAND sections and configuration capabilities are refused with the setting to change', () => {
  const pre = Buffer.concat([encodePreamble('pc-i440fx-10.0'), encodeRamStart(blocks, ram)]);
  const cmd = (n: number) => Buffer.concat([pre, Buffer.from([0x08, 0, n, 0, 0])]);
  expectError(cmd(3), 'UNSUPPORTED', /POSTCOPY_ADVISE.*postcopy-ram=false/);
  expectError(cmd(8), 'UNSUPPORTED', /ENABLE_COLO.*x-colo/);
  expectError(cmd(10), 'UNSUPPORTED', /RECV_BITMAP.*postcopy/);
  expectError(cmd(42), 'UNSUPPORTED', /unknown COMMAND section 42/);
  const sub = (name: string, body: Buffer) => Buffer.concat([Buffer.from([0x05, name.length]), Buffer.from(name), Buffer.from([0, 0, 0, 1]), body]);
  const withSub = (s: Buffer) => {
    const p = encodePreamble('pc-q35-10.0');
    return Buffer.concat([p, s, encodeRamStart(blocks, ram), Buffer.from([0x02, 0, 0, 0, 2]), zeroRec(0, 'pc.ram'),
      Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10, 0x7e, 0, 0, 0, 2]), tailBytes]);
  };
  const caps = Buffer.concat([Buffer.from([0, 0, 0, 2, 10]), Buffer.from('mapped-ram'), Buffer.from([15]), Buffer.from('x-ignore-shared')]);
  expectError(withSub(sub('configuration/capabilities', caps)), 'UNSUPPORTED', /'mapped-ram', 'x-ignore-shared'.*mapped-ram=false/);
  const uuid = decodeChunks(splitAt(withSub(sub('configuration/uuid', Buffer.alloc(16, 0xab))), [20]));
  assert.is(flatten(uuid).length, 1, 'a validate-uuid stream decodes');
  const state = uuid.find((e) => e.type === 'state') as Extract<StreamEvent, { type: 'state' }>;
  assert.ok(state.state.data.includes(Buffer.alloc(16, 0xab)), 'the uuid stays in the kept preamble');
});

test('footer mismatch', () => {
  const s = withRecords(zeroRec(0, 'pc.ram'));
  s[s.length - 2] = 3; // last byte of the PART footer's id, before the 1-byte tail
  expectError(s, 'MALFORMED', /footer mismatch/);
  const t = withRecords(Buffer.alloc(0));
  t[t.length - 6] = 0x7d;
  expectError(t, 'MALFORMED', /footer mismatch/);
});

test('page past the end of its block, unknown block, CONTINUE without block', () => {
  expectError(withRecords(Buffer.concat([word(8 * 4096, 0x02, 'pc.ram'), Buffer.from([0])])), 'OUT_OF_BOUNDS', /past end of block 'pc.ram'/);
  expectError(withRecords(Buffer.concat([word(2 ** 40, 0x08, 'pc.bios'), Buffer.alloc(4096)])), 'OUT_OF_BOUNDS');
  expectError(withRecords(Buffer.concat([word(0, 0x02, 'vga.vram'), Buffer.from([0])])), 'BLOCK_MISMATCH', /vga.vram/);
  expectError(withRecords(Buffer.concat([word(0, 0x22), Buffer.from([0])])), 'MALFORMED', /CONTINUE/);
  expectError(withRecords(Buffer.concat([word(0, 0x02, ''), Buffer.from([0])])), 'MALFORMED', /length 0/);
  expectError(withRecords(Buffer.concat([word(0, 0x02, 'pc.ram'), Buffer.from([7])])), 'MALFORMED', /fill byte/);
});

test('unsupported record flags name the capability', () => {
  const cases: [number, RegExp][] = [[0x40, /xbzrle/], [0x100, /compress/], [0x208, /multifd/], [0x80, /rdma/], [0x60, /xbzrle/]];
  for (const [flag, re] of cases) expectError(withRecords(word(0, flag, 'pc.ram')), 'UNSUPPORTED', re);
  expectError(withRecords(word(0, 0x400)), 'UNSUPPORTED', /unknown RAM record flags 0x400/);
  expectError(withRecords(word(0, 0x0a, 'pc.ram')), 'MALFORMED', /combination/);
  expectError(withRecords(word(0, 0x20)), 'MALFORMED', /combination/);
});

test('MEM_SIZE: total must equal the sum, names non-empty, only one list', () => {
  const start = encodeRamStart(blocks, ram);
  const at = 1 + 4 + 4 + 4 + 4; // type, id, "ram", instance, version
  const more = Buffer.from(start);
  more.writeUInt32BE(more.readUInt32BE(at + 4) + 4096, at + 4);
  expectError(Buffer.concat([encodePreamble('m'), more]), 'MALFORMED', /length 0/); // reads EOS as an entry
  const less = Buffer.from(start);
  less.writeUInt32BE(less.readUInt32BE(at + 4) - 4096, at + 4);
  expectError(Buffer.concat([encodePreamble('m'), less]), 'MALFORMED', /not the sum/);
  const empty = Buffer.from(start);
  empty[at + 8] = 0;
  expectError(Buffer.concat([encodePreamble('m'), empty]), 'MALFORMED', /length 0/);
  expectError(withRecords(word(4096, 0x04)), 'MALFORMED', /second MEM_SIZE/);
});

test('truncation at every byte: finish() throws TRUNCATED naming the spot, never an end event', () => {
  const g = genStream(11, { records: 5, parts: 2, maxPages: 3 });
  const eofAt = g.bytes.length - g.tail.length + g.tail.indexOf(Buffer.from([0, 6]));
  const wants = new Set<string>();
  for (let cut = 0; cut < g.bytes.length; cut++) {
    const d = decoder();
    const ev = d.push(g.bytes.subarray(0, cut));
    assert.not.ok(ev.some((e) => e.type === 'end'));
    if (cut === eofAt + 1) {
      assert.is(d.finish().pop()!.type, 'end', 'EOF without VMDESCRIPTION is a complete stream');
      continue;
    }
    try {
      d.finish();
      assert.unreachable(`cut at ${cut} of ${g.bytes.length} decoded as complete`);
    } catch (e) {
      assert.instance(e, StreamError, String(e));
      assert.is((e as StreamError).code, 'TRUNCATED', `cut ${cut}: ${(e as Error).message}`);
      wants.add((e as Error).message.replace(/.*ended (inside|before) /, '').replace(/ \(at byte.*/, ''));
    }
  }
  for (const w of ['file header', 'CONFIGURATION section', 'START section header', 'MEM_SIZE block list entry',
    'a RAM record', 'PAGE data', 'a ZERO record', 'PART section header', 'a section header']) {
    assert.ok([...wants].some((x) => x.startsWith(w)), `no truncation reported as '${w}': ${[...wants]}`);
  }
});

test('chunks are not retained: overwriting pushed buffers does not change events', () => {
  const g = genStream(21, { records: 30 });
  const want = canon(decodeChunks([g.bytes]));
  const d = decoder();
  const ev: StreamEvent[] = [];
  const scratch = Buffer.alloc(1000);
  for (let i = 0; i < g.bytes.length; i += 1000) {
    const n = g.bytes.copy(scratch, 0, i, i + 1000);
    ev.push(...d.push(scratch.subarray(0, n)));
    scratch.fill(0xee);
  }
  ev.push(...d.finish());
  assert.equal(canon(ev), want);
});

// Speed is the benches' business (no timed assertion here): this checks a large
// stream in big chunks decodes every page, and prints the rate for the log.
test('decode of 128 MiB of page data in 256 KiB chunks: every page (prints MB/s)', () => {
  const bl = [{ name: 'pc.ram', length: 32768 * 4096 }];
  const w = new RamPartWriter(bl, 2);
  const idx = Uint32Array.from({ length: 32768 }, (_, i) => i);
  const data = Buffer.alloc(32768 * 4096, 0x5a);
  const stream = Buffer.concat([encodePreamble('m'), encodeRamStart(bl, ram), w.begin(), w.pages(0, idx, data), w.end(), tailBytes]);
  let best = 0;
  for (let round = 0; round < 3; round++) {
    const t0 = process.hrtime.bigint();
    const d = new QemuDecoder();
    let pages = 0;
    for (let i = 0; i < stream.length; i += 256 * 1024) {
      for (const e of d.push(stream.subarray(i, i + 256 * 1024))) if (e.type === 'pages') pages += e.batch.index.length;
    }
    d.finish();
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    assert.is(pages, 32768);
    best = Math.max(best, data.length / s / 1e6);
  }
  console.log(`    qemu decode: ${best.toFixed(0)} MB/s of page data (128 MiB, 256 KiB chunks)`);
});

test.run();
