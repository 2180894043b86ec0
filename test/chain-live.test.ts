// Live chains from the engine (`bgsnap-capture --pid PID --every SECONDS`;
// capture/native/generations.cc): one userfaultfd armed across generations.
//   - test/targets/chain.c steps between generations (the chain source is
//     lazy, so each step runs before the next freeze): each generation carries
//     exactly the pages the step wrote, new mappings whole, removed ones named;
//     mmap, munmap, mremap, MADV_DONTNEED of 4 KiB pages and of a THP; and each
//     generation read back holds what the target wrote up to it;
//   - the multi-threaded invariant target, 5 generations through the CLI, each
//     consistent on its own; and the same over TCP;
//   - the capture SIGKILLed during generation 4: 1-3 complete, the target
//     released (no page write-protected, every thread moving) and intact.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { startForked, type ForkedTarget } from './helpers/forked-target';
import { startReceiver, tmpDir, writeToken } from './helpers/net';
import { allThreadsProgress, invariantAt, isAlive, startTarget, writeProtectedPages, type Target } from './process-target';
import { captureProcessChain } from '../capture/process-chain';
import { BgsnapDecoder } from '../format/bgsnap';
import type { BlockInfo } from '../format/events';
import { Output } from '../io/output';
import { StreamSink } from '../io/stream-sink';
import { ImageReader } from '../receiver/image-reader';

const PAGE = 4096;
const dir = tmpDir('chain-live');

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

