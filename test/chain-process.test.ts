// Chains of a real process: five REAL snapshots (`bgsnap-capture --pid`) of a
// target that writes a known set of pages between them (test/targets/chain.c),
// re-encoded as a 5-generation chain by a helper that stands in for the
// engine until it emits generations itself (test/helpers/chain-from-snapshots.ts),
// then through the real CLIs: received into one image (pipe and --listen TCP),
// each generation converted to a core that the real gdb opens and whose memory
// equals the full snapshot it came from, generation 3 after 4 and 5 exist,
// storage per generation, and a stream cut in generation 4.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { startForked, type ForkedTarget } from './helpers/forked-target';
import { chainFromSnapshots, readSnapshot, type ChainBuild } from './helpers/chain-from-snapshots';
import { relay, startReceiver, tmpDir, writeToken } from './helpers/net';
import { buildTarget } from './process-target';
import { ImageReader } from '../receiver/image-reader';

const dir = tmpDir('chain-proc');
const snap = (k: number) => path.join(dir, `snap${k}.bgsnap`);
const full = (k: number) => path.join(dir, `full${k}.img`);
const chainImg = path.join(dir, 'chain.img');
let target: ForkedTarget;
let region = 0;
let chain: ChainBuild;
// Region pages each step rewrote (test/targets/chain.c), and other mappings' data pages it added.
const WRITTEN = [256, 64, 32, 16, 8];
const NEW_DATA = [32, 0, 16, 32, 0];

test.before(async () => {
  target = await startForked('chain', ['x']);
  region = parseInt(/region=0x([0-9a-f]+)/.exec(target.ready)![1], 16);
});

