// Builds a pre-copy chain (format/SPEC.md, "Pre-copy passes") with the real
// encoder, the way an iterative pre-copy capture produces one: a model of the
// target's memory is written to WHILE each pass reads it, so pass 1 sends
// every page, each later pass the pages written since they were read, and a
// page written during a pass is sometimes read again in the same pass (the
// same page twice in one generation, once twice in one PAGES frame). The last
// generation is the freeze: the target stopped, it sends what is still dirty,
// drops one page (a discard) and zeroes one that held data. What the snapshot
// must read back is the memory at the freeze, exactly; what the last pass
// alone leaves differs from it (the test checks the override is real).
import { BgsnapEncoder } from '../../format/bgsnap';
import { makeHeader, pageBytes } from './streams';
import { prng, randInt } from './prng';

const PS = 4096;
export const RAM_PAGES = 48;
export const ROM_PAGES = 4;
type Page = Buffer | null | 'discarded';

export interface PassChain {
  stream: Buffer;
  genStarts: number[]; // byte offset of each generation's GENERATION frame
  ram: Buffer; // the RAM block at the freeze, as raw bytes (zero, discarded: zero bytes)
  rom: Buffer; // the ROM block, sent in pass 1 only and never written
  lastPass: Buffer; // RAM as the passes alone leave it
  distinct: number[]; // per generation: distinct pages it sent
  dataPages: number[]; // per generation: of which hold data (their last record)
  repeats: number; // page records that repeated a page in the same generation
}

class Gen {
  readonly last = new Map<number, Buffer | null>(); // RAM page -> its last record in this generation
  records = 0;
}

export function buildPassChain(seed: number, passes = 3): PassChain {
  const rnd = prng(seed);
  let version = seed * 100000;
  const write = (zeroRate: number): Buffer | null => (rnd() < zeroRate ? null : pageBytes(++version, PS));
  const mem: Page[] = Array.from({ length: RAM_PAGES }, (_, p) => (p % 5 === 0 ? null : write(0)));
  const view: Page[] = new Array<Page>(RAM_PAGES).fill(null); // each page's newest record so far
  const rom = Array.from({ length: ROM_PAGES }, () => pageBytes(++version, PS));
  const enc = new BgsnapEncoder({ chain: true });
  const parts: Buffer[] = [enc.magic(), ...enc.header({ ...makeHeader(PS), label: 'pass-chain' })];
  const genStarts: number[] = [];
  const gens: Gen[] = [];
  const send = (g: Gen, pages: number[], versions: (Buffer | null)[]) => {
    parts.push(...enc.pages({ block: 0, index: Uint32Array.from(pages), zero: Uint8Array.from(versions, (v) => (v ? 0 : 1)), data: Buffer.concat(versions.filter((v): v is Buffer => v !== null)) }));
    pages.forEach((p, i) => (g.last.set(p, versions[i]), (view[p] = versions[i])));
    g.records += pages.length;
  };
  let dirty = Array.from({ length: RAM_PAGES }, (_, p) => p);
  for (let k = 1; k <= passes; k++) {
    genStarts.push(parts.reduce((n, b) => n + b.length, 0));
    const g = new Gen();
    gens.push(g);
    parts.push(...enc.generation({ generation: k, instant: 1_800_000_000_000 + k, removed: [] }));
    if (k === 1) {
      parts.push(...enc.blocks([{ name: 'ram', length: RAM_PAGES * PS, address: 0 }, { name: 'rom', length: ROM_PAGES * PS, address: 0xfff00000 }]));
      parts.push(...enc.pages({ block: 1, index: Uint32Array.from(rom.keys()), zero: new Uint8Array(ROM_PAGES), data: Buffer.concat(rom) }));
    }
    if (k > 1) dirty = writeBetween(rnd, mem, dirty, write);
    dirty = runPass(rnd, shuffle(rnd, dirty), mem, g, send, write);
    parts.push(...enc.generationEnd({ pass: true }));
  }
  const lastPass = raw(view);
  dirty = writeBetween(rnd, mem, dirty, write);
  // The freeze: the target stops; a page it held data in becomes zero and
  // another is dropped (MADV_DONTNEED) before the capture reads them.
  genStarts.push(parts.reduce((n, b) => n + b.length, 0));
  const g = new Gen();
  gens.push(g);
  parts.push(...enc.generation({ generation: passes + 1, instant: 1_800_000_000_000 + passes + 1, removed: [] }));
  const zeroed = dirty.find((p) => view[p] !== null) ?? [...view.keys()].find((p) => view[p] !== null)!;
  mem[zeroed] = null;
  const dropped = [...view.keys()].find((p) => view[p] !== null && p !== zeroed && !dirty.includes(p));
  if (dropped === undefined) throw new Error(`seed ${seed}: every page with data is dirty at the freeze; pick another seed`);
  mem[dropped] = 'discarded';
  const still = [...new Set([...dirty, zeroed])].sort((a, b) => a - b);
  for (let i = 0; i < still.length; i += 2) send(g, still.slice(i, i + 2), still.slice(i, i + 2).map((p) => mem[p] as Buffer | null));
  parts.push(...enc.discard({ block: 0, index: Uint32Array.of(dropped) }));
  parts.push(...enc.generationEnd(), ...enc.end());
  return {
    stream: Buffer.concat(parts), genStarts, ram: raw(mem), rom: Buffer.concat(rom), lastPass,
    distinct: gens.map((x) => x.last.size + (x === gens[0] ? ROM_PAGES : 0)),
    dataPages: gens.map((x) => [...x.last.values()].filter((v) => v !== null).length + (x === gens[0] ? ROM_PAGES : 0)),
    repeats: gens.reduce((n, x) => n + x.records - x.last.size, 0),
  };
}