async function inspectJson(img: string) {
  const r = await run(BIN.inspect, [img, '--json']);
  assert.is(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

// Per generation: block address -> {data, zero} page numbers the stream carried, and the blocks added/removed.
interface Carried { pages: Map<number, { data: Set<number>; zero: Set<number> }>; added: BlockInfo[]; removed: number[] }
function carried(file: string): Carried[] {
  const dec = new BgsnapDecoder();
  const blocks: BlockInfo[] = [], out: Carried[] = [];
  for (const ev of [...dec.push(fs.readFileSync(file)), ...dec.finish()]) {
    if (ev.type === 'generation') out.push({ pages: new Map(), added: [], removed: ev.generation.removed.map((b) => blocks[b].address) });
    if (ev.type === 'blocks') (blocks.push(...ev.blocks), out[out.length - 1].added.push(...ev.blocks));
    if (ev.type !== 'pages') continue;
    const g = out[out.length - 1].pages;
    const addr = blocks[ev.batch.block].address;
    if (!g.has(addr)) g.set(addr, { data: new Set(), zero: new Set() });
    ev.batch.index.forEach((p, i) => g.get(addr)![ev.batch.zero[i] ? 'zero' : 'data'].add(p));
  }
  return out;
}

const range = (a: number, b: number, keep: (i: number) => boolean = () => true) => [...Array(b - a).keys()].map((i) => i + a).filter(keep);
const sorted = (s: Set<number> | undefined) => [...(s ?? [])].sort((a, b) => a - b);

// Every word of page `page` as test/targets/chain.c stamps it in step `gen`.
function stamped(buf: Buffer, off: number, gen: number, page: number): boolean {
  for (let w = 0; w < PAGE / 8; w++) if (buf.readBigUInt64LE(off + w * 8) !== BigInt(gen * 1000000 + page * 1000 + w)) return false;
  return true;
}

// Which step last wrote region page i in generation k (0: dropped, reads as zero).
function regionGen(k: number, i: number): number {
  if (k >= 5 && i >= 128 && i < 192) return 0;
  if (k >= 5 && i < 8) return 5;
  for (const [s, hit] of [[4, i % 16 === 2], [3, i % 8 === 1], [2, i % 4 === 0]] as const) if (k >= s && hit) return s;
  return 1;
}

// Generation k read back: `pages` pages of the block at `addr`, each checked by `want` (page -> stamp step, 0 zero).
async function checkBlock(img: string, k: number, addr: number, pages: number, first: number, want: (i: number) => number): Promise<void> {
  const r = await ImageReader.open(img, { generation: k });
  try {
    const j = r.blocks.findIndex((b) => b.address === addr);
    assert.ok(j >= 0, `generation ${k}: a block at 0x${addr.toString(16)}`);
    const buf = Buffer.alloc(pages * PAGE);
    r.readPages(j, 0, pages, buf);
    for (let i = 0; i < pages; i++) {
      const g = want(i);
      const ok = g === 0 ? buf.subarray(i * PAGE, (i + 1) * PAGE).every((x) => x === 0) : stamped(buf, i * PAGE, g, first + i);
      assert.ok(ok, `generation ${k}, block 0x${addr.toString(16)} page ${i}: expected ${g ? `step ${g}'s stamp` : 'zero'}`);
    }
  } finally {
    await r.close();
  }
}

// preDirty: the dirty set re-protected before each later freeze (the engine
// does that from 4096 pages on; 1 takes that path for these small steps too).
for (const preDirty of [4096, 1]) test(`a chain of test/targets/chain.c with steps between generations: each carries exactly what its step wrote (dirty set protected before the freeze from ${preDirty} pages)`, async () => {
  const t: ForkedTarget = await startForked('chain', ['x']);
  const file = path.join(dir, `steps${preDirty}.bgsnap`), img = path.join(dir, `steps${preDirty}.img`);
  const region = parseInt(/region=0x([0-9a-f]+)/.exec(t.ready)![1], 16);
  const moves: number[] = [];
  let thp = 0, hugeKb = 0;
  try {
    const src = captureProcessChain(t.pid, { everyMs: 1, count: 8, chainPreProtectMinPages: preDirty });
    const sink = new StreamSink(Output.open(file));
    for await (const ev of src.events) {
      await sink.write(ev);
      const k = ev.type === 'generation-end' ? ev.totals.generation : 0;
      if (k === 0 || k === 8) continue;
      const said = await t.ask(`step ${k + 1}`); // before generation k+1's freeze: the source waits for us
      assert.match(said, new RegExp(`^stepped ${k + 1} `));
      moves.push(parseInt(/movable=0x([0-9a-f]+)/.exec(said)![1], 16));
      thp = parseInt(/thp=(?:0x([0-9a-f]+)|\(nil\))/.exec(said)![1] ?? '0', 16);
      if (k + 1 === 6) hugeKb = anonHugeKb(t.pid, thp);
    }
    assert.is((await sink.finish()).status, 'complete');
  } finally {
    t.kill();
  }
  const r = await sh(`${BIN.receive} -o ${img} < ${file}`);
  assert.is(r.code, 0, r.stderr);
  const d = await inspectJson(img);
  assert.equal(d.generations.map((g: { status: string }) => g.status), Array(8).fill('complete'));
  const c = carried(file);
  const extra = region + 272 * PAGE, movable0 = region + 304 * PAGE, movable1 = moves[2];
  assert.equal(sorted(c[0].pages.get(region)?.data), range(0, 256), 'generation 1: the whole region');
  const want: [number, number[], number[]][] = [
    [2, range(0, 256, (i) => i % 4 === 0), []], [3, range(0, 256, (i) => i % 8 === 1), []],
    [4, range(0, 256, (i) => i % 16 === 2), []], [5, range(0, 8), range(128, 192)], [6, [], []], [7, [], []], [8, [], []],
  ];
  for (const [k, data, zero] of want) {
    const got = c[k - 1].pages.get(region);
    assert.equal(sorted(got?.data), data, `generation ${k}: the region pages step ${k} wrote, no others`);
    assert.equal(sorted(got?.zero), zero, `generation ${k}: the region pages step ${k} dropped, as zero`);
  }
  // mmap in step 3, munmap and mremap (a move) in step 4.
  assert.equal(c[2].added.map((b) => [b.address, b.length]), [[extra, 16 * PAGE]], 'generation 3: extra added');
  assert.equal(sorted(c[2].pages.get(extra)?.data), range(0, 16));
  assert.equal(c[3].removed.sort(), [extra, movable0].sort(), 'generation 4: extra and the old movable removed');
  assert.equal(c[3].added.map((b) => [b.address, b.length]), [[movable1, 64 * PAGE]], 'generation 4: movable at its new place, 64 pages');
  assert.equal([sorted(c[3].pages.get(movable1)?.data), sorted(c[3].pages.get(movable1)?.zero)], [range(0, 32), range(32, 64)]);
  // The THP: mapped whole in 6, first huge page dropped and 3 pages rewritten in 7, second dropped in 8.
  console.log(`  step 6: the 4 MiB mapping had ${hugeKb} kB in transparent huge pages`);
  assert.ok(hugeKb >= 2048, 'the THP case needs a transparent huge page (madvise mode)');
  assert.equal(c[5].added.map((b) => [b.address, b.length]), [[thp, 4 << 20]]);
  assert.equal(sorted(c[5].pages.get(thp)?.data), range(0, 1024));
  assert.equal([sorted(c[6].pages.get(thp)?.data), sorted(c[6].pages.get(thp)?.zero)], [range(0, 3), range(3, 512)], 'generation 7: the dropped THP');
  assert.equal([sorted(c[7].pages.get(thp)?.data), sorted(c[7].pages.get(thp)?.zero)], [[], range(512, 1024)], 'generation 8: the other, not rewritten');
  for (let k = 1; k <= 8; k++) await checkBlock(img, k, region, 256, 0, (i) => regionGen(k, i));
  await checkBlock(img, 3, extra, 16, 1000, () => 3);
  await checkBlock(img, 3, movable0, 32, 2000, () => 1);
  await checkBlock(img, 4, movable1, 64, 2000, (i) => (i < 32 ? 1 : 0));
  await checkBlock(img, 6, thp, 1024, 3000, () => 6);
  await checkBlock(img, 7, thp, 1024, 3000, (i) => (i < 3 ? 7 : i < 512 ? 0 : 6));
  await checkBlock(img, 8, thp, 1024, 3000, (i) => (i < 3 ? 7 : 0));
  for (let k = 2; k <= 8; k++) {
    const other = [...c[k - 1].pages].filter(([a]) => ![region, extra, movable1, thp].includes(a)).reduce((n, [, s]) => n + s.data.size + s.zero.size, 0);
    console.log(`  generation ${k}: ${d.generations[k - 1].pages} pages, ${other} of them outside the step's mappings (stacks, TLS)`);
  }
});

function anonHugeKb(pid: number, addr: number): number {
  const smaps = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
  const at = smaps.indexOf(`${addr.toString(16)}-`);
  if (at < 0) return 0;
  return Number(/AnonHugePages:\s+(\d+) kB/.exec(smaps.slice(at))?.[1] ?? 0);
}

// n generations, each complete and each holding a consistent region.
async function everyGenerationHolds(img: string, d: { generations: { status: string }[] }, n: number, t: Target): Promise<void> {
  assert.equal(d.generations.map((g) => g.status), Array(n).fill('complete'));
  for (let k = 1; k <= n; k++) await invariantAt(img, k, t);
}

test('five generations of the multi-threaded invariant target through the CLIs, each consistent on its own', async () => {
  const t = await startTarget('anon', 16, 3);
  const img = path.join(dir, 'inv.img'), stats = path.join(dir, 'inv.json');
  try {
    const r = await sh(`${BIN.capture} --pid ${t.pid} --every 0.3 --count 5 --stats ${stats} | ${BIN.receive} -o ${img}`, 300_000);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stderr.match(/bgsnap-capture: generation \d+:/g)?.length, 5, r.stderr);
    const d = await inspectJson(img);
    await everyGenerationHolds(img, d, 5, t);
    const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
    assert.is(s.generations.length, 5);
    for (const g of s.generations) console.log(`  generation ${g.generation}: pause ${g.pauseMs.toFixed(1)} ms, ${g.pages} pages (${g.dataPages} data), ${g.faults} faults`);
    assert.is((await t.command('check')).startsWith('check ok'), true, 'the target checks itself');
    assert.ok((await allThreadsProgress(t)).ok, 'every thread moves on');
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'nothing left write-protected');
  } finally {
    t.kill();
  }
});

// Other kinds of memory and a target storming its layout: huge pages, shared
// anonymous memory, memfd, and threads mapping, writing and dropping memory
// (MADV_DONTNEED, munmap) beside the writers throughout.
for (const mode of ['thp', 'shared', 'memfd', 'storm'] as const) test(`a live chain of the invariant target in ${mode} mode: each generation consistent`, async () => {
  const t = await startTarget(mode, 16, 3);
  const img = path.join(dir, `${mode}.img`);
  try {
    const r = await sh(`${BIN.capture} --pid ${t.pid} --every 0.3 --count 4 | ${BIN.receive} -o ${img}`, 300_000);
    assert.is(r.code, 0, r.stderr);
    const d = await inspectJson(img);
    await everyGenerationHolds(img, d, 4, t);
    console.log(`  ${mode}: ${d.generations.map((g: { pages: number }) => g.pages).join(', ')} pages per generation`);
    assert.ok((await t.command('check')).startsWith('check ok'));
    assert.ok((await allThreadsProgress(t)).ok);
  } finally {
    t.kill();
  }
});

test('SIGKILL during generation 4: generations 1-3 complete, the target released and intact', async () => {
  const t = await startTarget('anon', 16, 3);
  const img = path.join(dir, 'killed.img');
  try {
    const cap = spawn('/bin/sh', ['-c', `exec ${BIN.capture} --pid ${t.pid} --every 0.2 --count 10`], {
      stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, BGSNAP_TEST_HOLD: 'copy:3000' },
    });
    const rx = spawn('/bin/sh', ['-c', `exec ${BIN.receive} -o '${img}'`], { stdio: ['pipe', 'ignore', 'pipe'] });
    cap.stdout!.pipe(rx.stdin!);
    // Killed while the saver holds in generation 4's save (writers wait on it)
    // and once generation 4's opening is on its way to the receiver: with the
    // fault server the scan reaches its hold before JavaScript has written that
    // opening, so the test reads the stream it relays rather than guess a delay.
    const seen = new BgsnapDecoder();
    let err = '', holds = 0, opened = false, killed = false;
    const maybeKill = () => {
      if (holds === 4 && opened && !killed) (killed = true), cap.kill('SIGKILL');
    };
    cap.stdout!.on('data', (b: Buffer) => {
      opened ||= seen.push(b).some((ev) => ev.type === 'generation' && ev.generation.generation === 4);
      maybeKill();
    });
    cap.stderr!.on('data', (b: Buffer) => {
      err += b.toString();
      holds = err.match(/bgsnap-hold copy/g)?.length ?? 0;
      maybeKill();
    });
    const rxDone = new Promise<number>((resolve) => rx.on('exit', (code) => resolve(code ?? -1)));
    await new Promise((resolve) => cap.on('exit', resolve));
    assert.is(holds, 4, err);
    assert.match(err, /generation 3:/);
    assert.not.match(err, /generation 4:/);
    assert.is(await rxDone, 2, 'the receiver says incomplete');
    assert.ok(isAlive(t.pid));
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'the kernel dropped every protection with our userfaultfd');
    assert.ok((await allThreadsProgress(t)).ok, 'every thread moves on');
    assert.ok((await t.command('check')).startsWith('check ok'), 'the target checks itself');
    const d = await inspectJson(img);
    assert.equal(d.generations.map((g: { status: string }) => g.status), ['complete', 'complete', 'complete', 'incomplete']);
    for (let k = 1; k <= 3; k++) await invariantAt(img, k, t);
  } finally {
    t.kill();
  }
});

