// Read-only mappings in a chain (capture/readonly-maps.ts: RELRO, [vdso]): they
// are not write-protected, so each generation copies them again after its
// freeze and sends only the pages that differ from what the chain holds. A
// mapping seen before (same name, address and length) keeps its block number;
// a new one is added whole; one gone is removed.
import type { ReadOnlyCopy } from './readonly-maps';
import type { BlockInfo, DiscardBatch, PageBatch } from '../format/events';

const PAGE = 4096;
type Page = Buffer | null | 'discarded'; // data, zero, unreadable
interface Known { id: number; pages: Page[] }
export type ReadOnlyBlocks = Map<string, Known>;

export interface ReadOnlyDiff {
  ids: number[]; // chain block number of each block of the copy
  removed: number[];
  added: BlockInfo[];
  batches: PageBatch[];
  discards: DiscardBatch[];
}

const keyOf = (b: BlockInfo) => `${b.name}|${b.address}|${b.length}`;

// The copy's pages of each of its blocks.
function pagesOf(copy: ReadOnlyCopy): Page[][] {
  const out: Page[][] = copy.blocks.map((b) => new Array<Page>(b.length / PAGE).fill(null));
  for (const b of copy.batches) {
    let d = 0;
    b.index.forEach((p, i) => (out[b.block][p] = b.zero[i] ? null : Buffer.from(b.data.subarray(d * PAGE, ++d * PAGE))));
  }
  for (const u of copy.unreadable) u.index.forEach((p) => (out[u.block][p] = 'discarded'));
  return out;
}

const same = (a: Page | undefined, b: Page) => a === b || (Buffer.isBuffer(a) && Buffer.isBuffer(b) && a.equals(b));

// Updates `known` to the copy; `next.id` is the chain's next block number,
// taken by added blocks after the engine's own (the caller's BLOCKS order).
export function diffReadOnly(known: ReadOnlyBlocks, copy: ReadOnlyCopy, next: { id: number }): ReadOnlyDiff {
  const d: ReadOnlyDiff = { ids: [], removed: [], added: [], batches: [], discards: [] };
  const now = pagesOf(copy);
  const keys = copy.blocks.map(keyOf);
  for (const [key, k] of known) if (!keys.includes(key)) (d.removed.push(k.id), known.delete(key));
  copy.blocks.forEach((b, j) => {
    let k = known.get(keys[j]);
    if (!k) (k = { id: next.id++, pages: [] }), known.set(keys[j], k), d.added.push(b);
    d.ids.push(k.id);
    changed(k, now[j], d);
    k.pages = now[j];
  });
  return d;
}

function changed(k: Known, now: Page[], d: ReadOnlyDiff): void {
  const index: number[] = [], zero: number[] = [], data: Buffer[] = [], gone: number[] = [];
  now.forEach((p, i) => {
    if (same(k.pages[i], p)) return;
    if (p === 'discarded') return void gone.push(i);
    index.push(i);
    zero.push(p ? 0 : 1);
    if (p) data.push(p);
  });
  if (index.length) d.batches.push({ block: k.id, index: Uint32Array.from(index), zero: Uint8Array.from(zero), data: Buffer.concat(data) });
  if (gone.length) d.discards.push({ block: k.id, index: Uint32Array.from(gone) });
}
