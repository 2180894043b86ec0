// Test helpers for the QEMU codec: a generator of random but valid
// QEMU 7.2 streams (built with the real encoder), and a canonical form of decoder
// events so two decodes can be compared exactly.

import { createHash } from 'node:crypto';
import { prng } from './prng.js';
import type { StreamEvent } from '../../format/events.js';
import { QemuDecoder } from '../../format/qemu.js';
import { RamPartWriter, encodePreamble, encodeRamStart, type RamBlockSpec } from '../../format/qemu-encode.js';

export const int = (r: () => number, n: number) => Math.floor(r() * n);

export interface GenRecord { block: number; index: number; zero: boolean; data?: Buffer }

export interface GenStream {
  bytes: Buffer;
  blocks: RamBlockSpec[];
  records: GenRecord[];
  preamble: Buffer;
  tail: Buffer;
  ramStart: number; // offset where RAM START begins = preamble.length
}

// Payload bytes avoid 0x00 and 0x7e so no cut inside a device section can look
// like "footer, EOF" to the decoder's end-of-tail check.
function deviceTail(r: () => number, firstId: number): Buffer {
  const parts: Buffer[] = [];
  const n = 1 + int(r, 3);
  for (let i = 0; i < n; i++) {
    const name = Buffer.from(`dev${i}`, 'latin1');
    const head = Buffer.alloc(1 + 4 + 1 + name.length + 8);
    head[0] = 0x04;
    head.writeUInt32BE(firstId + i, 1);
    head[5] = name.length;
    name.copy(head, 6);
    head.writeUInt32BE(1, 6 + name.length + 4);
    const payload = Buffer.from(Array.from({ length: 1 + int(r, 40) }, () => 1 + int(r, 0x7d)));
    const foot = Buffer.from([0x7e, 0, 0, 0, 0]);
    foot.writeUInt32BE(firstId + i, 1);
    parts.push(head, payload, foot);
  }
  const json = Buffer.from(JSON.stringify({ page_size: 4096, devices: [] }));
  const vm = Buffer.alloc(5);
  vm[0] = 0x06;
  vm.writeUInt32BE(json.length, 1);
  parts.push(Buffer.from([0x00]), vm, json);
  return Buffer.concat(parts);
}

export function randomPage(r: () => number): Buffer {
  const p = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i += 4) p.writeUInt32LE((r() * 4294967296) >>> 0, i);
  return p;
}

export function genBlocks(r: () => number, maxPages = 40): RamBlockSpec[] {
  const names = ['pc.ram', 'pc.bios', '/rom@etc/acpi/tables', 'pc.rom', 'x'.repeat(255), '0000:00:02.0/vga.vram'];
  const n = 1 + int(r, 4);
  return names.slice(0, n).map((name) => ({ name, length: 4096 * (1 + int(r, maxPages)) }));
}

// Random records (duplicates, zeros, any order), written as `parts` PART sections.
export function genStream(seed: number, opts: { records?: number; parts?: number; maxPages?: number } = {}): GenStream {
  const r = prng(seed);
  const blocks = genBlocks(r, opts.maxPages);
  const count = opts.records ?? int(r, 60);
  const records: GenRecord[] = [];
  let block = int(r, blocks.length);
  for (let i = 0; i < count; i++) {
    if (r() < 0.3) block = int(r, blocks.length); // runs of one block, so CONTINUE is common
    const zero = r() < 0.3;
    records.push({ block, index: int(r, blocks[block].length / 4096), zero, data: zero ? undefined : randomPage(r) });
  }
  const sectionId = 1 + int(r, 200);
  const preamble = encodePreamble('pc-i440fx-7.2');
  const ramStart = encodeRamStart(blocks, { sectionId, instanceId: 0, version: 4 });
  const parts = writeParts(blocks, sectionId, records, opts.parts ?? 1 + int(r, 4));
  const tail = deviceTail(r, sectionId + 1);
  const bytes = Buffer.concat([preamble, ramStart, ...parts, tail]);
  return { bytes, blocks, records, preamble, tail, ramStart: preamble.length };
}

export function writeParts(blocks: RamBlockSpec[], sectionId: number, records: GenRecord[], parts: number): Buffer[] {
  const w = new RamPartWriter(blocks, sectionId);
  const out: Buffer[] = [];
  const per = Math.max(1, Math.ceil(records.length / parts));
  for (let s = 0; s < records.length || s === 0; s += per) {
    out.push(w.begin());
    for (const rec of records.slice(s, s + per)) {
      const idx = Uint32Array.of(rec.index);
      out.push(rec.zero ? w.zeros(rec.block, idx) : w.pages(rec.block, idx, rec.data!));
    }
    out.push(w.end());
  }
  return out;
}

// Deterministic decoder: fixed id and time so event lists compare exactly.
export function decoder(): QemuDecoder {
  return new QemuDecoder({ snapshotId: '0'.repeat(32), created: 1 });
}

export function decodeChunks(chunks: Buffer[]): StreamEvent[] {
  const d = decoder();
  const ev: StreamEvent[] = [];
  for (const c of chunks) ev.push(...d.push(c));
  ev.push(...d.finish());
  return ev;
}

export function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  const sorted = [...cuts].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of sorted) {
    out.push(buf.subarray(prev, c));
    prev = c;
  }
  out.push(buf.subarray(prev));
  return out;
}

// A comparable string per event; page data reduced to a hash.
export function canon(ev: StreamEvent[]): string[] {
  return ev.map((e) => {
    if (e.type === 'pages') {
      const b = e.batch;
      const h = createHash('sha1').update(b.data).digest('hex');
      return `pages ${b.block} [${Array.from(b.index).join(',')}] [${Array.from(b.zero).join('')}] ${h}`;
    }
    if (e.type === 'state') return `state ${e.state.kind} ${e.state.data.toString('hex')}`;
    return JSON.stringify(e);
  });
}

// The records as decoded, flattened out of the batches.
export function flatten(ev: StreamEvent[]): GenRecord[] {
  const out: GenRecord[] = [];
  for (const e of ev) {
    if (e.type !== 'pages') continue;
    let d = 0;
    const { block, index, zero, data } = e.batch;
    for (let i = 0; i < index.length; i++) {
      const isZero = zero[i] === 1;
      out.push({ block, index: index[i], zero: isZero, data: isZero ? undefined : data.subarray(d, (d += 4096)) });
    }
  }
  return out;
}
