// Chains of generations in a bgsnap stream (version 2, SPEC.md, "Chains of generations"):
// the payloads of the GENERATION and GENERATION_END frames, and the rules a
// decoder applies to a chain. Pure: no I/O.
//
//   GENERATION      u32 generation u32 nRemoved u64 instantMs, nRemoved × u32 block
//   GENERATION_END  u32 generation u32 blocksAdded u32 blocksRemoved u32 flags
//                   u64 pages u64 zeroPages u64 discarded u64 batches u64 states
//                   flags bit 0 PASS: a pre-copy pass (fuzzy pages, the base for
//                   later generations, not a snapshot); other bits must be 0
//   END (chain)     the version 1 END's five totals, then u64 generations
import type { StreamErrorCode } from './errors';
import type { GenerationStart, GenerationTotals } from './events';
import { MAX_BLOCKS } from './bgsnap-frame';

export const GENERATION_END_BYTES = 56;
export const CHAIN_END_BYTES = 48;
const TOTAL_KEYS = ['pages', 'zeroPages', 'discarded', 'batches', 'states'] as const;
// What GENERATION_END's counts are checked on: every field but the pass flag,
// which the sender declares and nothing that arrived can confirm.
const COUNTED = ['generation', 'blocksAdded', 'blocksRemoved', ...TOTAL_KEYS] as const;
export const GEN_FLAG_PASS = 1;

export function encodeGeneration(g: GenerationStart): Buffer {
  const p = Buffer.alloc(16 + g.removed.length * 4);
  p.writeUInt32LE(g.generation, 0);
  p.writeUInt32LE(g.removed.length, 4);
  p.writeBigUInt64LE(BigInt(Math.floor(g.instant)), 8);
  g.removed.forEach((b, i) => p.writeUInt32LE(b, 16 + i * 4));
  return p;
}

export function encodeGenerationEnd(t: GenerationTotals): Buffer {
  const p = Buffer.alloc(GENERATION_END_BYTES);
  p.writeUInt32LE(t.generation, 0);
  p.writeUInt32LE(t.blocksAdded, 4);
  p.writeUInt32LE(t.blocksRemoved, 8);
  p.writeUInt32LE(t.pass ? GEN_FLAG_PASS : 0, 12);
  TOTAL_KEYS.forEach((k, i) => p.writeBigUInt64LE(BigInt(t[k]), 16 + i * 8));
  return p;
}

export function emptyGenerationTotals(generation: number): GenerationTotals {
  return { generation, blocksAdded: 0, blocksRemoved: 0, pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0 };
}

type Fail = (code: StreamErrorCode, detail: string) => never;

// A decoder's view of a chain: which blocks exist and are live, which
// generation is open and what it carried so far. Every frame of a chain goes
// through here before it becomes an event, so a consumer never sees a page of a
// removed block, a frame outside a generation, or a generation whose end
// record does not match what arrived.
export class ChainRules {
  readonly blockPages: number[] = []; // pages per block, whole chain, by block number
  private readonly removed = new Set<number>();
  private open: GenerationTotals | undefined;
  private sawBlocks = false;
  private last = 0; // the last generation that ended
  private lastPass = false; // ... and whether it was a pre-copy pass

  constructor(private readonly fail: Fail) {}

  get current(): number | undefined {
    return this.open?.generation;
  }

  get generations(): number {
    return this.last;
  }

  // Frames other than HEADER, GENERATION and END belong inside a generation.
  inside(what: string): void {
    if (!this.open) this.fail('MALFORMED', `${what} frame outside a generation (chain streams put it between GENERATION and GENERATION_END)`);
  }

