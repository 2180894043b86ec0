// A live chain of generations of a running process (`bgsnap-capture --pid PID
// --every SECONDS`; issue 10, format/SPEC.md "Chains of generations"). The
// engine keeps its userfaultfd armed between generations
// (capture/native/generations.cc): generation 1 is a full snapshot, each later
// one the pages written since the previous instant, taken with the same short
// freeze. This module turns that into chain stream events:
//
//   header (chain) once, then per generation:
//   generation   its number, instant, and the blocks gone since the last one
//   blocks       blocks new in it (mappings new, moved, resized or re-protected;
//                read-only copies new); numbered after every block the chain had
//   state        process.state at its instant, maps[].block as chain numbers
//   pages        read-only copies' changed pages, then the engine's dirty pages
//   discard      pages whose content at the instant was destroyed before saved
//   generation-end
//   end          after --count generations, or once stop() was called (after
//                the generation in flight)
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { addon, type CaptureInfo, type NativeBatch } from './addon';
import { copyReadOnly, READ_ONLY_HOW, type ReadOnlyCopy } from './readonly-maps';
import { preflight } from './preflight';
import { findUnseenWrites, type UnseenWrites } from './unseen-writes';
import { copyBatch, releaseHeld, safeInfo, stateOf, statsOf, type ProcessCaptureOptions, type ProcessCaptureStats } from './process-source';
import { diffReadOnly, type ReadOnlyBlocks } from './chain-readonly';
import { encodeProcessState, STATE_KIND } from '../format/process-state';
import { emptyGenerationTotals } from '../format/chain';
import type { CaptureSource } from './source';
import type { BlockInfo, GenerationTotals, PageBatch, StreamEvent, StreamTotals } from '../format/events';

export interface ChainCaptureOptions extends ProcessCaptureOptions {
  everyMs: number; // from one generation's instant to the next (later if a save takes longer); unused with precopy
  // Pre-copy (capture/native/precopy.cc): passes back to back while the kernel
  // tracks writes, then one snapshot generation saved inside its stop; the
  // chain ends there. The passes' GENERATION_END say PASS.
  precopy?: boolean;
  precopyFinalPages?: number;
  precopyMaxPasses?: number;
  precopyMoveMb?: number;
  count?: number; // generations to take; default: until stop()
  onGeneration?: (g: GenerationStats) => void; // each generation once its last page is out
}

export interface GenerationStats {
  generation: number;
  instant: number; // ms since the epoch
  pauseMs: number; // the target's stop for this generation
  blocksAdded: number;
  blocksRemoved: number;
  pages: number; // page records sent (data + zero)
  dataPages: number;
  zeroPages: number;
  discarded: number;
  bytes: number; // page data sent
  faults: number; // write faults served from the previous generation's instant to this one's
  seconds: number; // from the instant until the generation's last page was out
  pass: boolean; // pre-copy: a pass, not a snapshot
  dirtyBefore: number; // pre-copy: pages written since the previous pass, counted before this stop
  syncFinish: boolean; // pre-copy: the snapshot was finished with write-protect faults, not inside its stop
  moveStops: number; // pre-copy's finish: the short stops before the snapshot's that moved memory for it
  moveMaxMs: number; // the longest of them
  stopPages: number; // pre-copy's finish: written pages its snapshot's stop saved itself (the rest went out with faults)
  heldPages: number; // pre-copy's finish: pages written before memory moved, read while the target ran (the generation's first batches)
}

export interface ChainStats extends ProcessCaptureStats {
  generations: GenerationStats[];
}

export interface ProcessChain extends CaptureSource<ChainStats> {
  release(batch: PageBatch): void;
  stop(reason: string): void; // end the chain cleanly after the generation in flight
}

// Pre-copy's passes are work no writer waits for: this thread (which frames
// and hands out the saver's batches) runs them 10 nicer, as the saver itself
// does (capture/native/precopy.cc, PassNice), and so do the threads it starts
// meanwhile (libuv's pool: the output's write(2)). The undo, once the
// snapshot's generation begins, puts every thread of this process that is
// still 10 nicer back. Root only: going back needs CAP_SYS_NICE.
function passNice(): () => void {
  if (process.geteuid?.() !== 0) return () => undefined;
  const was = os.getPriority();
  const nicer = Math.min(19, was + 10);
  os.setPriority(nicer);
  let undone = false;
  return () => {
    if (undone) return;
    undone = true;
    for (const tid of fs.readdirSync('/proc/self/task').map(Number)) {
      try {
        if (os.getPriority(tid) === nicer) os.setPriority(tid, was);
      } catch { /* the thread ended */ }
    }
  };
}