// One pass over `order`, in batches of up to 6 pages; after each batch the
// target writes a few pages. A written page this pass does not read later is
// read again at once (then clean) or left for the next generation (dirty); one
// batch carries a page twice, the stale read first.
function runPass(rnd: () => number, order: number[], mem: Page[], g: Gen, send: (g: Gen, p: number[], v: (Buffer | null)[]) => void, write: (z: number) => Buffer | null): number[] {
  const pending = new Set(order); // still to be read in this pass
  const dirty = new Set<number>();
  let twice = false;
  for (let i = 0; i < order.length; i += 6) {
    const pages = order.slice(i, i + 6);
    const versions = pages.map((p) => mem[p] as Buffer | null);
    if (!twice && pages.length > 1) {
      const p = pages[0];
      mem[p] = write(0.2); // written between two reads of the same batch: the later read wins
      pages.push(p), versions.push(mem[p] as Buffer | null);
      twice = true;
    }
    send(g, pages, versions);
    pages.forEach((p) => pending.delete(p));
    for (let w = randInt(rnd, 1, 3); w > 0; w--) {
      const p = randInt(rnd, 0, mem.length - 1);
      mem[p] = write(0.2);
      if (pending.has(p)) continue; // this pass reads it later, with this content
      if (rnd() < 0.5) (send(g, [p], [mem[p] as Buffer | null]), dirty.delete(p));
      else dirty.add(p);
    }
  }
  return [...dirty];
}

// The target runs on between two generations: a few more pages written, dirty.
function writeBetween(rnd: () => number, mem: Page[], dirty: number[], write: (z: number) => Buffer | null): number[] {
  const out = new Set(dirty);
  for (let w = randInt(rnd, 3, 6); w > 0; w--) {
    const p = randInt(rnd, 0, mem.length - 1);
    mem[p] = write(0.2);
    out.add(p);
  }
  return [...out];
}

function shuffle(rnd: () => number, a: number[]): number[] {
  const out = [...a];
  for (let i = out.length - 1; i > 0; i--) {
    const j = randInt(rnd, 0, i);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

function raw(pages: Page[]): Buffer {
  return Buffer.concat(pages.map((p) => (Buffer.isBuffer(p) ? p : Buffer.alloc(PS))));
}
