// Pre-copy passes (format/SPEC.md, "Pre-copy passes") end to end through the
// real CLIs: a chain of 3 passes and a snapshot, built with the real encoder
// as a pre-copy capture produces it (test/helpers/pass-chain.ts: pages written
// while each pass reads, some sent twice in one pass), piped into
// bgsnap-receive, then read with bgsnap-inspect and bgsnap-convert. The
// snapshot reads back as exactly the memory at the freeze (its pages override
// the passes'), a pass is never read as a snapshot, and a stream cut inside the
// snapshot generation leaves an image that says it has no snapshot. A relay
// (bgsnap-receive --to, then --listen) keeps the passes' flag.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BIN, run, sh } from './helpers/cli';
import { relay, startReceiver, tmpDir, writeToken } from './helpers/net';
import { buildPassChain, RAM_PAGES, type PassChain } from './helpers/pass-chain';

const dir = tmpDir('chain-passes');
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
let c: PassChain;
const good = path.join(dir, 'good.img');

// The stream from a file on stdin, as `bgsnap-receive -o IMAGE < FILE`.
async function receive(name: string, bytes: Buffer) {
  const file = path.join(dir, `${name}.bgsnap`);
  fs.writeFileSync(file, bytes);
  const img = path.join(dir, `${name}.img`);
  const r = await sh(`${BIN.receive} -o '${img}' --stats '${img}.stats.json' < '${file}'`);
  return { img, r, stats: JSON.parse(fs.readFileSync(`${img}.stats.json`, 'utf8')) };
}

