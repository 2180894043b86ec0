// The saver checksums each data page right after reading it (capture/native
// saver.cc, SumPages), and the stream encoder combines those CRCs into the
// frame checksum instead of reading the pages again. Checked on a real target
// whose pages mix holes, zeroed pages (which make the saver move data and its
// checksums down in a batch) and data a thread keeps writing (the fault path):
// every page's CRC is zlib's CRC of that page, and every PAGES frame is the
// same, byte for byte, as the one encoded by reading the pages.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as zlib from 'node:zlib';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { BgsnapEncoder, BgsnapDecoder } from '../format/bgsnap';
import type { PageBatch, StreamEvent } from '../format/events';
import { buildTarget, isAlive } from './process-target';

const PAGE = 4096;

async function startZeromix(mib: number) {
  const child = spawn(buildTarget('zeromix'), [String(mib)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [line] = (await once(child.stdout!, 'data')) as [Buffer];
  const m = /ready pid=(\d+) base=0x([0-9a-f]+) size=(\d+)/.exec(line.toString());
  if (!m) throw new Error(`zeromix said: ${line}`);
  return { pid: Number(m[1]), base: parseInt(m[2], 16), size: Number(m[3]) };
}

interface Seen { pages: number; dataPages: number; moved: number; frames: number; bad: string[] }

// One batch: its CRCs against zlib's, and its frame against a frame encoded
// without them. The read-only mappings, copied in JavaScript after the freeze
// (capture/readonly-maps.ts), come without CRCs.
function checkBatch(b: PageBatch, withCrcs: BgsnapEncoder, reading: BgsnapEncoder, s: Seen, readOnly: boolean): Buffer[] {
  const n = b.data.length / PAGE;
  if (readOnly !== !b.crcs || (b.crcs && b.crcs.length !== n)) s.bad.push(`batch of ${n} data pages (read-only: ${readOnly}) carries ${b.crcs?.length} CRCs`);
  for (let i = 0; i < n && b.crcs; i++) {
    const want = zlib.crc32(b.data.subarray(i * PAGE, (i + 1) * PAGE));
    if (b.crcs[i] !== want && s.bad.length < 5) s.bad.push(`block ${b.block} data page ${i}: CRC ${b.crcs[i]} != ${want}`);
  }
  // A zero record read as zero, then data after it in the same batch: the data moved down.
  for (let i = 1; i < b.index.length; i++) if (b.zero[i - 1] && !b.zero[i] && b.index[i - 1] % 4 === 1) s.moved++;
  const framed = withCrcs.pages(b);
  const plain = reading.pages({ block: b.block, index: b.index, zero: b.zero, data: b.data });
  if (!Buffer.concat(framed).equals(Buffer.concat(plain)) && s.bad.length < 5) s.bad.push(`block ${b.block}: frame differs from the one read`);
  if (readOnly) return framed;
  s.pages += b.index.length;
  s.dataPages += n;
  s.frames++;
  return framed;
}

function encode(enc: BgsnapEncoder, ev: StreamEvent): Buffer[] {
  switch (ev.type) {
    case 'header': return enc.header(ev.header);
    case 'blocks': return enc.blocks(ev.blocks);
    case 'state': return enc.state(ev.state);
    case 'discard': return enc.discard(ev.batch);
    case 'end': return enc.end();
    default: throw new Error(`unexpected ${ev.type} in a process capture`);
  }
}

async function captureChecked(zeroCopy: boolean): Promise<Seen> {
  const t = await startZeromix(64);
  const s: Seen = { pages: 0, dataPages: 0, moved: 0, frames: 0, bad: [] };
  const withCrcs = new BgsnapEncoder(), reading = new BgsnapEncoder();
  const dec = new BgsnapDecoder();
  try {
    const cap = captureProcess(t.pid, { zeroCopy, bufferMb: 16 });
    let decoded = 0, readOnlyFrom = Infinity;
    const feed = (parts: Buffer[]) => { for (const part of parts) decoded += dec.push(Buffer.from(part)).length; };
    for await (const ev of cap.events as AsyncIterable<StreamEvent>) {
      if (ev.type === 'header') { reading.header(ev.header); feed([withCrcs.magic()]); }
      if (ev.type === 'blocks') readOnlyFrom = ev.blocks.length - cap.stats().readOnly.blocks;
      // The decoder checks each frame's checksum: a wrong combined CRC throws here.
      if (ev.type === 'pages') feed(checkBatch(ev.batch, withCrcs, reading, s, ev.batch.block >= readOnlyFrom));
      else feed(encode(withCrcs, ev));
      if (ev.type === 'pages' && zeroCopy) cap.release(ev.batch);
    }
    dec.finish();
    assert.ok(decoded > s.frames, `every frame decoded (${decoded} events)`);
    assert.is(cap.stats().state, 'done');
    assert.ok(cap.stats().pagesByFault > 0, 'the writer faulted: the fault path saved pages too');
  } finally {
    assert.ok(isAlive(t.pid), 'target alive');
    process.kill(t.pid, 'SIGKILL');
  }
  return s;
}

for (const zeroCopy of [true, false]) {
  test(`page CRCs from the saver equal zlib's and frames are unchanged (${zeroCopy ? 'zero-copy batches' : 'copied batches'})`, async () => {
    const s = await captureChecked(zeroCopy);
    assert.equal(s.bad, [], s.bad.join('; '));
    assert.ok(s.dataPages >= (64 << 20) / PAGE / 2, `data pages seen: ${s.dataPages}`);
    assert.ok(s.moved > 0, 'zeroed pages read before data pages in one batch (data and CRCs moved down)');
    console.log(`  ${s.frames} frames, ${s.pages} page records, ${s.dataPages} data pages, ${s.moved} moves after a zeroed page`);
  });
}

test.run();
