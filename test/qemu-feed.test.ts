// The `--to qemu -o -` pipe feed (io/native/feed.cc, receiver/convert-qemu.ts):
// pages go into the pipe by reference, so this checks the kernel facts it rests
// on, on this kernel, with a real FIFO; and, through the real CLIs, that the
// feed into a pipe writes byte for byte what the copying writer writes into a
// file, across runs longer than a read, zero gaps, mapping windows, blocks with
// ZERO records; and that a data file cut short fails the convert with the
// error named, never SIGBUS.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileops } from '../io/fileops';
import { RamPartWriter, encodePreamble, encodeRamStart } from '../format/qemu-encode';
import { BIN, run, sh } from './helpers/cli';
import { tmpDir } from './helpers/net';

const dir = tmpDir('feed');
const at = (n: string) => path.join(dir, n);

// Both ends of a real FIFO in this process, grown so a test's records fit.
function fifo(name: string): { w: number; r: number; close: () => void } {
  execFileSync('mkfifo', [at(name)]);
  const rw = fs.openSync(at(name), 'r+'); // keeps both ends open, so neither open below blocks
  const w = fs.openSync(at(name), 'w');
  const r = fs.openSync(at(name), 'r');
  fileops.setPipeSize(w, 1 << 20);
  return { w, r, close: () => [rw, w, r].forEach((fd) => fs.closeSync(fd)) };
}

function readExactly(fd: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let got = 0; got < n;) got += fs.readSync(fd, b, got, n - got, null);
  return b;
}

const pageOf = (k: number) => Buffer.alloc(4096, k & 0xff);

// A pipeline through bash with pipefail, so convert's own exit status counts.
function pipeline(name: string, script: string) {
  fs.writeFileSync(at(`${name}.sh`), script);
  return sh(`bash -o pipefail '${at(`${name}.sh`)}'`, 60_000);
}

test('kernel facts: headers are the caller\'s bytes at call time; pages go in by reference', () => {
  fs.writeFileSync(at('data1'), Buffer.concat([0, 1, 2, 3].map((k) => pageOf(0x40 + k))));
  const data = fs.openSync(at('data1'), 'r+');
  const p = fifo('p1');
  try {
    const heads = Buffer.from('AAAAAAAAxBBBBBBBBCCCCCCCC'); // the first header 9 bytes, the others 8
    fileops.feedPages(p.w, data, 0, 4, Uint32Array.of(1, 3, 2), heads);
    heads.fill(0x2a); // a header buffer the native side kept by reference would now read '*'
    fs.writeSync(data, pageOf(0x77), 0, 4096, 3 * 4096); // page 3 of the file, after the call
    const got = readExactly(p.r, heads.length + 3 * 4096);
    const want = Buffer.concat([Buffer.from('AAAAAAAAx'), pageOf(0x41), Buffer.from('BBBBBBBB'), pageOf(0x77), Buffer.from('CCCCCCCC'), pageOf(0x42)]);
    assert.ok(got.equals(want), 'headers as given, pages in index order, page 3 as rewritten: the pipe held the page, not a copy');
  } finally {
    p.close();
    fs.closeSync(data);
  }
});

test('kernel facts: a page past the end of a truncated data file is EFAULT, not SIGBUS', () => {
  fs.writeFileSync(at('data2'), Buffer.concat([pageOf(1), pageOf(2)]));
  const data = fs.openSync(at('data2'), 'r+');
  fs.ftruncateSync(data, 4096);
  const p = fifo('p2');
  try {
    const e = (() => { try { fileops.feedPages(p.w, data, 0, 2, Uint32Array.of(1), Buffer.alloc(8)); } catch (x) { return x as Error & { code?: string }; } })();
    assert.ok(e, 'feedPages must fail');
    assert.is(e!.code, 'EFAULT', e!.message);
    assert.match(e!.message, /vmsplice of 1 pages from data offset 0 into fd \d+/);
  } finally {
    p.close();
    fs.closeSync(data);
  }
});