async function inspectJson(img: string) {
  const r = await run(BIN.inspect, [img, '--json']);
  assert.is(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

async function rawOf(img: string, extra: string[], out: string) {
  const r = await run(BIN.convert, [img, '--to', 'raw', '-o', out, '--force', ...extra]);
  return { r, bytes: r.code === 0 ? fs.readFileSync(out) : undefined };
}

test('3 passes + snapshot through bgsnap-receive: "1 snapshot after 3 pre-copy passes"; repeated pages stored once, last wins', async () => {
  c = buildPassChain(5);
  assert.ok(c.repeats > 0, 'the passes sent some pages more than once');
  assert.not.ok(c.lastPass.equals(c.ram), 'the snapshot changes what the passes left');
  const { img, r, stats } = await receive('good', c.stream);
  assert.is(img, good);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /complete: 1 snapshot after 3 pre-copy passes, /);
  assert.is(stats.passes, 3);
  assert.is(stats.duplicatePages, c.repeats, 'a page sent twice in one generation is stored once');
  const d = await inspectJson(good);
  assert.is(d.status, 'complete');
  assert.is(d.generation, 4, 'default: the snapshot');
  assert.is(d.snapshotGeneration, 4);
  assert.equal(d.generations.map((g: { pass?: boolean }) => g.pass), [true, true, true, undefined]);
  assert.equal(d.generations.map((g: { pages: number }) => g.pages), c.distinct, 'each generation counts distinct pages');
  assert.equal(d.generations.map((g: { dataPages: number }) => g.dataPages), c.dataPages);
  const text = await run(BIN.inspect, [good]);
  assert.match(text.stdout, /chain {5}4 generations \(3 pre-copy passes\); blocks below are generation 4's/);
  for (const k of [1, 2, 3]) assert.match(text.stdout, new RegExp(`gen ${k} +\\S+ +complete +pass +\\d+ pages`));
  assert.match(text.stdout, /gen 4 +\S+ +complete +\d+ pages/);
});

test('convert --to raw: the snapshot is exactly the memory at the freeze, by default and as --generation 4', async () => {
  for (const extra of [[], ['--generation', '4']]) {
    const { r, bytes } = await rawOf(good, ['--block', 'ram', ...extra], path.join(dir, 'ram.raw'));
    assert.is(r.code, 0, r.stderr);
    assert.is(bytes!.length, RAM_PAGES * 4096);
    for (let p = 0; p < RAM_PAGES; p++) {
      assert.ok(bytes!.subarray(p * 4096, (p + 1) * 4096).equals(c.ram.subarray(p * 4096, (p + 1) * 4096)), `${extra.join(' ') || 'default'}: ram page ${p}`);
    }
    const rom = await rawOf(good, ['--block', 'rom', ...extra], path.join(dir, 'rom.raw'));
    assert.ok(rom.bytes!.equals(c.rom), 'the ROM sent only in pass 1 is inherited by the snapshot');
  }
});

test('--generation 2, a pass, is refused by convert and inspect, naming the snapshot; --verify checks the passes\' pages too', async () => {
  const conv = await rawOf(good, ['--generation', '2'], path.join(dir, 'pass.raw'));
  assert.is(conv.r.code, 1);
  assert.match(conv.r.stderr, /generation 2 is a pre-copy pass, not a snapshot; the snapshot is generation 4/);
  assert.not.ok(fs.existsSync(path.join(dir, 'pass.raw')), 'nothing written');
  const insp = await run(BIN.inspect, [good, '--generation', '2']);
  assert.is(insp.code, 1);
  assert.match(insp.stderr, /generation 2 is a pre-copy pass, not a snapshot; the snapshot is generation 4/);
  const v = await run(BIN.inspect, [good, '--verify', '--json']);
  assert.is(v.code, 0, v.stdout + v.stderr);
  const total = c.dataPages.reduce((s, n) => s + n, 0);
  assert.is(JSON.parse(v.stdout).dataPages, total, 'every generation\'s data pages, the passes\' included');
  // A byte of a page pass 2 stored changes on disk: verify names it.
  const d = await inspectJson(good);
  const fd = fs.openSync(path.join(good, d.generations[1].file), 'r+');
  const at = firstDataOffset(fd, RAM_PAGES);
  fs.writeSync(fd, Buffer.from([0x5a ^ fs.readFileSync(path.join(good, d.generations[1].file))[at]]), 0, 1, at);
  fs.closeSync(fd);
  const bad = await run(BIN.inspect, [good, '--verify']);
  assert.is(bad.code, 3);
  assert.match(bad.stdout, /generation 2 ram:\d+: crc32 differs/);
});

// The first byte of the first non-zero page of the RAM block (base 0) in a generation's file.
function firstDataOffset(fd: number, pages: number): number {
  const buf = Buffer.alloc(4096);
  for (let p = 0; p < pages; p++) {
    fs.readSync(fd, buf, 0, 4096, p * 4096);
    if (buf.some((x) => x !== 0)) return p * 4096;
  }
  throw new Error('pass 2 stored no data page');
}

test('a stream cut inside the snapshot generation: receive says no snapshot; convert refuses by name, inspect says why; --allow-incomplete warns', async () => {
  const cut = c.stream.subarray(0, c.genStarts[3] + Math.floor((c.stream.length - c.genStarts[3]) / 2));
  const { img, r, stats } = await receive('cut', cut);
  assert.is(r.code, 2);
  assert.match(r.stderr, /INCOMPLETE: generation 4 is incomplete: .*; no complete snapshot: generations 1-3 are pre-copy passes/);
  assert.is(stats.passes, 3);
  const conv = await rawOf(img, [], path.join(dir, 'cut.raw'));
  assert.is(conv.r.code, 1);
  assert.match(conv.r.stderr, /image .*cut\.img: this image has no complete snapshot: generations 1-3 are pre-copy passes, generation 4 is incomplete \(.*input ended.*\); pass --allow-incomplete to convert what it holds/);
  const d = await inspectJson(img);
  assert.is(d.snapshotGeneration, null);
  assert.match(d.noSnapshot, /^this image has no complete snapshot: generations 1-3 are pre-copy passes, generation 4 is incomplete \(.*input ended/);
  const text = await run(BIN.inspect, [img]);
  assert.match(text.stdout, /\n {10}this image has no complete snapshot: generations 1-3 are pre-copy passes, generation 4 is incomplete/);
  assert.match(text.stdout, /gen 3 +\S+ +complete +pass /);
  const p3 = await rawOf(img, ['--generation', '3'], path.join(dir, 'cut3.raw'));
  assert.match(p3.r.stderr, /generation 3 is a pre-copy pass, not a snapshot; this image has no complete snapshot/);
  const allow = await rawOf(img, ['--block', 'ram', '--allow-incomplete'], path.join(dir, 'cut.raw'));
  assert.is(allow.r.code, 0, allow.r.stderr);
  assert.match(allow.r.stderr, /warning: this image has no complete snapshot: .*not a point-in-time snapshot/);
});

test('a stream that ends right after a pass (no snapshot generation, no END): nothing to convert, even with --allow-incomplete', async () => {
  const { img, r } = await receive('passes-only', c.stream.subarray(0, c.genStarts[3]));
  assert.is(r.code, 2);
  assert.match(r.stderr, /ended before the END frame .*\(after generation 3\).*; no complete snapshot: generations 1-3 are pre-copy passes/);
  const d = await inspectJson(img);
  assert.equal([d.generation, d.snapshotGeneration, d.noSnapshot], [3, null, 'this image has no complete snapshot: generations 1-3 are pre-copy passes, no generation followed']);
  const v = await run(BIN.inspect, [img, '--verify']);
  assert.is(v.code, 3, 'a pass is no snapshot: verify does not call the image OK');
  assert.match(v.stdout, /\(image is incomplete\)/);
  const conv = await rawOf(img, ['--allow-incomplete'], path.join(dir, 'po.raw'));
  assert.is(conv.r.code, 1);
  assert.match(conv.r.stderr, /nothing to convert: this image has no complete snapshot: generations 1-3 are pre-copy passes, no generation followed/);
  assert.not.ok(fs.existsSync(path.join(dir, 'po.raw')));
});

test('relayed over --listen TCP (bgsnap-receive --to re-encodes every frame): the passes stay passes, the snapshot exact', async () => {
  const root = path.join(dir, 'srv');
  fs.mkdirSync(root, { mode: 0o700 });
  const token = writeToken(dir);
  const rx = await startReceiver(root, ['--insecure', '--token-file', token]);
  try {
    const r = await relay(c.stream, rx.url, ['--insecure', '--token-file', token, '--name', 'pre']);
    assert.is(r.code, 0, `${r.stderr}\n${rx.stderr()}`);
  } finally {
    await rx.kill();
  }
  const d = await inspectJson(path.join(root, 'pre'));
  assert.equal([d.status, d.snapshotGeneration], ['complete', 4]);
  assert.equal(d.generations.map((g: { pass?: boolean }) => g.pass), [true, true, true, undefined]);
  const { r, bytes } = await rawOf(path.join(root, 'pre'), ['--block', 'ram'], path.join(dir, 'tcp.raw'));
  assert.is(r.code, 0, r.stderr);
  assert.ok(bytes!.equals(c.ram), 'the snapshot over TCP: the memory at the freeze');
});

test.run();
