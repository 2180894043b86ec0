// A chain stream (synthetic, from the real encoder: test/helpers/chain-gen.ts)
// received into one image by the real receiver and read back generation by
// generation: every generation materialises to exactly its expected pages and
// state whatever came after it, each stores only its own pages, and a stream
// cut or damaged in generation 4 loses only generation 4. Chains of real
// process captures, through the CLIs and gdb: chain-process.test.ts.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ImageWriter } from '../receiver/image';
import { ImageReader } from '../receiver/image-reader';
import { receive } from '../receiver/receive';
import { generateChain, type GeneratedChain } from './helpers/chain-gen';
import { BgsnapEncoder } from '../format/bgsnap';
import { makeHeader, pageBytes } from './helpers/streams';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-chain-img-'));
test.after(() => fs.rmSync(root, { recursive: true, force: true }));
let n = 0;

async function store(bytes: Buffer) {
  const dir = path.join(root, `img${n++}`);
  const summary = await receive(Readable.from([bytes]), await ImageWriter.create(dir));
  return { dir, summary };
}

// Generation K read through ImageReader equals what the generator says.
async function checkGeneration(dir: string, c: GeneratedChain, k: number): Promise<ImageReader> {
  const img = await ImageReader.open(dir, { generation: k });
  const want = c.gens[k - 1];
  assert.is(img.chain?.generation, k);
  assert.is(img.header.created, want.instant, 'header.created is the generation instant');
  assert.equal(img.blocks.map((b) => b.name), want.live.map((b) => c.blocks[b].name), `generation ${k}: live blocks`);
  const buf = Buffer.alloc(64 * 4096);
  for (let v = 0; v < img.blocks.length; v++) {
    const id = want.live[v];
    const m = await img.pages(v);
    const bytes = img.readPages(v, 0, m.pages, buf);
    for (let p = 0; p < m.pages; p++) {
      const exp = want.pages.get(`${id}:${p}`);
      const where = `generation ${k} block ${id} page ${p}`;
      if (exp === 'discarded') assert.ok(!m.present.get(p) && m.discarded.get(p), `${where}: discarded`);
      else if (exp === null) assert.ok(m.present.get(p) && !m.data.get(p) && !m.discarded.get(p), `${where}: zero`);
      else {
        assert.ok(m.present.get(p) && m.data.get(p) && !m.discarded.get(p), `${where}: data`);
        assert.ok(bytes.subarray(p * 4096, (p + 1) * 4096).equals(exp!), `${where}: bytes`);
      }
    }
  }
  assert.equal(await img.state('test.state'), want.state, `generation ${k}: its own state`);
  return img;
}

test('each generation of a 5-generation chain materialises to its own pages, blocks and state', async () => {
  for (const seed of [3, 11, 29]) {
    const c = generateChain(seed);
    const { dir, summary } = await store(c.stream);
    assert.is(summary.status, 'complete', summary.reason);
    assert.is(summary.generations, 5);
    for (let k = 5; k >= 1; k--) await (await checkGeneration(dir, c, k)).close();
    const img = await ImageReader.open(dir);
    assert.is(img.chain?.generation, 5, 'default: the latest complete generation');
    await img.close();
  }
});

test('storage per generation: its own data pages in its own sparse file, nothing inherited', async () => {
  const c = generateChain(5);
  const { dir } = await store(c.stream);
  const img = await ImageReader.open(dir);
  try {
    for (const r of img.generations) {
      const want = c.gens[r.generation - 1].dataPages;
      assert.is(r.dataPages, want, `generation ${r.generation}: data pages stored`);
      assert.is(r.dataBytes, want * 4096);
      assert.ok(r.diskBytes >= want * 4096 && r.diskBytes <= want * 4096 + 64 * 1024, `generation ${r.generation}: ${r.diskBytes} bytes on disk for ${want} pages`);
      assert.is(fs.statSync(path.join(dir, r.file)).blocks * 512, r.diskBytes);
    }
    const v = await img.verify();
    assert.is(v.badCount, 0, v.bad.join('\n'));
    assert.is(v.dataPages, c.gens.reduce((s, g) => s + g.dataPages, 0), 'verify checked every generation\'s pages');
  } finally {
    await img.close();
  }
});