  start(p: Buffer): GenerationStart {
    if (this.open) this.fail('MALFORMED', `GENERATION ${this.open.generation + 1} before generation ${this.open.generation} ended`);
    if (p.length < 16) this.fail('MALFORMED', `GENERATION frame has ${p.length} bytes, needs at least 16`);
    const generation = p.readUInt32LE(0);
    const n = p.readUInt32LE(4);
    if (p.length !== 16 + n * 4) this.fail('MALFORMED', `GENERATION frame: ${n} removed blocks need ${16 + n * 4} bytes, frame has ${p.length}`);
    if (generation !== this.last + 1) this.fail('MALFORMED', `generation ${generation} follows generation ${this.last}; generations are consecutive from 1`);
    const removed: number[] = [];
    for (let i = 0; i < n; i++) {
      const b = p.readUInt32LE(16 + i * 4);
      if (b >= this.blockPages.length || this.removed.has(b)) this.fail('BLOCK_MISMATCH', `generation ${generation} removes block ${b}, which is not live`);
      this.removed.add(b);
      removed.push(b);
    }
    this.open = { ...emptyGenerationTotals(generation), blocksRemoved: n };
    this.sawBlocks = false;
    return { generation, instant: Number(p.readBigUInt64LE(8)), removed };
  }

  // A BLOCKS frame in a chain adds blocks, numbered after every earlier one.
  addBlocks(pages: number[]): void {
    this.inside('BLOCKS');
    if (this.sawBlocks) this.fail('BLOCK_MISMATCH', `second BLOCKS frame in generation ${this.open!.generation}`);
    if (this.blockPages.length + pages.length > MAX_BLOCKS) this.fail('TOO_LARGE', `the chain would have ${this.blockPages.length + pages.length} blocks, limit ${MAX_BLOCKS}`);
    this.sawBlocks = true;
    this.blockPages.push(...pages);
    this.open!.blocksAdded += pages.length;
  }

  // Pages and discards name a block live in the open generation.
  liveBlock(block: number, what: string): number {
    this.inside(what);
    const pages = this.blockPages[block];
    if (pages === undefined) this.fail('BLOCK_MISMATCH', `${what} frame names block ${block}; the chain has ${this.blockPages.length}`);
    if (this.removed.has(block)) this.fail('BLOCK_MISMATCH', `${what} frame names block ${block}, removed before generation ${this.open!.generation}`);
    return pages;
  }

  count(k: 'pages' | 'zeroPages' | 'discarded' | 'batches' | 'states', n: number): void {
    if (this.open) this.open[k] += n;
  }

  end(p: Buffer): GenerationTotals {
    this.inside('GENERATION_END');
    if (p.length !== GENERATION_END_BYTES) this.fail('MALFORMED', `GENERATION_END frame has ${p.length} bytes, expected ${GENERATION_END_BYTES}`);
    const got = this.open!;
    const flags = p.readUInt32LE(12);
    // Unknown bits are refused, not ignored: a later flag may change what the
    // generation means, and reading it as a snapshot would then be wrong.
    if (flags & ~GEN_FLAG_PASS) this.fail('MALFORMED', `GENERATION_END of generation ${got.generation} has flags 0x${flags.toString(16)}; this build knows only bit 0 (PASS)`);
    const t: GenerationTotals = {
      generation: p.readUInt32LE(0), blocksAdded: p.readUInt32LE(4), blocksRemoved: p.readUInt32LE(8),
      ...(Object.fromEntries(TOTAL_KEYS.map((k, i) => [k, Number(p.readBigUInt64LE(16 + i * 8))])) as Record<(typeof TOTAL_KEYS)[number], number>),
      ...(flags & GEN_FLAG_PASS ? { pass: true } : {}),
    };
    for (const k of COUNTED) {
      if (t[k] !== got[k]) this.fail('TOTALS_MISMATCH', `GENERATION_END of generation ${got.generation} says ${k}=${t[k]}, generation carried ${got[k]}`);
    }
    this.last = got.generation;
    this.lastPass = t.pass === true;
    this.open = undefined;
    return t;
  }

  // The chain's END comes between generations and counts them.
  checkEnd(generations: number): void {
    if (this.open) this.fail('MALFORMED', `END frame inside generation ${this.open.generation}`);
    if (generations !== this.last) this.fail('TOTALS_MISMATCH', `END frame says generations=${generations}, stream carried ${this.last}`);
    // A pass is only the base of what follows: a chain ending on one holds no snapshot after it.
    if (this.lastPass) this.fail('MALFORMED', `END frame right after generation ${this.last}, a pre-copy pass; a pass must be followed by a generation`);
  }
}
