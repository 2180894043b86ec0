// The local image sink, through the shared sink suite, plus what only a local
// image has: refusing to overwrite, punching holes, staying inside its bounds.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BgsnapEncoder } from '../format/bgsnap';
import { ImageWriter, layoutBlocks } from '../receiver/image';
import { receive } from '../receiver/receive';
import { sinkSuite } from './helpers/sink-suite';
import { makeHeader, pageBytes } from './helpers/streams';
import { tmpDir } from './helpers/net';

sinkSuite('local image', (dir) => ImageWriter.create(dir)).run();

function tmp(): string {
  return tmpDir('img');
}

function stream(frames: Buffer[][]): Readable {
  return Readable.from([Buffer.concat(frames.flat())]);
}

test('refuses to overwrite an existing image unless forced', async () => {
  const dir = tmp();
  const err = await ImageWriter.create(dir).then(() => undefined, (e: Error) => e);
  assert.match(String(err?.message), /already exists \(use --force/);
  const w = await ImageWriter.create(dir, { force: true });
  await w.fail('test');
});

test('a page that becomes zero later is punched out of the data file', async () => {
  const enc = new BgsnapEncoder();
  const blocks = [{ name: 'ram', length: 64 * 4096, address: 0 }];
  const all = Uint32Array.from({ length: 64 }, (_, i) => i);
  const frames = [[enc.magic()], enc.header(makeHeader()), enc.blocks(blocks),
    enc.pages({ block: 0, index: all, zero: new Uint8Array(64), data: Buffer.concat([...all].map((i) => pageBytes(i + 1, 4096))) }),
    enc.pages({ block: 0, index: all, zero: new Uint8Array(64).fill(1), data: Buffer.alloc(0) }), enc.end()];
  const dir = path.join(tmp(), 'img');
  const summary = await receive(stream(frames), await ImageWriter.create(dir));
  assert.is(summary.status, 'complete', summary.reason);
  assert.is(summary.dataPages, 0);
  assert.is(summary.duplicatePages, 64);
  assert.is(summary.imageBytes, 0, 'all 64 pages were punched');
});

test('all-zero data pages are stored as holes and blocks sit at aligned bases', async () => {
  const layout = layoutBlocks([{ name: 'a', length: 4096, address: 0 }, { name: 'b', length: 3 << 20, address: 0 }, { name: 'c', length: 4096, address: 0 }], 4096);
  assert.equal(layout.map((b) => b.base), [0, 2 << 20, 6 << 20]);
  const enc = new BgsnapEncoder();
  const frames = [[enc.magic()], enc.header(makeHeader()), enc.blocks([{ name: 'a', length: 8192, address: 0 }]),
    enc.pages({ block: 0, index: Uint32Array.from([0, 1]), zero: new Uint8Array(2), data: Buffer.concat([Buffer.alloc(4096), pageBytes(9, 4096)]) }), enc.end()];
  const summary = await receive(stream(frames), await ImageWriter.create(path.join(tmp(), 'img')));
  assert.is(summary.status, 'complete', summary.reason);
  assert.is(summary.dataPages, 1);
  assert.is(summary.zeroPages, 1);
  assert.is(summary.imageBytes, 4096);
});

test('a page past its block is refused and nothing is written outside the image', async () => {
  const enc = new BgsnapEncoder();
  const frames = [[enc.magic()], enc.header(makeHeader()), enc.blocks([{ name: 'a', length: 8192, address: 0 }]),
    enc.pages({ block: 0, index: Uint32Array.from([1, 1000]), zero: new Uint8Array(2), data: Buffer.concat([pageBytes(1, 4096), pageBytes(2, 4096)]) }), enc.end()];
  const dir = path.join(tmp(), 'img');
  const summary = await receive(stream(frames), await ImageWriter.create(dir));
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /page 1000 is past the end of block 0/);
  assert.is(fs.statSync(path.join(dir, 'data')).size, 8192);
  assert.is(summary.imageBytes, 0, 'the batch was refused whole');
});

test('a stream whose pages do not cover every page is incomplete', async () => {
  const enc = new BgsnapEncoder();
  const frames = [[enc.magic()], enc.header(makeHeader()), enc.blocks([{ name: 'a', length: 8192, address: 0 }]),
    enc.pages({ block: 0, index: Uint32Array.from([0]), zero: new Uint8Array(1), data: pageBytes(1, 4096) }), enc.end()];
  const summary = await receive(stream(frames), await ImageWriter.create(path.join(tmp(), 'img')));
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /1 pages of block a never arrived/);
});

// The image checks page frames itself (the decoder defers to it, so each page is
// checksummed once); a damaged frame must still never reach the data file.
test('a PAGES frame with a flipped bit in a page is refused before any of its pages is written', async () => {
  const enc = new BgsnapEncoder();
  const two = Uint32Array.from([0, 1]);
  const frames = [[enc.magic()], enc.header(makeHeader()), enc.blocks([{ name: 'a', length: 8192, address: 0 }]),
    enc.pages({ block: 0, index: two, zero: new Uint8Array(2), data: Buffer.concat([pageBytes(1, 4096), pageBytes(2, 4096)]) }),
    enc.pages({ block: 0, index: two, zero: new Uint8Array(2), data: Buffer.concat([pageBytes(3, 4096), pageBytes(4, 4096)]) }), enc.end()];
  const bytes = Buffer.concat(frames.flat());
  const second = bytes.length - Buffer.concat(frames[5]).length - Buffer.concat(frames[4]).length;
  bytes[second + Buffer.concat(frames[4]).length - 100] ^= 4; // inside frame 3's second page
  const dir = path.join(tmp(), 'img');
  const summary = await receive(Readable.from([bytes]), await ImageWriter.create(dir));
  assert.is(summary.status, 'incomplete');
  assert.match(summary.reason, /bad checksum in PAGES frame 3/);
  const data = fs.readFileSync(path.join(dir, 'data'));
  assert.ok(data.subarray(0, 4096).equals(pageBytes(1, 4096)), 'page 0 keeps the version of the intact frame');
  assert.ok(data.subarray(4096).equals(pageBytes(2, 4096)), 'page 1 keeps the version of the intact frame');
});

test.run();
