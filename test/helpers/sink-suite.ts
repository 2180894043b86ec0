// The one test suite for every SnapshotSink (local image, bgsnap stream into a
// file, bgsnap stream to a network receiver): each must store exactly the last
// version of every page, keep zero pages as holes, leave an incomplete, readable
// image when the stream breaks, and hold no reference to a page batch's buffers
// once its write resolved (the capture reuses them). A sink that writes a stream
// is checked through the image its stream becomes (the factory's far end).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { fileops } from '../../io/fileops';
import { ImageReader } from '../../receiver/image-reader';
import { receive } from '../../receiver/receive';
import type { SnapshotSink } from '../../io/sink';
import type { StreamEvent, StreamTotals } from '../../format/events';
import { generate, makeHeader, pageBytes, type Generated } from './streams';
import { tmpDir } from './net';

export type SinkFactory = (imageDir: string) => Promise<SnapshotSink & { streamBytes?: number }>;

function tmpImage(): string {
  return path.join(tmpDir('sink'), 'img');
}

function chunked(buf: Buffer, size: number): Readable {
  const parts: Buffer[] = [];
  for (let o = 0; o < buf.length; o += size) parts.push(buf.subarray(o, o + size));
  return Readable.from(parts);
}

async function assertImageMatches(dir: string, g: Generated): Promise<void> {
  const img = await ImageReader.open(dir);
  try {
    assert.is(img.status.status, 'complete', img.status.reason);
    const buf = Buffer.alloc(g.pageSize);
    const data = fs.openSync(path.join(dir, 'data'), 'r');
    for (const [key, want] of g.expect) {
      const [b, p] = key.split(':').map(Number);
      const got = img.readPages(b, p, 1, buf);
      if (want) assert.ok(got.equals(want), `page ${key} differs`);
      else {
        assert.ok(got.equals(Buffer.alloc(g.pageSize)), `page ${key} should read as zero`);
        const off = img.blocks[b].base + p * g.pageSize;
        const next = fileops.seekData(data, off);
        assert.ok(next === -1 || next >= off + g.pageSize, `zero page ${key} must be a hole`);
      }
    }
    fs.closeSync(data);
  } finally {
    await img.close();
  }
}

export function sinkSuite(name: string, factory: SinkFactory) {
  const s = suite(`sink: ${name}`);

  s('stores the last version of every page, zero pages as holes', async () => {
    for (let seed = 11; seed <= 25; seed++) {
      const g = generate(seed, { compressLevel: seed % 2 ? 1 : undefined });
      const dir = tmpImage();
      const summary = await receive(chunked(g.stream, 1 + seed * 997), await factory(dir));
      assert.is(summary.status, 'complete', summary.reason);
      assert.is(summary.uniquePages, g.expect.size);
      assert.is(summary.duplicatePages, summary.pagesReceived - summary.uniquePages);
      assert.is(summary.streamBytes, g.stream.length);
      await assertImageMatches(dir, g);
    }
  });

  s('a truncated or corrupt stream leaves an incomplete image with the reason', async () => {
    const g = generate(31);
    let off = 0;
    for (const f of g.frames.slice(0, -1)) {
      off += f.length;
      const dir = tmpImage();
      const summary = await receive(chunked(g.stream.subarray(0, off), 4096), await factory(dir));
      assert.is(summary.status, 'incomplete');
      assert.match(summary.reason, /input ended before/);
      const img = await ImageReader.open(dir).catch(() => undefined);
      if (img) {
        assert.is(img.status.status, 'incomplete');
        await img.close();
      }
    }
    const bad = Buffer.from(g.stream);
    bad[g.frames[0].length + g.frames[1].length + 30] ^= 0xff;
    const summary = await receive(chunked(bad, 65536), await factory(tmpImage()));
    assert.is(summary.status, 'incomplete');
    assert.match(summary.reason, /bad checksum in BLOCKS frame/);
  });

  s('a page batch\'s buffers may be reused once its write resolved', async () => {
    const dir = tmpImage();
    const sink = await factory(dir);
    const ps = 4096;
    const pages = 64;
    const want = Array.from({ length: pages }, (_, i) => pageBytes(1000 + i, ps));
    const totals: StreamTotals = { pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0 };
    const events: StreamEvent[] = [{ type: 'header', header: makeHeader(ps) }, { type: 'blocks', blocks: [{ name: 'ram', length: pages * ps, address: 0 }] }];
    // One page per batch: well under a stream's highWaterMark, so a sink that
    // only waited for backpressure would still hold the buffer when it is reused.
    for (let p = 0; p < pages; p++) {
      const data = Buffer.from(want[p]); // overwritten after its write resolved
      events.push({ type: 'pages', batch: { block: 0, index: Uint32Array.of(p), zero: new Uint8Array(1), data } });
      totals.pages += 1;
      totals.batches += 1;
    }
    events.push({ type: 'end', totals });
    for (const ev of events) {
      await sink.write(ev);
      if (ev.type === 'pages') ev.batch.data.fill(0xa5);
    }
    const summary = await sink.finish();
    assert.is(summary.status, 'complete', summary.reason);
    const img = await ImageReader.open(dir);
    try {
      const buf = Buffer.alloc(ps);
      for (let p = 0; p < pages; p++) assert.ok(img.readPages(0, p, 1, buf).equals(want[p]), `page ${p} was changed after its write resolved`);
    } finally {
      await img.close();
    }
  });

  return s;
}
