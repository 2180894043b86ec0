// The `process.state` blob of a process snapshot: everything besides memory that a
// core file or a restore needs, taken while the target was frozen.
//
// Layout (integers little-endian):
//   +0   "BGPSTATE"            8-byte magic
//   +8   u32 version           2 (1: no xstate; both are read)
//   +12  u32 jsonLength
//   +16  JSON, utf8            (jsonLength bytes), then zero padding to a multiple of 8
//   B    binary area           byte ranges referenced from the JSON as [offset, length],
//                              offsets relative to B
//
// JSON (ProcessStateJson below):
//   pid, exe (readlink of /proc/PID/exe), argv (command line split at NULs),
//   arch 'x86_64', pageSize 4096, snapshotTime (ms since the epoch, the freeze),
//   maps: every line of /proc/PID/maps at the snapshot point: start, end (numbers;
//     user-space addresses are < 2^47 so they are exact), perms, offset, dev, inode,
//     path, block (index of the stream block holding its bytes, -1 when not captured)
//     and how ('protected' | 'copied: …' | 'skipped: …');
//   threads: tid, regs = range of the raw x86_64 `struct user_regs_struct` (27 × u64:
//     r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs
//     eflags rsp ss fs_base gs_base ds es fs gs), fpregs = range of the raw
//     `struct user_fpregs_struct` (512 bytes, FXSAVE layout), xstate = range of
//     the raw XSAVE area from PTRACE_GETREGSET(NT_X86_XSTATE) (AVX, AVX-512,
//     PKRU; its size is the CPU's; absent in version 1, empty when the CPU has
//     none), pendingSignal (a signal held at the freeze and re-delivered at
//     detach, 0 if none);
//   auxv: range of the raw /proc/PID/auxv (u64 pairs);
//   status: the text of /proc/PID/status (name, state, uids, gids, ppid for
//     NT_PRPSINFO);
//   freeze: the pause and its parts (ms), as measured.
// The first thread is the one with tid == pid when it exists.

export const STATE_KIND = 'process.state';
const MAGIC = Buffer.from('BGPSTATE', 'latin1');
const VERSION = 2;
const READABLE = [1, 2];

export type Range = [offset: number, length: number];

// A mapping as the engine reported it (start, end, perms, file, which block).
// Defined here, not by the engine: the codec is shared by capture and receiver.
export interface ProcessMap {
  start: number;
  end: number;
  perms: string;
  offset: number;
  dev: string;
  inode: number;
  path: string;
  block: number; // -1 when not captured
  how: string; // 'protected' | 'copied: ...' | 'skipped: ...'
}

export interface ProcessThreadJson {
  tid: number;
  regs: Range;
  fpregs: Range;
  xstate?: Range; // version 2
  pendingSignal: number;
}

export interface ProcessStateJson {
  pid: number;
  exe: string;
  argv: string[];
  arch: 'x86_64';
  pageSize: number;
  snapshotTime: number;
  maps: ProcessMap[];
  threads: ProcessThreadJson[];
  auxv: Range;
  status: string;
  freeze: Record<string, number | boolean>;
}

export interface ProcessThread {
  tid: number;
  regs: Buffer;
  fpregs: Buffer;
  xstate: Buffer; // empty when not captured
  pendingSignal: number;
}

// Decoded form: the JSON with its byte ranges resolved.
export interface ProcessState extends Omit<ProcessStateJson, 'threads' | 'auxv'> {
  threads: ProcessThread[];
  auxv: Buffer;
}

export function encodeProcessState(s: ProcessState): Buffer {
  const parts: Buffer[] = [];
  let at = 0;
  const put = (b: Buffer): Range => {
    parts.push(b);
    const r: Range = [at, b.length];
    at += b.length;
    return r;
  };
  const threads = s.threads.map((t) => ({
    tid: t.tid, regs: put(t.regs), fpregs: put(t.fpregs), xstate: put(t.xstate), pendingSignal: t.pendingSignal,
  }));
  const json: ProcessStateJson = { ...s, threads, auxv: put(s.auxv) };
  const text = Buffer.from(JSON.stringify(json), 'utf8');
  const head = Buffer.alloc(16);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(VERSION, 8);
  head.writeUInt32LE(text.length, 12);
  const pad = Buffer.alloc((8 - ((16 + text.length) % 8)) % 8);
  return Buffer.concat([head, text, pad, ...parts]);
}

export function decodeProcessState(buf: Buffer): ProcessState {
  if (buf.length < 16 || !buf.subarray(0, 8).equals(MAGIC)) throw new Error('process.state: bad magic');
  const version = buf.readUInt32LE(8);
  if (!READABLE.includes(version)) throw new Error(`process.state: unsupported version ${version}`);
  const len = buf.readUInt32LE(12);
  if (16 + len > buf.length) throw new Error('process.state: JSON runs past the end');
  const json = JSON.parse(buf.subarray(16, 16 + len).toString('utf8')) as ProcessStateJson;
  const base = 16 + len + ((8 - ((16 + len) % 8)) % 8);
  const get = ([off, n]: Range): Buffer => {
    if (off < 0 || n < 0 || base + off + n > buf.length) throw new Error('process.state: range past the end');
    return Buffer.from(buf.subarray(base + off, base + off + n));
  };
  const threads = json.threads.map((t) => ({
    tid: t.tid, regs: get(t.regs), fpregs: get(t.fpregs), xstate: t.xstate ? get(t.xstate) : Buffer.alloc(0), pendingSignal: t.pendingSignal,
  }));
  return { ...json, threads, auxv: get(json.auxv) };
}
