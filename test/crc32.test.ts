// The addon's CRC-32 (carry-less multiply folding, io/native/crc32.cc) must equal
// zlib's for every length, alignment and running value, since page checksums it
// computes are compared with those the encoder (zlib) put in the stream.
import * as crypto from 'node:crypto';
import * as zlib from 'node:zlib';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { fileops } from '../io/fileops';
import { prng, randInt } from './helpers/prng';

test('crc32 equals zlib for lengths 0..4200 at every alignment and with running values', () => {
  const buf = crypto.randomBytes(8192);
  const rnd = prng(7);
  for (let len = 0; len <= 4200; len++) {
    const off = len % 17;
    const init = len % 3 === 0 ? 0 : randInt(rnd, 0, 0xffffffff);
    const piece = buf.subarray(off, off + len);
    assert.is(fileops.crc32(piece, init), zlib.crc32(piece, init), `length ${len} at offset ${off}, crc ${init}`);
  }
});

test('crc32 equals zlib on large buffers, all-zero and all-ones pages', () => {
  const big = crypto.randomBytes(5 << 20);
  assert.is(fileops.crc32(big), zlib.crc32(big));
  for (const fill of [0, 0xff]) assert.is(fileops.crc32(Buffer.alloc(4096, fill)), zlib.crc32(Buffer.alloc(4096, fill)));
});

test.run();
