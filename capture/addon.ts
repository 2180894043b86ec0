// Loads the capture addon (ptrace, userfaultfd) built from capture/native by the
// set-up command (node-gyp). Compiled to dist/capture/addon.js, so the build dir
// is two up. The file operations are a separate addon (io/fileops.ts).
import * as path from 'node:path';
import type { ProcessMap } from '../format/process-state';

export interface Addon {
  // Process capture (capture/native/capture_js.cc). startCapture resolves at the
  // snapshot point: the target was frozen, protected and let go again.
  startCapture(pid: number, options?: CaptureOptions): Promise<number>;
  // A filled page batch, or null once every page was saved. Its arrays are views
  // of native memory: call releaseBuffer(handle, batch.id) when done with them.
  nextBuffer(handle: number): Promise<NativeBatch | null>;
  // Chains (options.chain; capture/native/generations.cc): nextBuffer returns null at
  // the end of each generation; this freezes the next one, resolving with its number.
  nextGeneration(handle: number): Promise<number>;
  releaseBuffer(handle: number, id: number): boolean;
  takeDiscards(handle: number): { block: number; index: Uint32Array }[];
  captureInfo(handle: number): CaptureInfo;
  abortCapture(handle: number): void;
  closeCapture(handle: number): void;
  // QEMU before 8.1 (capture/qemu-uffd.ts, capture/native/qemu_uffd.cc).
  peerPid(fd: number): number; // SO_PEERCRED of a connected Unix socket
  uffdRelease(pid: number, fd: number, ranges: [number, number][], unregister: boolean): void;
  [name: string]: unknown;
}

export interface CaptureOptions {
  bufferMb?: number; // total size of the page buffers (default 64)
  rateLimitMBps?: number; // pace the linear scan (faults are never paced)
  stallTimeoutMs?: number; // watchdog: drop protection if the saver stalls (30000)
  preProtect?: boolean; // default true; false protects everything inside the freeze (for comparisons)
  includeDontDump?: boolean; // keep MADV_DONTDUMP ranges (default: left out, as in the kernel's cores)
  // tests: pause there, printing bgsnap-hold ('injecting': injected registers in
  // place; 'sysctl': vm.unprivileged_userfaultfd open; both in the freezer helper;
  // 'stuck': the saver, deaf to abort)
  testHoldAt?: 'inject' | 'injecting' | 'sysctl' | 'preprotect' | 'frozen' | 'copy' | 'stuck' | 'move';
  frozenReadTimeoutMs?: number; // bound on reads made while the target is frozen (default 1000)
  testHoldMs?: number;
  allowNonDumpable?: boolean; // capture a non-dumpable target anyway
  testNoSuspendSeccomp?: boolean; // tests: refuse a seccomp target as a non-root tracer must
  injectTimeoutMs?: number; // an injected syscall taking longer is interrupted and undone (2000)
  testStuckInjection?: boolean; // tests: inject a pause() that never returns first
  chain?: boolean; // keep tracking after the save: generations follow with nextGeneration()
  precopy?: boolean; // a chain of pre-copy passes on a WP_ASYNC userfaultfd, then the snapshot (capture/native/precopy.cc)
  precopyFinalPages?: number; // pre-copy: the snapshot comes once at most this many pages were written since the last pass (4096)
  precopyMaxPasses?: number; // pre-copy: or after this many passes (8)
  precopyMoveMb?: number; // pre-copy's finish: anonymous memory moves to the synchronous userfaultfd this much per stop (64)
  chainPreProtectMinPages?: number; // chains: re-protect a dirty set this big before the freeze (default 4096; tests: 1)
  testMaxUnregisters?: number; // tests: fallback unregisters of saved ranges under layout storms (4096)
  testRetryOnlyMs?: number; // tests: past them, how long one range is retried before the capture fails (5000)
}

export interface NativeBatch {
  id: number;
  block: number;
  index: Uint32Array;
  zero: Uint8Array;
  data: Buffer;
  crcs: Uint32Array; // CRC-32 of each data page, in data order (the saver's, taken while the page was in its cache)
}