test('SIGTERM ends a chain without --count cleanly, after the generation in flight', async () => {
  const t = await startTarget('anon', 8, 2);
  const img = path.join(dir, 'term.img');
  try {
    const cap = spawn('/bin/sh', ['-c', `exec ${BIN.capture} --pid ${t.pid} --every 0.2`], { stdio: ['ignore', 'pipe', 'pipe'] });
    const rx = spawn('/bin/sh', ['-c', `exec ${BIN.receive} -o '${img}'`], { stdio: ['pipe', 'ignore', 'pipe'] });
    cap.stdout!.pipe(rx.stdin!);
    let err = '', sent = false;
    cap.stderr!.on('data', (b: Buffer) => {
      err += b.toString();
      if (!sent && /generation 2:/.test(err)) (sent = true), cap.kill('SIGTERM'); // once: a second one kills at once
    });
    const [capCode, rxCode] = await Promise.all([cap, rx].map((p) => new Promise<number>((resolve) => p.on('exit', (c) => resolve(c ?? -1)))));
    assert.is(capCode, 0, err);
    assert.is(rxCode, 0);
    const d = await inspectJson(img);
    assert.is(d.status, 'complete');
    const n = d.generations.length;
    assert.ok(n >= 2, `${n} generations`);
    await everyGenerationHolds(img, d, n, t);
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0);
    assert.ok((await allThreadsProgress(t)).ok);
  } finally {
    t.kill();
  }
});

test('a live chain over --listen TCP', async () => {
  const t = await startTarget('anon', 8, 2);
  const root = path.join(dir, 'srv');
  fs.mkdirSync(root, { mode: 0o700 });
  const token = writeToken(dir);
  const rx = await startReceiver(root, ['--insecure', '--token-file', token]);
  try {
    const r = await run(BIN.capture, ['--pid', String(t.pid), '--every', '0.3', '--count', '3', '--to', rx.url, '--insecure', '--token-file', token, '--name', 'live'], 300_000);
    assert.is(r.code, 0, `${r.stderr}\n${rx.stderr()}`);
    const d = await inspectJson(path.join(root, 'live'));
    assert.is(d.status, 'complete');
    await everyGenerationHolds(path.join(root, 'live'), d, 3, t);
  } finally {
    await rx.kill();
    t.kill();
  }
});

test.run();
