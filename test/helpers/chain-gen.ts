// Builds synthetic chain streams (version 2) with the real encoder: random
// generations that add and remove blocks, rewrite pages (data and zero) and
// discard some, each with its own state blob, plus what every generation must
// materialise to: for each live block, each page's bytes (null = zero page,
// 'discarded' = not part of that generation).
import { BgsnapEncoder } from '../../format/bgsnap';
import type { BlockInfo } from '../../format/events';
import { makeHeader, pageBytes } from './streams';
import { prng, randInt } from './prng';

export type PageValue = Buffer | null | 'discarded';

export interface GenExpect {
  instant: number;
  live: number[]; // chain block numbers live in this generation
  pages: Map<string, PageValue>; // "block:page" for every page of every live block
  state: Buffer;
  dataPages: number; // data pages this generation stored (its own, not inherited)
}

export interface GeneratedChain {
  stream: Buffer;
  genStarts: number[]; // byte offset where each generation's GENERATION frame starts
  blocks: BlockInfo[]; // whole chain, by block number
  gens: GenExpect[];
  pageSize: number;
}

const PS = 4096;

export function generateChain(seed: number, generations = 5): GeneratedChain {
  const rnd = prng(seed);
  const enc = new BgsnapEncoder({ chain: true });
  const parts: Buffer[] = [enc.magic(), ...enc.header({ ...makeHeader(PS), source: 'process' })];
  const blocks: BlockInfo[] = [];
  const live = new Set<number>();
  let current = new Map<string, PageValue>();
  const gens: GenExpect[] = [];
  const genStarts: number[] = [];
  for (let g = 1; g <= generations; g++) {
    genStarts.push(parts.reduce((s, p) => s + p.length, 0));
    const removed = g === 1 ? [] : [...live].filter(() => rnd() < 0.25).slice(0, Math.max(0, live.size - 1));
    removed.forEach((b) => live.delete(b));
    const next = new Map([...current].filter(([k]) => live.has(Number(k.split(':')[0]))));
    const instant = 1_800_000_000_000 + g * 1000;
    parts.push(...enc.generation({ generation: g, instant, removed }));
    const added: BlockInfo[] = Array.from({ length: g === 1 ? randInt(rnd, 2, 4) : randInt(rnd, 0, 2) }, () => ({
      name: `blk${blocks.length}`, length: randInt(rnd, 1, 24) * PS, address: 0x10000000 + blocks.length * 0x100000,
    }));
    if (added.length || g === 1) parts.push(...enc.blocks(added));
    let dataPages = 0;
    for (const b of added) {
      const id = blocks.push(b) - 1;
      live.add(id);
      dataPages += sendPages(enc, parts, rnd, id, range(b.length / PS), next, g, 0.2);
    }
    for (const id of [...live].filter((b) => !added.some((a) => a === blocks[b]))) {
      const pages = range(blocks[id].length / PS).filter(() => rnd() < 0.3);
      dataPages += sendPages(enc, parts, rnd, id, pages, next, g, 0.1);
      const dropped = range(blocks[id].length / PS).filter((p) => !pages.includes(p) && rnd() < 0.05);
      if (dropped.length) {
        parts.push(...enc.discard({ block: id, index: Uint32Array.from(dropped) }));
        dropped.forEach((p) => next.set(`${id}:${p}`, 'discarded'));
      }
    }
    const state = Buffer.from(`state of generation ${g}`);
    parts.push(...enc.state({ kind: 'test.state', data: state }));
    parts.push(...enc.generationEnd());
    gens.push({ instant, live: [...live].sort((a, b) => a - b), pages: next, state, dataPages });
    current = next;
  }
  parts.push(...enc.end());
  return { stream: Buffer.concat(parts), genStarts, blocks, gens, pageSize: PS };
}

function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
}

// Sends the pages in one or two batches, some zero; returns how many hold data.
function sendPages(enc: BgsnapEncoder, parts: Buffer[], rnd: () => number, block: number, pages: number[], into: Map<string, PageValue>, g: number, zeroRate: number): number {
  if (!pages.length) return 0;
  const zero = Uint8Array.from(pages, () => (rnd() < zeroRate ? 1 : 0));
  const data: Buffer[] = [];
  pages.forEach((p, i) => {
    const v = zero[i] ? null : pageBytes(g * 100003 + block * 1009 + p, PS);
    if (v) data.push(v);
    into.set(`${block}:${p}`, v);
  });
  parts.push(...enc.pages({ block, index: Uint32Array.from(pages), zero, data: Buffer.concat(data) }));
  return data.length;
}