// A QEMU stream whose main block (pc.ram, 6000 pages) has data runs of 1 to 1300
// pages between zero gaps, so runs pass the 512-page reads and the 2048-page
// windows, plus two small blocks that get ZERO records between their data pages.
function genStream(): Buffer {
  const blocks = [{ name: 'pc.ram', length: 6000 * 4096 }, { name: 'pc.bios', length: 64 * 4096 }, { name: 'pc.rom', length: 8 * 4096 }];
  const w = new RamPartWriter(blocks, 3);
  const parts = [encodePreamble('pc-i440fx-7.2'), encodeRamStart(blocks, { sectionId: 3, instanceId: 0, version: 4 }), w.begin()];
  const lens = [1, 1300, 7, 600, 513, 2, 2100, 90];
  let p = 0;
  for (let k = 0; p < 6000; k++) {
    const n = Math.min(lens[k % lens.length], 6000 - p);
    const zero = k % 3 === 2;
    const idx = Uint32Array.from({ length: n }, (_, i) => p + i);
    parts.push(zero ? w.zeros(0, idx) : w.pages(0, idx, Buffer.concat(Array.from(idx, (i) => pageOf(i * 7 + 1)))));
    p += n;
  }
  for (const [b, pages] of [[1, 64], [2, 8]]) {
    for (let i = 0; i < pages; i++) parts.push(i % 3 === 1 ? w.zeros(b, Uint32Array.of(i)) : w.pages(b, Uint32Array.of(i), pageOf(200 + i)));
  }
  parts.push(w.end(), Buffer.from([0x00, 0x06, 0, 0, 0, 2]), Buffer.from('{}'));
  return Buffer.concat(parts);
}

test('into a pipe (spliced) --to qemu writes byte for byte what the copying writer writes into a file', async () => {
  const stream = genStream();
  const rcv = await run(BIN.receive, ['-q', '-o', at('img')], 60_000, stream);
  assert.is(rcv.code, 0, rcv.stderr);
  const file = await run(BIN.convert, [at('img'), '--to', 'qemu', '-o', at('file.qemu')]);
  assert.is(file.code, 0, file.stderr);
  for (const [name, env] of [['pipe.qemu', ''], ['copy.qemu', 'BGSNAP_FEED=copy ']]) {
    const r = await pipeline(name, `${env}${BIN.convert} '${at('img')}' --to qemu -o - | cat > '${at(name)}'`);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stderr, '', 'nothing on a non-terminal stderr');
  }
  const want = fs.readFileSync(at('file.qemu'));
  assert.ok(want.length > 5000 * 4096, `${want.length} bytes`);
  assert.ok(fs.readFileSync(at('pipe.qemu')).equals(want), 'spliced into a pipe: the same bytes');
  assert.ok(fs.readFileSync(at('copy.qemu')).equals(want), 'BGSNAP_FEED=copy into a pipe: the same bytes');
  // And those bytes hold the memory: received again, the same RAM as the image
  // (incomplete, exit 2: the main block's zero pages are left out of the feed).
  assert.is((await run(BIN.receive, ['-q', '-o', at('img2')], 60_000, want)).code, 2);
  for (const img of ['img', 'img2']) assert.is((await run(BIN.convert, [at(img), '--to', 'raw', '-o', at(`${img}.raw`), '--allow-incomplete'])).code, 0);
  assert.ok(fs.readFileSync(at('img.raw')).equals(fs.readFileSync(at('img2.raw'))), 'same pc.ram after the round trip');
});

test('a data file cut short under the pipe feed: convert fails naming vmsplice and EFAULT, no SIGBUS', async () => {
  fs.cpSync(at('img'), at('cut'), { recursive: true });
  fs.truncateSync(at('cut/data'), 3000 * 4096); // the index still lists pages past here
  const r = await pipeline('cut', `${BIN.convert} '${at('cut')}' --to qemu -o - | cat > /dev/null`);
  assert.is(r.code, 1, `exit 1 (an error), not 135 (SIGBUS): ${r.code} ${r.stderr}`);
  assert.match(r.stderr, /bgsnap-convert: vmsplice of \d+ pages from data offset \d+ into fd 1: Bad address \[EFAULT\]/);
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