// The engine reports mappings in the process-state codec's shape.
export type NativeMap = ProcessMap;

export interface NativeBlock {
  name: string;
  address: number;
  length: number;
  map: number;
  protected: boolean;
  thp: boolean;
  dead: boolean; // chains: gone from the layout (its number is never reused)
}

// The target stops twice: armMs (plant the userfaultfd) and snapshotMs (the
// snapshot point), or once (stops 1, armMs 0) when little of its memory is
// mapped by 4 KiB pages; totalMs is their sum. preProtectMs: write-protecting while it
// runs in between; the snapshot freeze re-protects reprotectPages written since.
export interface FreezeStats {
  totalMs: number;
  stops: number; // 1 or 2
  armMs: number;
  snapshotMs: number;
  preProtectMs: number;
  preFaults: number;
  preRounds: number;
  reprotectRanges: number;
  reprotectPages: number;
  seizeMs: number;
  injectMs: number;
  registerMs: number;
  protectMs: number;
  pagemapMs: number;
  copyMs: number;
  detachMs: number;
  threads: number;
  rounds: number;
  sysctlToggled: boolean;
  seccompSuspended: boolean;
  smapsMs: number; // reading /proc/PID/smaps for MADV_DONTDUMP, before the freeze
  smapsFrozenMs: number; // re-reading it in the freeze (smapsReread: the layout had changed)
  smapsReread: boolean;
  uffdVia: number; // 1 userfaultfd(), 2 /dev/userfaultfd, 3 the sysctl opened (0: none)
  snapshotTime: number; // ms since the epoch
  faultsBefore: number; // chains: write faults served before this generation's instant (0 in generation 1)
  pass: boolean; // pre-copy: this generation is a pass, not the snapshot
  dirtyBefore: number; // pre-copy: pages written since the last pass, counted before this generation's stop
  syncFinish: boolean; // pre-copy: the snapshot's stop saved nothing; what was written since the last pass went out with write-protect faults
  moveStops: number; // pre-copy's finish: the stops before the snapshot's that moved memory to the synchronous userfaultfd
  moveMaxMs: number; // the longest of them
  moveMs: number; // from the first of them to the end of the last, the target's runs between included
  stopPages: number; // pre-copy's finish: pages written since memory moved that the snapshot's stop saved itself
  heldPages: number; // pre-copy's finish: pages written before memory moved, read while the target ran on (side reads)
}

export interface CaptureCounters {
  scanPages: number;
  faultPages: number;
  copiedPages: number;
  zeroPages: number;
  untouchedPages: number;
  discarded: number;
  bytes: number;
  faults: number;
  spuriousFaults: number;
  eagain: number;
  removeEvents: number;
  unmapEvents: number;
  remapEvents: number;
  batches: number;
  bufferWaits: number;
  scanWaitUs: number; // the linear scan's time waiting for the output to release buffers
  saverCpuUs: number; // the saver thread's CPU time over its run…
  saverWallUs: number; // …and its wall time (chains: summed over generations)
  rollbacks: number;
  unregistered: number;
  lostProtection: number;
  faultWaitP50Ms: number;
  faultWaitP99Ms: number;
  faultWaitMaxMs: number;
  faultWaitSamples: number;
}

export interface CaptureInfo {
  state: 'freezing' | 'running' | 'done' | 'failed';
  pid: number;
  error?: Error & { code?: string };
  counters: CaptureCounters;
  generation: number; // chains: the last generation frozen (1 once startCapture resolved)
  // Present once the snapshot point was reached:
  freeze?: FreezeStats;
  maps?: NativeMap[];
  blocks?: NativeBlock[];
  threads?: { tid: number; regs: Buffer; fpregs: Buffer; xstate: Buffer; pendingSignal: number }[];
  auxv?: Buffer;
  cmdline?: Buffer;
  exe?: string;
  status?: string;
  mapsText?: string;
  seconds?: number;
}

const addonPath = path.join(__dirname, '..', '..', 'build', 'Release', 'bgsnap.node');

// eslint-disable-next-line @typescript-eslint/no-require-imports
export const addon: Addon = require(addonPath) as Addon;
