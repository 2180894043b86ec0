// bgsnap-convert --to qemu, through the real CLIs: a QEMU stream received into an
// image, replayed as a QEMU stream and received again holds the same memory
// (pages are read straight into their records, so this checks that placement);
// progress appears on a terminal and nowhere else. --to qemu-mapped-ram puts
// every page of every block at its offset with the bitmap QEMU reads, the
// device state at the end (read back by an independent parser; QEMU itself
// loads it in vm-mapped-ram.test.ts).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BIN, run, sh } from './helpers/cli';
import { genStream } from './helpers/qemu-gen';
import { parseMappedRam } from './helpers/mapped-ram';
import { tmpDir } from './helpers/net';

const dir = tmpDir('convq');
const at = (n: string) => path.join(dir, n);

test('an image replayed with --to qemu and received again holds the same memory', async () => {
  // Random records do not cover every page: the images are incomplete (exit 2)
  // and converted with --allow-incomplete; pages never sent read as zero.
  const g = genStream(41, { records: 3000, maxPages: 1500 });
  assert.is((await run(BIN.receive, ['-q', '-o', at('a')], 60_000, g.bytes)).code, 2);
  const c = await run(BIN.convert, [at('a'), '--to', 'qemu', '-o', at('a.qemu'), '--allow-incomplete']);
  assert.is(c.code, 0, c.stderr);
  assert.is(c.stderr, '', 'no progress on a non-terminal stderr');
  const r = await run(BIN.receive, ['-q', '-o', at('b')], 60_000, fs.readFileSync(at('a.qemu')));
  assert.is(r.code, 2, r.stderr);
  for (const img of ['a', 'b']) assert.is((await run(BIN.convert, [at(img), '--to', 'raw', '-o', at(`${img}.raw`), '--allow-incomplete'])).code, 0);
  const a = fs.readFileSync(at('a.raw'));
  assert.ok(a.some((x) => x !== 0), 'the image holds data');
  assert.ok(a.equals(fs.readFileSync(at('b.raw'))), 'same memory after the round trip');
});

test('convert --to qemu shows progress on a terminal', async () => {
  // script(1) gives convert a pseudo-terminal, as an interactive user has.
  const tty = await sh(`script -qec "${BIN.convert.replace(/'/g, '')} ${at('a')} --to qemu -o ${at('tty.qemu')} --allow-incomplete" /dev/null`, 60_000);
  assert.is(tty.code, 0, tty.stdout + tty.stderr);
  assert.match(tty.stdout, /bgsnap-convert: \d+ of \d+ pages \(\d+%\)/);
  assert.ok(fs.readFileSync(at('tty.qemu')).equals(fs.readFileSync(at('a.qemu'))), 'the same stream with or without a terminal');
});

test('convert --to raw shows progress on a terminal, and only there', async () => {
  const tty = await sh(`script -qec "${BIN.convert.replace(/'/g, '')} ${at('a')} --to raw -o ${at('tty.raw')} --allow-incomplete" /dev/null`, 60_000);
  assert.is(tty.code, 0, tty.stdout + tty.stderr);
  assert.match(tty.stdout, /bgsnap-convert: \d+ of \d+ pages \(\d+%\)/);
  assert.ok(fs.readFileSync(at('tty.raw')).equals(fs.readFileSync(at('a.raw'))), 'the same memory with or without a terminal');
});

test('--to qemu-mapped-ram: each block\'s pages at its offset, bits for the main block\'s data pages and every page of the others, then the device state', async () => {
  const g = genStream(43, { records: 3000, maxPages: 1500 });
  assert.is((await run(BIN.receive, ['-q', '-o', at('m')], 60_000, g.bytes)).code, 2);
  const c = await run(BIN.convert, [at('m'), '--to', 'qemu-mapped-ram', '-o', at('m.mr'), '--allow-incomplete']);
  assert.is(c.code, 0, c.stderr);
  assert.is(c.stderr, '', 'no progress on a non-terminal stderr');
  const f = fs.readFileSync(at('m.mr'));
  const parsed = parseMappedRam(f);
  assert.equal(parsed.blocks.map((b) => [b.name, b.length]), g.blocks.map((b) => [b.name, b.length]));
  const main = g.blocks.reduce((m, b, i) => (b.length > g.blocks[m].length ? i : m), 0);
  let dataPages = 0;
  for (const [i, b] of parsed.blocks.entries()) {
    assert.is((await run(BIN.convert, [at('m'), '--to', 'raw', '--block', b.name, '-o', at(`m${i}.raw`), '--allow-incomplete'])).code, 0);
    const raw = fs.readFileSync(at(`m${i}.raw`));
    assert.ok(f.subarray(b.pagesOffset, b.pagesOffset + b.length).equals(raw), `${b.name}: pages at pages_offset + index * 4096`);
    assert.is(b.pagesOffset % (1 << 20), 0, 'page regions are 1 MiB aligned');
    for (let p = 0; p < b.length / 4096; p++) {
      const bit = (f[b.bitmapOffset + (p >> 3)] >> (p & 7)) & 1;
      const data = raw.subarray(p * 4096, (p + 1) * 4096).some((x) => x !== 0);
      assert.is(bit, i === main ? Number(data) : 1, `${b.name} page ${p}: bit`);
      dataPages += Number(data);
    }
  }
  assert.ok(dataPages > 100, `${dataPages} data pages`);
  assert.ok(f.subarray(f.length - g.tail.length).equals(g.tail), 'the device state ends the file');
  assert.ok(f.subarray(0, g.preamble.length).equals(g.preamble), 'the saved preamble begins it');
});

test('convert --to qemu-mapped-ram shows progress on a terminal', async () => {
  const tty = await sh(`script -qec "${BIN.convert.replace(/'/g, '')} ${at('m')} --to qemu-mapped-ram -o ${at('tty.mr')} --allow-incomplete" /dev/null`, 60_000);
  assert.is(tty.code, 0, tty.stdout + tty.stderr);
  assert.match(tty.stdout, /bgsnap-convert: \d+ of \d+ pages \(\d+%\)/);
  assert.ok(fs.readFileSync(at('tty.mr')).equals(fs.readFileSync(at('m.mr'))), 'the same file with or without a terminal');
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