test('verify names the generation whose stored page changed on disk', async () => {
  const c = generateChain(17);
  const { dir } = await store(c.stream);
  const img = await ImageReader.open(dir, { generation: 2 });
  let at = -1;
  for (let v = 0; v < img.blocks.length && at < 0; v++) {
    const m = await img.pages(v);
    for (let p = 0; p < m.pages && at < 0; p++) if (c.gens[1].pages.get(`${c.gens[1].live[v]}:${p}`) !== c.gens[0].pages.get(`${c.gens[1].live[v]}:${p}`) && m.data.get(p)) at = img.blocks[v].base + p * 4096;
  }
  await img.close();
  assert.ok(at >= 0, 'generation 2 stored a data page');
  const fd = fs.openSync(path.join(dir, 'data.2'), 'r+');
  fs.writeSync(fd, Buffer.from([0xff]), 0, 1, at + 100);
  fs.closeSync(fd);
  const again = await ImageReader.open(dir);
  try {
    const v = await again.verify();
    assert.is(v.badCount, 1);
    assert.match(v.bad[0], /^generation 2 blk\d+:\d+: crc32 differs/);
  } finally {
    await again.close();
  }
});

test('a block added in a later generation past the image size limit fails that generation, before it is allocated', async () => {
  const c = generateChain(21);
  const dir = path.join(root, `img${n++}`);
  // Generation 1's layout fits in 2 MiB per block; allow exactly that, so the first later block does not fit.
  const limit = c.gens[0].live.length * 2 * 1024 * 1024;
  const summary = await receive(Readable.from([c.stream]), await ImageWriter.create(dir, { maxImageBytes: limit }));
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /generation \d is incomplete: the chain's blocks need a \d+-byte layout, over the limit of \d+ bytes/);
  for (const f of fs.readdirSync(dir).filter((e) => e.startsWith('data'))) assert.ok(fs.statSync(path.join(dir, f)).size <= limit, `${f} within the limit`);
  await (await checkGeneration(dir, c, 1)).close();
});

test('a stream cut in generation 4: 1-3 complete and readable, 4 incomplete with the reason', async () => {
  const c = generateChain(7);
  const cut = c.stream.subarray(0, c.genStarts[3] + Math.floor((c.genStarts[4] - c.genStarts[3]) / 2));
  const { dir, summary } = await store(cut);
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /generation 4 is incomplete: .*input ended before .*\(in generation 4, before its GENERATION_END\)/, summary.reason);
  for (let k = 1; k <= 3; k++) {
    const img = await checkGeneration(dir, c, k);
    assert.is(img.status.status, 'complete');
    await img.close();
  }
  const img = await ImageReader.open(dir);
  try {
    assert.is(img.chain?.generation, 3, 'default: generation 3, the latest complete');
    assert.equal(img.generations.map((r) => r.status), ['complete', 'complete', 'complete', 'incomplete']);
    assert.match(img.generations[3].reason, /TRUNCATED|input ended before/);
    assert.is(img.chainStatus?.status, 'incomplete');
    assert.is((await img.verify()).badCount, 0, 'what is stored verifies');
  } finally {
    await img.close();
  }
});

test('a damaged frame in generation 4: nothing of it written, 1-3 intact', async () => {
  const c = generateChain(9);
  const bad = Buffer.from(c.stream);
  const at = c.genStarts[3] + Math.floor((c.genStarts[4] - c.genStarts[3]) * 0.6);
  bad[at] ^= 0x40;
  const { dir, summary } = await store(bad);
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /generation 4 is incomplete: .*(checksum|MALFORMED|frame)/i);
  for (let k = 1; k <= 3; k++) await (await checkGeneration(dir, c, k)).close();
  const img = await ImageReader.open(dir, { generation: 4 });
  assert.is(img.status.status, 'incomplete');
  await img.close();
});