export function captureProcessChain(pid: number, opts: ChainCaptureOptions): ProcessChain {
  let handle: number | undefined;
  let last: CaptureInfo | undefined;
  let unNice = (): void => undefined; // passNice's undo
  let unseen: UnseenWrites | undefined;
  let stopping: string | undefined;
  let wake: (() => void) | undefined;
  const ids = new Map<number, number>(); // engine block -> chain block
  const readOnly: ReadOnlyBlocks = new Map();
  const next = { id: 0 };
  const held = new Map<PageBatch, number>();
  const gens: GenerationStats[] = [];
  const totals: StreamTotals = { pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0, generations: 0 };
  let gt: GenerationTotals = emptyGenerationTotals(0);
  let dataBytes = 0;
  let faultsSeen = 0;

  function countPages(b: { index: Uint32Array; zero: Uint8Array; data: Buffer }): void {
    let zeros = 0;
    for (let i = 0; i < b.zero.length; i++) zeros += b.zero[i];
    for (const t of [totals, gt]) (t.pages += b.index.length), (t.zeroPages += zeros), t.batches++;
    dataBytes += b.data.length;
  }

  function pagesEvent(b: NativeBatch): StreamEvent {
    const block = ids.get(b.block)!;
    countPages(b);
    if (!opts.zeroCopy) {
      const copy = { ...copyBatch(b), block };
      addon.releaseBuffer(handle!, b.id);
      return { type: 'pages', batch: copy };
    }
    const batch: PageBatch = { block, index: b.index, zero: b.zero, data: b.data, crcs: b.crcs };
    held.set(batch, b.id);
    return { type: 'pages', batch };
  }

  function* discards(): Generator<StreamEvent> {
    for (const d of addon.takeDiscards(handle!)) {
      for (const t of [totals, gt]) t.discarded += d.index.length;
      yield { type: 'discard', batch: { block: ids.get(d.block)!, index: d.index } };
    }
  }

  // The engine's blocks new or dead since the last generation, as chain numbers.
  function engineLayout(info: CaptureInfo): { removed: number[]; added: BlockInfo[] } {
    const removed: number[] = [], added: BlockInfo[] = [];
    (info.blocks ?? []).forEach((b, i) => {
      const id = ids.get(i);
      if (b.dead && id !== undefined && id >= 0) (removed.push(id), ids.set(i, -1));
      if (!b.dead && id === undefined) (ids.set(i, next.id++), added.push({ name: b.name, length: b.length, address: b.address }));
    });
    return { removed, added };
  }

  // What opens generation k, up to its engine pages: the layout's changes,
  // its state, and the read-only copies' changed pages.
  function* opening(k: number): Generator<StreamEvent> {
    const info = last!;
    const eng = engineLayout(info);
    // A pre-copy's later passes leave the read-only mappings alone; its
    // snapshot copies them as any generation does. Reading them (and smaps,
    // to pick them) took 24-57 ms of every pass of Redis, during which it
    // wrote more for the next.
    const skip = k > 1 && !!opts.precopy && !!info.freeze?.pass;
    const ro: ReadOnlyCopy = skip ? { blocks: [], maps: [], batches: [], unreadable: [], bytes: 0, skipped: [] } : copyReadOnly(pid, info.maps ?? [], { includeDontDump: opts.includeDontDump });
    const rod = skip ? { ids: [], removed: [], added: [], batches: [], discards: [] } : diffReadOnly(readOnly, ro, next);
    for (const m of info.maps ?? []) if (m.block >= 0) m.block = ids.get(m.block)!;
    ro.maps.forEach((m, i) => Object.assign(info.maps![m], { block: rod.ids[i], how: READ_ONLY_HOW }));
    const removed = [...eng.removed, ...rod.removed], added = [...eng.added, ...rod.added];
    gt = { ...emptyGenerationTotals(k), blocksAdded: added.length, blocksRemoved: removed.length };
    dataBytes = 0;
    // A pre-copy's first pass reads all of memory at the output's pace; the
    // later passes and the snapshot race the target's writes.
    yield { type: 'generation', generation: { generation: k, instant: info.freeze!.snapshotTime, removed, ...(opts.precopy && k > 1 ? { racing: true } : {}) } };
    if (added.length) yield { type: 'blocks', blocks: added };
    for (const t of [totals, gt]) t.states++;
    yield { type: 'state', state: { kind: STATE_KIND, data: encodeProcessState(stateOf(info)) } };
    for (const b of rod.batches) (countPages(b), yield { type: 'pages', batch: b });
    for (const d of rod.discards) {
      for (const t of [totals, gt]) t.discarded += d.index.length;
      yield { type: 'discard', batch: d };
    }
  }

  async function* generation(k: number): AsyncGenerator<StreamEvent> {
    last = addon.captureInfo(handle!);
    const f = last.freeze!;
    if (!f.pass) unNice();
    const faults = f.faultsBefore - faultsSeen;
    faultsSeen = f.faultsBefore;
    yield* opening(k);
    for (let b = await addon.nextBuffer(handle!); b; b = await addon.nextBuffer(handle!)) {
      yield pagesEvent(b);
      yield* discards();
    }
    yield* discards();
    totals.generations = k;
    const pass = !!opts.precopy && f.pass;
    yield { type: 'generation-end', totals: { ...gt, ...(pass ? { pass } : {}) } };
    // A pre-copy's snapshot is saved inside its stop: its length is known only now.
    const end = opts.precopy ? (safeInfo(handle!)?.freeze ?? f) : f;
    const pauseMs = end.totalMs;
    gens.push({
      generation: k, instant: f.snapshotTime, pauseMs, blocksAdded: gt.blocksAdded, blocksRemoved: gt.blocksRemoved,
      pages: gt.pages, dataPages: gt.pages - gt.zeroPages, zeroPages: gt.zeroPages, discarded: gt.discarded, bytes: dataBytes,
      faults, seconds: (Date.now() - f.snapshotTime) / 1000, pass, dirtyBefore: f.dirtyBefore ?? 0, syncFinish: !!f.syncFinish,
      moveStops: f.moveStops ?? 0, moveMaxMs: f.moveMaxMs ?? 0, stopPages: end.stopPages ?? 0, heldPages: end.heldPages ?? 0,
    });
    opts.onGeneration?.(gens[gens.length - 1]);
  }

  // Until `due` (ms since the epoch) or stop().
  function sleepUntil(due: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, Math.max(0, due - Date.now()));
      function done() { clearTimeout(t); wake = undefined; resolve(); }
      wake = done;
    });
  }

  async function* events(): AsyncGenerator<StreamEvent> {
    if (!Number.isInteger(pid) || pid <= 0) throw Object.assign(new Error(`not a process id: ${pid}`), { code: 'EINVAL' });
    if (!opts.precopy && !(opts.everyMs > 0)) throw Object.assign(new Error('--every must be more than 0 seconds'), { code: 'EINVAL' });
    try {
      preflight(pid, opts);
      handle = await addon.startCapture(pid, { ...opts, chain: true });
      if (opts.precopy) unNice = passNice();
      last = addon.captureInfo(handle);
      unseen = findUnseenWrites(pid, last.maps ?? []);
      const state = stateOf(last);
      const label = state.argv.join(' ') || state.exe;
      const header = { snapshotId: crypto.randomBytes(16).toString('hex'), source: 'process' as const, pageSize: 4096, created: state.snapshotTime, label, chain: true };
      yield { type: 'header', header };
      for (let k = 1; ; k++) {
        if (k > 1) await addon.nextGeneration(handle);
        yield* generation(k);
        if (opts.precopy && !gens[k - 1].pass) break; // the snapshot: the chain is done
        if (opts.precopy && stopping) throw Object.assign(new Error(`pre-copy ${stopping} after ${k} passes, before its snapshot`), { code: 'ECANCELED' });
        if (opts.precopy) continue;
        if (k === opts.count || stopping) break;
        await sleepUntil(last!.freeze!.snapshotTime + opts.everyMs);
        if (stopping) break;
      }
      yield { type: 'end', totals: { ...totals } };
    } finally {
      unNice();
      if (handle !== undefined) {
        last = safeInfo(handle) ?? last;
        addon.closeCapture(handle); // between generations: a clean end; else an abort: the target is released either way
      }
    }
  }

  return {
    events: events(),
    async abort(reason: string) {
      stopping = reason;
      wake?.();
      if (handle !== undefined) addon.abortCapture(handle);
    },
    stop(reason: string) {
      stopping ??= reason;
      wake?.();
    },
    // Pre-copy: the longest of its stops (the first plants the userfaultfd, the last saves the snapshot).
    stats: () => ({ ...statsOf(last, pid, undefined, unseen), pauseMs: opts.precopy ? Math.max(0, ...gens.map((g) => g.pauseMs)) : gens[0]?.pauseMs ?? 0, generations: gens }),
    release: (batch: PageBatch) => releaseHeld(held, handle, batch),
  };
}
