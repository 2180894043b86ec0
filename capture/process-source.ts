// Live point-in-time snapshot of a running Linux process as stream events.
//
// The native engine (capture/native) freezes the target for milliseconds,
// write-protects its memory through an injected userfaultfd, lets it run, and
// saves every page exactly once on its own thread (a page about to be written is
// saved first). This module turns that into events:
//
//   header   source 'process', pageSize 4096, created = the freeze, label = argv
//   blocks   one per captured mapping: name "START-END PERMS [PATH]" (hex), length,
//            address = its virtual start at the snapshot point; then the read-only
//            mappings of capture/readonly-maps.ts (RELRO, vdso), copied after the freeze
//   state    kind 'process.state' (layout in format/process-state.ts)
//   pages    batches in any order (the read-only copies first, then faulted pages,
//            then the linear scan);
//            never-touched pages are zero records
//   discard  pages the target destroyed (munmap, MADV_DONTNEED) before we saved
//            them: not part of the snapshot
//   end      totals
//
// Page batches are copied out of the native buffers and those are released at
// once, unless opts.zeroCopy: then the batch's arrays are views of native memory
// and the consumer must call release(batch) after it has finished with them; the
// target's writers wait while all buffers are held (the throttle).
import * as crypto from 'node:crypto';
import { addon, type CaptureInfo, type CaptureOptions, type NativeBatch } from './addon';
import { copyReadOnly, READ_ONLY_HOW, type ReadOnlyCopy } from './readonly-maps';
import { preflight } from './preflight';
import { findUnseenWrites, type UnseenWrites } from './unseen-writes';
import { encodeProcessState, STATE_KIND, type ProcessState } from '../format/process-state';
import type { CaptureSource } from './source';
import type { BlockInfo, PageBatch, StreamEvent, StreamTotals } from '../format/events';

export interface ProcessCaptureOptions {
  bufferMb?: number; // native page buffers, total (default 64): bounds capture memory
  rateLimitMBps?: number; // pace the linear scan
  stallTimeoutMs?: number; // drop protection if the saver makes no progress this long
  zeroCopy?: boolean; // see above
  preProtect?: CaptureOptions['preProtect'];
  includeDontDump?: boolean; // keep MADV_DONTDUMP ranges (default: left out like the kernel's cores)
  frozenReadTimeoutMs?: number; // a read while frozen that takes longer fails the capture (ETIMEDOUT)
  testHoldAt?: CaptureOptions['testHoldAt'];
  testHoldMs?: number;
  allowNonDumpable?: boolean; // capture a prctl(PR_SET_DUMPABLE, 0) target (ssh-agent) anyway
  testNoSuspendSeccomp?: boolean; // tests: take the path of a tracer that cannot suspend seccomp
  injectTimeoutMs?: CaptureOptions['injectTimeoutMs'];
  testStuckInjection?: CaptureOptions['testStuckInjection'];
  chainPreProtectMinPages?: CaptureOptions['chainPreProtectMinPages'];
  testMaxUnregisters?: CaptureOptions['testMaxUnregisters'];
  testRetryOnlyMs?: CaptureOptions['testRetryOnlyMs'];
}

