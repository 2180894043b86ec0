// Stands in for the capture engine until it emits generations itself
// (`bgsnap-capture --every`): builds a chain stream from successive REAL full
// snapshots (`bgsnap-capture --pid` stream files) of one process. Generation 1
// is the first snapshot whole; generation k holds what differs from snapshot
// k-1: blocks (mappings, matched by name, address and length) that are new
// are sent whole, vanished ones are removed, and in the others every page
// whose content, zero-ness or discard changed is sent (a discard as a
// discard). Each generation carries its snapshot's process state with block
// numbers made the chain's. The engine will send the pages *written* (which
// may include rewrites with equal bytes); this sends the pages that differ.
import * as fs from 'node:fs';
import { BgsnapDecoder, BgsnapEncoder } from '../../format/bgsnap';
import type { BlockInfo, StateBlob, StreamEvent, StreamHeader } from '../../format/events';
import { decodeProcessState, encodeProcessState, STATE_KIND } from '../../format/process-state';

const PS = 4096;
type Page = Buffer | null | 'discarded' | undefined;

export interface Snapshot {
  header: StreamHeader;
  blocks: BlockInfo[];
  pages: Page[][]; // per block, per page
  states: StateBlob[];
}

export function readSnapshot(file: string): Snapshot {
  const dec = new BgsnapDecoder();
  const events: StreamEvent[] = [...dec.push(fs.readFileSync(file)), ...dec.finish()];
  const s: Snapshot = { header: undefined as unknown as StreamHeader, blocks: [], pages: [], states: [] };
  for (const ev of events) {
    if (ev.type === 'header') s.header = ev.header;
    else if (ev.type === 'blocks') (s.blocks = ev.blocks), (s.pages = ev.blocks.map((b) => new Array<Page>(b.length / PS)));
    else if (ev.type === 'state') s.states.push({ kind: ev.state.kind, data: Buffer.from(ev.state.data) });
    else if (ev.type === 'discard') ev.batch.index.forEach((p) => (s.pages[ev.batch.block][p] ??= 'discarded'));
    else if (ev.type === 'pages') {
      let d = 0;
      ev.batch.index.forEach((p, i) => (s.pages[ev.batch.block][p] = ev.batch.zero[i] ? null : Buffer.from(ev.batch.data.subarray(d * PS, ++d * PS))));
    }
  }
  return s;
}

const keyOf = (b: BlockInfo) => `${b.name}|${b.address}|${b.length}`;

function same(a: Page, b: Page): boolean {
  return a === b || (Buffer.isBuffer(a) && Buffer.isBuffer(b) && a.equals(b));
}

export interface ChainBuild {
  stream: Buffer;
  genStarts: number[]; // byte offset of each generation's first frame
  perGeneration: { pages: number; dataPages: number; added: number; removed: number }[];
}

export function chainFromSnapshots(snaps: Snapshot[]): ChainBuild {
  const enc = new BgsnapEncoder({ chain: true });
  const parts: Buffer[] = [enc.magic(), ...enc.header(snaps[0].header)];
  const live = new Map<string, number>(); // block key -> chain block number
  let nextId = 0;
  let prev: Snapshot | undefined;
  const genStarts: number[] = [];
  const perGeneration: ChainBuild['perGeneration'] = [];
  snaps.forEach((s, k) => {
    genStarts.push(parts.reduce((n, p) => n + p.length, 0));
    const keys = s.blocks.map(keyOf);
    const removed = [...live].filter(([key]) => !keys.includes(key)).map(([key, id]) => (live.delete(key), id));
    parts.push(...enc.generation({ generation: k + 1, instant: s.header.created, removed }));
    const added = s.blocks.filter((b) => !live.has(keyOf(b)));
    parts.push(...enc.blocks(added));
    added.forEach((b) => live.set(keyOf(b), nextId++));
    const stats = { pages: 0, dataPages: 0, added: added.length, removed: removed.length };
    s.blocks.forEach((b, i) => {
      const before = prev && !added.includes(b) ? prev.pages[prev.blocks.findIndex((x) => keyOf(x) === keyOf(b))] : undefined;
      sendChanged(enc, parts, live.get(keyOf(b))!, s.pages[i], before, stats);
    });
    for (const st of s.states) parts.push(...enc.state(st.kind === STATE_KIND ? { kind: st.kind, data: renumber(st.data, s, live) } : st));
    parts.push(...enc.generationEnd());
    perGeneration.push(stats);
    prev = s;
  });
  parts.push(...enc.end());
  return { stream: Buffer.concat(parts), genStarts, perGeneration };
}

function sendChanged(enc: BgsnapEncoder, parts: Buffer[], id: number, now: Page[], before: Page[] | undefined, stats: { pages: number; dataPages: number }): void {
  const index: number[] = [], zero: number[] = [], data: Buffer[] = [], discards: number[] = [];
  now.forEach((p, i) => {
    if (p === undefined || (before && same(p, before[i]))) return;
    if (p === 'discarded') return void discards.push(i);
    index.push(i);
    zero.push(p ? 0 : 1);
    if (p) data.push(p);
  });
  for (let o = 0; o < index.length; o += 256) {
    const n = Math.min(256, index.length - o);
    const z = zero.slice(o, o + n);
    const d = data.splice(0, z.filter((x) => !x).length);
    parts.push(...enc.pages({ block: id, index: Uint32Array.from(index.slice(o, o + n)), zero: Uint8Array.from(z), data: Buffer.concat(d) }));
  }
  if (discards.length) parts.push(...enc.discard({ block: id, index: Uint32Array.from(discards) }));
  stats.pages += index.length;
  stats.dataPages += zero.filter((x) => !x).length;
}

function renumber(blob: Buffer, s: Snapshot, live: Map<string, number>): Buffer {
  const st = decodeProcessState(blob);
  for (const m of st.maps) m.block = m.block >= 0 ? live.get(keyOf(s.blocks[m.block]))! : -1;
  return encodeProcessState(st);
}