test('a chain ended between generations without END: every generation complete, the chain not', async () => {
  const c = generateChain(13);
  const { dir, summary } = await store(c.stream.subarray(0, c.genStarts[3]));
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /ended before the END frame was complete \(after generation 3\)/);
  const img = await checkGeneration(dir, c, 3);
  assert.equal(img.generations.map((r) => r.status), ['complete', 'complete', 'complete']);
  await img.close();
});

// Pre-copy passes (SPEC.md, "Pre-copy passes") and pages repeated in one
// generation: within a generation the last record of a page wins, whether it
// repeats in another frame or in the same one, and data then zero leaves a hole.
test('pages repeated within a generation (a snapshot and a pass): last wins, stored once, CRCs verify; gen records say pass', async () => {
  const P = (v: number) => pageBytes(v, 4096);
  const enc = new BgsnapEncoder({ chain: true });
  const f: Buffer[] = [enc.magic(), ...enc.header(makeHeader())];
  const pages = (index: number[], vals: (number | 0)[]) =>
    f.push(...enc.pages({ block: 0, index: Uint32Array.from(index), zero: Uint8Array.from(vals, (v) => (v ? 0 : 1)), data: Buffer.concat(vals.filter((v) => v).map(P)) }));
  f.push(...enc.generation({ generation: 1, instant: 1, removed: [] }), ...enc.blocks([{ name: 'b', length: 8 * 4096, address: 0 }]));
  pages([0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 0, 14, 15, 16, 17]);
  pages([2, 3, 4, 5, 5], [22, 23, 0, 25, 35]); // data->data, zero->data, data->zero, the same page twice in one frame
  f.push(...enc.generationEnd());
  f.push(...enc.generation({ generation: 2, instant: 2, removed: [] }));
  pages([0, 1], [40, 41]);
  pages([0, 1, 0], [50, 0, 60]);
  f.push(...enc.generationEnd({ pass: true }));
  f.push(...enc.generation({ generation: 3, instant: 3, removed: [] }));
  pages([6], [76]);
  f.push(...enc.generationEnd(), ...enc.end());
  const { dir, summary } = await store(Buffer.concat(f));
  assert.is(summary.status, 'complete', summary.reason);
  assert.equal([summary.duplicatePages, summary.passes], [8, 1], "5 repeats in generation 1, 3 in the pass");
  const want: Record<number, (number | 0)[]> = { 1: [10, 11, 22, 23, 0, 35, 16, 17], 3: [60, 0, 22, 23, 0, 35, 76, 17] };
  for (const k of [1, 3]) {
    const img = await ImageReader.open(dir, { generation: k });
    const m = await img.pages(0);
    const bytes = img.readPages(0, 0, 8, Buffer.alloc(8 * 4096));
    want[k].forEach((v, p) => {
      assert.is(m.data.get(p), v !== 0, `generation ${k} page ${p}: data or zero`);
      assert.ok(bytes.subarray(p * 4096, (p + 1) * 4096).equals(v ? P(v) : Buffer.alloc(4096)), `generation ${k} page ${p}: bytes`);
    });
    assert.equal(img.generations.map((r) => [r.pages, r.dataPages, r.pass]), [[8, 7, undefined], [2, 1, true], [1, 1, undefined]]);
    const v = await img.verify();
    assert.equal([v.badCount, v.dataPages, v.zeroPages], [0, 9, 2], v.bad.join('\n'));
    await img.close();
  }
  const refused = await ImageReader.open(dir, { generation: 2 }).then(async (i) => (await i.close(), 'opened'), (e: Error) => e.message);
  assert.match(refused, /generation 2 is a pre-copy pass, not a snapshot; the snapshot is generation 3/);
  const img = await ImageReader.open(dir);
  assert.is(img.chain?.generation, 3, 'default: the snapshot');
  await img.close();
  // data.2 at page 1: data then zero in the pass, so a hole, not the first bytes.
  const fd = fs.openSync(path.join(dir, 'data.2'), 'r');
  const b = Buffer.alloc(4096);
  fs.readSync(fd, b, 0, 4096, 4096);
  fs.closeSync(fd);
  assert.ok(b.every((x) => x === 0), 'the pass stored page 1 as zero');
});

test.run();