export interface ProcessCaptureStats {
  source: 'process';
  pid: number;
  state: string;
  pauseMs: number; // the target's time stopped: both freezes (arm + snapshot)
  snapshotTime: number; // the snapshot point, ms since the epoch (0: not reached)
  pause: {
    stops: number; armMs: number; snapshotMs: number; // the two stops (one: armMs 0)
    seizeMs: number; injectMs: number; registerMs: number; protectMs: number; pagemapMs: number; copyMs: number; detachMs: number;
    preProtectMs: number; preFaults: number; reprotectPages: number; reprotectRanges: number; // between them, target running
  };
  threads: number;
  blocks: number;
  capturedBytes: number; // total length of the captured mappings
  pagesByScan: number;
  pagesByFault: number;
  pagesCopiedFrozen: number; // mappings that cannot be protected, copied in the freeze
  zeroPages: number; // zero records, of which…
  untouchedPages: number; // …never touched (recorded without reading)
  discardedPages: number;
  lostProtectionPages: number; // of which: merged by KSM (protection lost), so possibly written before we read them
  bytes: number; // page data saved
  seconds: number;
  throughputMBps: number;
  faults: number;
  faultWaitMaxMs: number;
  faultWaitP50Ms: number;
  faultWaitP99Ms: number;
  layoutEvents: { remove: number; unmap: number; remap: number; eagain: number; rollbacks: number; strayFaults: number; unregistered: number };
  bufferWaits: number;
  scanWaitMs: number; // the linear scan's time waiting for the output to hand buffers back
  saver: { cpuMs: number; wallMs: number }; // the saver thread's CPU and wall time: is it the limit?
  sysctlToggled: boolean; // vm.unprivileged_userfaultfd was opened around the injection
  // /proc/PID/smaps (MADV_DONTDUMP) read before the freeze, and again inside it
  // only when the layout had changed in between (reread).
  smaps: { ms: number; frozenMs: number; reread: boolean };
  uffdVia: string; // how the target got its userfaultfd: 'syscall', 'dev' (/dev/userfaultfd) or 'sysctl'
  // Read-only mappings copied after the freeze (RELRO, vdso), included in blocks,
  // capturedBytes and bytes above; skipped: left out by the size cap.
  readOnly: { blocks: number; bytes: number; skipped: string[] };
  seccompSuspended: boolean; // the injected thread's seccomp filter was suspended for our syscalls
  // Writes write-protection cannot see (capture/unseen-writes.ts), found at the snapshot point.
  unseenWrites: UnseenWrites;
}

export interface ProcessCapture extends CaptureSource<ProcessCaptureStats> {
  release(batch: PageBatch): void; // zeroCopy only
}

function splitArgv(cmdline: Buffer): string[] {
  const s = cmdline.toString('utf8');
  return s === '' ? [] : (s.endsWith('\0') ? s.slice(0, -1) : s).split('\0');
}

export function stateOf(info: CaptureInfo): ProcessState {
  const threads = [...(info.threads ?? [])].sort((a, b) => (a.tid === info.pid ? -1 : b.tid === info.pid ? 1 : a.tid - b.tid));
  const f = info.freeze!;
  return {
    pid: info.pid, exe: info.exe ?? '', argv: splitArgv(info.cmdline ?? Buffer.alloc(0)), arch: 'x86_64', pageSize: 4096,
    snapshotTime: f.snapshotTime, maps: info.maps ?? [], threads, auxv: info.auxv ?? Buffer.alloc(0),
    status: info.status ?? '', freeze: { ...f },
  };
}

export function copyBatch(b: NativeBatch): PageBatch {
  return { block: b.block, index: Uint32Array.from(b.index), zero: Uint8Array.from(b.zero), data: Buffer.from(b.data), crcs: Uint32Array.from(b.crcs) };
}

const NO_UNSEEN: UnseenWrites = { ioUringBuffers: 0, ioUringBufferBytes: 0, deviceFds: [], directIoFds: [], mappedFds: [], warnings: [] };