test.after(() => {
  target.kill();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function inspectJson(img: string, extra: string[] = []) {
  const r = await run(BIN.inspect, [img, '--json', ...extra]);
  assert.is(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

test('five real snapshots between steps, re-encoded as one chain, received into one image', async () => {
  for (let k = 1; k <= 5; k++) {
    if (k > 1) assert.match(await target.ask(`step ${k}`), new RegExp(`^stepped ${k} `));
    const r = await run(BIN.capture, ['--pid', String(target.pid), '-o', snap(k)], 120_000);
    assert.is(r.code, 0, r.stderr);
  }
  chain = chainFromSnapshots([1, 2, 3, 4, 5].map((k) => readSnapshot(snap(k))));
  fs.writeFileSync(path.join(dir, 'chain.bgsnap'), chain.stream);
  const r = await sh(`${BIN.receive} -o ${chainImg} < ${path.join(dir, 'chain.bgsnap')}`);
  assert.is(r.code, 0, r.stderr);
  const d = await inspectJson(chainImg);
  assert.is(d.status, 'complete');
  assert.equal(d.generations.map((g: { status: string }) => g.status), Array(5).fill('complete'));
  assert.equal(d.generations.map((g: { instantMs: number }) => g.instantMs), [1, 2, 3, 4, 5].map((k) => readSnapshot(snap(k)).header.created));
  assert.is(d.generation, 5, 'blocks shown: the latest complete generation');
});

// Every block of the full snapshot, page by page, in generation k of the chain.
async function sameMemory(k: number): Promise<void> {
  const r = await sh(`${BIN.receive} -o ${full(k)} < ${snap(k)}`);
  assert.is(r.code, 0, r.stderr);
  const a = await ImageReader.open(full(k));
  const b = await ImageReader.open(chainImg, { generation: k });
  try {
    assert.equal(b.blocks.map((x) => x.name).sort(), a.blocks.map((x) => x.name).sort(), `generation ${k}: same mappings`);
    for (let i = 0; i < a.blocks.length; i++) {
      const j = b.blocks.findIndex((x) => x.name === a.blocks[i].name);
      const [ma, mb] = [await a.pages(i), await b.pages(j)];
      for (const bits of ['present', 'data', 'discarded'] as const) assert.ok(Buffer.from(ma[bits].bits).equals(Buffer.from(mb[bits].bits)), `generation ${k} ${a.blocks[i].name}: ${bits}`);
      const [ba, bb] = [Buffer.alloc(a.blocks[i].length), Buffer.alloc(a.blocks[i].length)];
      assert.ok(a.readPages(i, 0, ma.pages, ba).equals(b.readPages(j, 0, mb.pages, bb)), `generation ${k} ${a.blocks[i].name}: bytes`);
    }
  } finally {
    await a.close();
    await b.close();
  }
}

async function gdb(core: string, exprs: string[]) {
  const r = await run('gdb', ['-batch', '-nx', ...exprs.flatMap((e) => ['-ex', e]), buildTarget('chain'), core], 120_000);
  assert.is(r.code, 0, r.stderr);
  return r.stdout;
}

// A core of generation k, opened in gdb: two threads, generation == k, and
// region page 0 as the last step that wrote it left it.
async function checkCore(k: number, core: string): Promise<void> {
  const out = await gdb(core, ['info threads', 'print (long)generation', `x/2gd ${region}`]);
  assert.is(out.split('\n').filter((l) => /^\*?\s+\d+\s+(Thread 0x|LWP )/.test(l)).length, 2, `generation ${k}: two threads\n${out}`);
  assert.match(out, new RegExp(`\\$1 = ${k}\\n`), `generation ${k}: the global\n${out}`);
  const page0 = [1, 2, 2, 2, 5][k - 1];
  assert.match(out, new RegExp(`:\\s+${page0 * 1000000}\\s+${page0 * 1000000 + 1}`), `generation ${k}: region page 0\n${out}`);
}

test('each generation equals its full snapshot, converts to a core gdb opens, and to the same core as the snapshot', async () => {
  for (let k = 1; k <= 5; k++) {
    await sameMemory(k);
    const [cc, fc] = [path.join(dir, `chain${k}.core`), path.join(dir, `full${k}.core`)];
    const r = await run(BIN.convert, [chainImg, '--generation', String(k), '--to', 'elf-core', '-o', cc]);
    assert.is(r.code, 0, r.stderr);
    assert.is((await run(BIN.convert, [full(k), '--to', 'elf-core', '-o', fc])).code, 0);
    assert.ok(fs.readFileSync(cc).equals(fs.readFileSync(fc)), `generation ${k}: the core equals the full snapshot's, byte for byte`);
    await checkCore(k, cc);
  }
});

test('generation 3 converted after 4 and 5 exist; the default is the latest; raw output too', async () => {
  const core = path.join(dir, 'g3.core');
  assert.is((await run(BIN.convert, [chainImg, '--generation', '3', '--to', 'elf-core', '-o', core])).code, 0);
  await checkCore(3, core);
  const raw3 = path.join(dir, 'g3.raw');
  assert.is((await run(BIN.convert, [chainImg, '--generation', '3', '--to', 'raw', '-o', raw3])).code, 0);
  const map = JSON.parse(fs.readFileSync(`${raw3}.map.json`, 'utf8')) as { address: number; offset: number }[];
  const at = map.find((m) => m.address <= region && region < m.address + 4096 * 256)!;
  const bytes = fs.readFileSync(raw3).subarray(at.offset + (region - at.address));
  assert.is(Number(bytes.readBigUInt64LE(4096)), 3 * 1000000 + 1000, 'region page 1 as step 3 wrote it');
  const latest = path.join(dir, 'latest.core');
  assert.is((await run(BIN.convert, [chainImg, '--to', 'elf-core', '-o', latest])).code, 0);
  await checkCore(5, latest);
  const none = await run(BIN.convert, [chainImg, '--generation', '9', '--to', 'raw', '-o', path.join(dir, 'g9.raw')]);
  assert.is(none.code, 1);
  assert.match(none.stderr, /has no generation 9 \(generations: 1 \(complete\), 2 \(complete\)/);
});

test('storage per generation: the pages written in its interval (and new mappings), far below a full snapshot', async () => {
  const d = await inspectJson(chainImg);
  for (let k = 1; k <= 5; k++) {
    const g = d.generations[k - 1];
    const fullData = (await inspectJson(full(k))).blocks.reduce((s: number, b: { dataPages: number }) => s + b.dataPages, 0);
    const want = WRITTEN[k - 1] + NEW_DATA[k - 1];
    console.log(`  generation ${k}: ${g.dataPages} data pages stored (${want} written by the step), ${g.diskBytes} bytes on disk; full snapshot ${fullData} data pages`);
    assert.is(g.pages, chain.perGeneration[k - 1].pages, 'exactly the pages the generation carried');
    assert.is(g.dataPages, chain.perGeneration[k - 1].dataPages);
    if (k === 1) assert.is(g.dataPages, fullData, 'generation 1 is the full snapshot');
    else assert.ok(g.dataPages >= want && g.dataPages <= want + 12, `generation ${k}: ${g.dataPages} data pages for ${want} written`);
    assert.ok(g.diskBytes <= g.dataBytes + 64 * 1024, `generation ${k}: ${g.diskBytes} bytes on disk for ${g.dataBytes} of data`);
    if (k > 1) assert.ok(g.dataPages * 4 < fullData, `generation ${k} is a fraction of the full snapshot`);
  }
  assert.is(d.generations[4].zeroPages >= 64, true, 'the 64 dropped pages are zero records (holes) in generation 5');
  assert.is(d.generations[3].blocksRemoved, 2, 'generation 4: extra unmapped, movable moved');
  assert.is(d.generations[3].blocksAdded, 1, 'generation 4: movable at its new address');
});

test('a stream cut in generation 4: 1-3 complete and convertible, inspect says 4 is incomplete and why', async () => {
  const cutAt = chain.genStarts[3] + Math.floor((chain.genStarts[4] - chain.genStarts[3]) / 2);
  fs.writeFileSync(path.join(dir, 'cut.bgsnap'), chain.stream.subarray(0, cutAt));
  const img = path.join(dir, 'cut.img');
  const r = await sh(`${BIN.receive} -o ${img} < ${path.join(dir, 'cut.bgsnap')}`);
  assert.is(r.code, 2, r.stderr);
  assert.match(r.stderr, /INCOMPLETE: generation 4 is incomplete/);
  const d = await inspectJson(img);
  assert.is(d.status, 'incomplete');
  assert.equal(d.generations.map((g: { status: string }) => g.status), ['complete', 'complete', 'complete', 'incomplete']);
  assert.match(d.generations[3].reason, /input ended before .*\(in generation 4, before its GENERATION_END\)/);
  const text = await run(BIN.inspect, [img]);
  assert.match(text.stdout, /gen 4 .* incomplete .*\(bgsnap stream: input ended/);
  const core = path.join(dir, 'cut.core');
  assert.is((await run(BIN.convert, [img, '--to', 'elf-core', '-o', core])).code, 0, 'default: generation 3');
  await checkCore(3, core);
  const four = await run(BIN.convert, [img, '--generation', '4', '--to', 'elf-core', '-o', path.join(dir, 'cut4.core')]);
  assert.is(four.code, 1);
  assert.match(four.stderr, /generation 4 of image .* is incomplete \(bgsnap stream: input ended/);
  const v = await run(BIN.inspect, [img, '--verify']);
  assert.match(v.stdout, /verify\s+OK/, 'what generations 1-3 stored verifies');
});

test('a chain over --listen TCP: the relay sends it, the receiver stores all five generations', async () => {
  const root = path.join(dir, 'srv');
  fs.mkdirSync(root, { mode: 0o700 });
  const token = writeToken(dir);
  const rx = await startReceiver(root, ['--insecure', '--token-file', token]);
  try {
    // A stream cut in generation 4 first: the receiver keeps 1-3, marks 4 incomplete.
    const cut = await relay(chain.stream.subarray(0, chain.genStarts[3] + 1000), rx.url, ['--insecure', '--token-file', token, '--name', 'chain1']);
    assert.is(cut.code, 2, cut.stderr);
    const broken = await inspectJson(path.join(root, 'chain1'));
    assert.equal(broken.generations.map((g: { status: string }) => g.status), ['complete', 'complete', 'complete', 'incomplete']);
    assert.match(broken.generations[3].reason, /generation 4/);
    // Then the whole chain under the same name replaces the incomplete image.
    const r = await relay(chain.stream, rx.url, ['--insecure', '--token-file', token, '--name', 'chain1']);
    assert.is(r.code, 0, `${r.stderr}\n${rx.stderr()}`);
    const d = await inspectJson(path.join(root, 'chain1'));
    assert.is(d.status, 'complete');
    assert.is(d.generations.length, 5);
    const core = path.join(dir, 'tcp4.core');
    assert.is((await run(BIN.convert, [path.join(root, 'chain1'), '--generation', '4', '--to', 'elf-core', '-o', core])).code, 0);
    assert.ok(fs.readFileSync(core).equals(fs.readFileSync(path.join(dir, 'full4.core'))), 'generation 4 over TCP: the same core');
  } finally {
    await rx.kill();
  }
});

test.run();