export function statsOf(info: CaptureInfo | undefined, pid: number, ro?: ReadOnlyCopy, unseen = NO_UNSEEN): ProcessCaptureStats {
  const c = info?.counters;
  const f = info?.freeze;
  const seconds = info?.seconds ?? 0;
  const bytes = (c?.bytes ?? 0) + (ro?.bytes ?? 0);
  const captured = [...(info?.blocks ?? []), ...(ro?.blocks ?? [])].reduce((a, b) => a + b.length, 0);
  return {
    source: 'process', pid, state: info?.state ?? 'not started', pauseMs: f?.totalMs ?? 0,
    snapshotTime: f?.snapshotTime ?? 0,
    pause: {
      stops: f?.stops ?? 0, armMs: f?.armMs ?? 0, snapshotMs: f?.snapshotMs ?? 0,
      preProtectMs: f?.preProtectMs ?? 0, preFaults: f?.preFaults ?? 0, reprotectPages: f?.reprotectPages ?? 0, reprotectRanges: f?.reprotectRanges ?? 0,
      seizeMs: f?.seizeMs ?? 0, injectMs: f?.injectMs ?? 0, registerMs: f?.registerMs ?? 0, protectMs: f?.protectMs ?? 0,
      pagemapMs: f?.pagemapMs ?? 0, copyMs: f?.copyMs ?? 0, detachMs: f?.detachMs ?? 0,
    },
    threads: f?.threads ?? 0, blocks: (info?.blocks?.length ?? 0) + (ro?.blocks.length ?? 0),
    capturedBytes: captured,
    pagesByScan: c?.scanPages ?? 0, pagesByFault: c?.faultPages ?? 0, pagesCopiedFrozen: c?.copiedPages ?? 0,
    zeroPages: c?.zeroPages ?? 0, untouchedPages: c?.untouchedPages ?? 0, discardedPages: c?.discarded ?? 0, lostProtectionPages: c?.lostProtection ?? 0,
    bytes, seconds, throughputMBps: seconds > 0 ? captured / 1e6 / seconds : 0,
    faults: c?.faults ?? 0, faultWaitMaxMs: c?.faultWaitMaxMs ?? 0, faultWaitP50Ms: c?.faultWaitP50Ms ?? 0,
    faultWaitP99Ms: c?.faultWaitP99Ms ?? 0,
    layoutEvents: {
      remove: c?.removeEvents ?? 0, unmap: c?.unmapEvents ?? 0, remap: c?.remapEvents ?? 0, eagain: c?.eagain ?? 0,
      rollbacks: c?.rollbacks ?? 0, strayFaults: c?.spuriousFaults ?? 0, unregistered: c?.unregistered ?? 0,
    },
    bufferWaits: c?.bufferWaits ?? 0, scanWaitMs: (c?.scanWaitUs ?? 0) / 1000,
    saver: { cpuMs: (c?.saverCpuUs ?? 0) / 1000, wallMs: (c?.saverWallUs ?? 0) / 1000 }, sysctlToggled: f?.sysctlToggled ?? false, uffdVia: ['', 'syscall', 'dev', 'sysctl'][f?.uffdVia ?? 0] ?? '',
    smaps: { ms: f?.smapsMs ?? 0, frozenMs: f?.smapsFrozenMs ?? 0, reread: f?.smapsReread ?? false },
    readOnly: { blocks: ro?.blocks.length ?? 0, bytes: ro?.bytes ?? 0, skipped: ro?.skipped ?? [] },
    seccompSuspended: f?.seccompSuspended ?? false, unseenWrites: unseen,
  };
}

export function captureProcess(pid: number, opts: ProcessCaptureOptions = {}): ProcessCapture {
  let handle: number | undefined;
  let last: CaptureInfo | undefined;
  let aborted: string | undefined;
  let ro: ReadOnlyCopy | undefined;
  let unseen: UnseenWrites | undefined;
  const held = new Map<PageBatch, number>();
  const totals: StreamTotals = { pages: 0, zeroPages: 0, discarded: 0, batches: 0, states: 0 };

  function pagesEvent(b: NativeBatch): StreamEvent {
    totals.pages += b.index.length;
    for (let i = 0; i < b.zero.length; i++) totals.zeroPages += b.zero[i];
    totals.batches++;
    if (!opts.zeroCopy) {
      const copy = copyBatch(b);
      addon.releaseBuffer(handle!, b.id);
      return { type: 'pages', batch: copy };
    }
    const batch: PageBatch = { block: b.block, index: b.index, zero: b.zero, data: b.data, crcs: b.crcs };
    held.set(batch, b.id);
    return { type: 'pages', batch };
  }

  function* discards(): Generator<StreamEvent> {
    for (const d of addon.takeDiscards(handle!)) {
      totals.discarded += d.index.length;
      yield { type: 'discard', batch: { block: d.block, index: d.index } };
    }
  }

  // The read-only copies' pages, their blocks numbered after the engine's.
  function* readOnlyEvents(r: ReadOnlyCopy, base: number): Generator<StreamEvent> {
    for (const b of r.batches) {
      totals.pages += b.index.length;
      for (let i = 0; i < b.zero.length; i++) totals.zeroPages += b.zero[i];
      totals.batches++;
      yield { type: 'pages', batch: { ...b, block: base + b.block } };
    }
    for (const d of r.unreadable) {
      totals.discarded += d.index.length;
      yield { type: 'discard', batch: { block: base + d.block, index: d.index } };
    }
    r.batches = []; // sent: only the counts stay, for stats()
  }

  async function* events(): AsyncGenerator<StreamEvent> {
    if (!Number.isInteger(pid) || pid <= 0) throw Object.assign(new Error(`not a process id: ${pid}`), { code: 'EINVAL' });
    try {
      preflight(pid, opts);
      handle = await addon.startCapture(pid, opts);
      if (aborted) addon.abortCapture(handle);
      last = addon.captureInfo(handle);
      unseen = findUnseenWrites(pid, last.maps ?? []);
      const base = last.blocks?.length ?? 0;
      if (!aborted) ro = copyReadOnly(pid, last.maps ?? [], { includeDontDump: opts.includeDontDump });
      ro?.maps.forEach((m, i) => Object.assign(last!.maps![m], { block: base + i, how: READ_ONLY_HOW }));
      const state = stateOf(last);
      const label = state.argv.join(' ') || state.exe;
      const header = { snapshotId: crypto.randomBytes(16).toString('hex'), source: 'process' as const, pageSize: 4096, created: state.snapshotTime, label };
      yield { type: 'header', header };
      const blocks: BlockInfo[] = (last.blocks ?? []).map((b) => ({ name: b.name, length: b.length, address: b.address }));
      yield { type: 'blocks', blocks: [...blocks, ...(ro?.blocks ?? [])] };
      totals.states++;
      yield { type: 'state', state: { kind: STATE_KIND, data: encodeProcessState(state) } };
      if (ro) yield* readOnlyEvents(ro, base);
      for (let b = await addon.nextBuffer(handle); b; b = await addon.nextBuffer(handle)) {
        yield pagesEvent(b);
        yield* discards();
      }
      yield* discards();
      last = addon.captureInfo(handle);
      yield { type: 'end', totals: { ...totals } };
    } finally {
      if (handle !== undefined) {
        last = addon.captureInfo(handle);
        addon.closeCapture(handle); // aborts if still running: the target is always released
      }
    }
  }

  return {
    events: events(),
    async abort(reason: string) {
      aborted = reason;
      if (handle !== undefined) addon.abortCapture(handle);
    },
    stats: () => statsOf(handle !== undefined && last?.state !== 'done' && last?.state !== 'failed' ? safeInfo(handle) ?? last : last, pid, ro, unseen),
    release: (batch: PageBatch) => releaseHeld(held, handle, batch),
  };
}

// Hands a zero-copy batch's native buffer back (once; unknown batches are not ours).
export function releaseHeld(held: Map<PageBatch, number>, handle: number | undefined, batch: PageBatch): void {
  const id = held.get(batch);
  if (id === undefined || handle === undefined) return;
  held.delete(batch);
  addon.releaseBuffer(handle, id);
}

export function safeInfo(handle: number): CaptureInfo | undefined {
  try {
    return addon.captureInfo(handle);
  } catch {
    return undefined;
  }
}
