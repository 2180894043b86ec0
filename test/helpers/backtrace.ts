// The test target of the core-file tests (test/targets/backtrace.c): built with
// debug info, started in the background, waited for until each thread is parked
// in its call chain; and a reader of the ELF core's program headers and notes.
import { execFileSync, spawn } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

const SRC = path.resolve(__dirname, '..', '..', '..', 'test', 'targets', 'backtrace.c');
const CACHE = path.join(os.tmpdir(), 'bgsnap-test-targets');
export const NT_PRSTATUS = 1, NT_PRPSINFO = 3, NT_AUXV = 6, NT_FILE = 0x46494c45, NT_FPREGSET = 2, NT_X86_XSTATE = 0x202;
export const AT_SYSINFO_EHDR = 33; // the vdso's address
export const SOME_GLOBAL = '0x5eed1234abcd';
// The strings the target builds at run time (HEX * 3 in backtrace.c).
export const HEX3 = (0x5ec2e7c0ffeen * 3n).toString(16);
export const SECRET = `dd-secret-${HEX3}`, MARKER = `dd-marker-${HEX3}`;
export const JIT_MARKER = `jit-marker-${HEX3}`, RO_MARKER = `ro-marker-${HEX3}`, JIT_REWRITE = `jit-rewrite-${HEX3}`;
export const YMM0 = Buffer.from(Array.from({ length: 32 }, (_, i) => 0xa0 + i)); // the worker's ymm0
export const REAL_UID = 1234, REAL_GID = 4321;

// gdb needs the debug info and the frames of -O0 code: not buildTarget's -O2.
export function buildBacktrace(): string {
  const hash = crypto.createHash('sha256').update(fs.readFileSync(SRC)).digest('hex').slice(0, 12);
  const out = path.join(CACHE, `backtrace-g-${hash}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(CACHE, { recursive: true });
    const tmp = `${out}.${process.pid}`;
    execFileSync('gcc', ['-g', '-O0', '-pthread', '-Wall', '-o', tmp, SRC], { stdio: 'inherit' });
    fs.renameSync(tmp, out);
  }
  return out;
}

// The byte at offset i of the target's pattern mapping (pattern_byte in the C).
export const patternByte = (i: number) => (i * 7 + Math.floor(i / 4096) * 13 + 3) & 0xff;

export interface Backtrace {
  bin: string;
  pid: number;
  pattern: number;
  size: number;
  counter: number;
  jit: number;
  ro: number;
  secret: number;
  marker: number;
  tids: number[];
}

// Starts the target (it forks into the background) and reads its ready line.
export function startBacktrace(bin: string): Promise<Backtrace> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, [], { stdio: ['ignore', 'pipe', 'inherit'] });
    let buf = '';
    const timer = setTimeout(() => reject(new Error('backtrace target never said ready')), 20_000);
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /ready pid=(\d+) pattern=0x([0-9a-f]+) size=(\d+) counter=0x([0-9a-f]+) jit=0x([0-9a-f]+) ro=0x([0-9a-f]+) secret=0x([0-9a-f]+) marker=0x([0-9a-f]+)\n/.exec(buf);
      if (!m) return;
      clearTimeout(timer);
      child.stdout!.destroy();
      const pid = Number(m[1]);
      const hex = (i: number) => parseInt(m[i], 16);
      resolve({
        bin, pid, pattern: hex(2), size: Number(m[3]), counter: hex(4), jit: hex(5), ro: hex(6), secret: hex(7), marker: hex(8), tids: tasks(pid),
      });
    });
  });
}

export const tasks = (pid: number) => fs.readdirSync(`/proc/${pid}/task`).map(Number).sort((a, b) => a - b);
export const syscallOf = (pid: number, tid: number) => fs.readFileSync(`/proc/${pid}/task/${tid}/syscall`, 'utf8').split(' ')[0].trim();
export const taskState = (pid: number, tid: number) => /\) (\S) /.exec(fs.readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8'))![1];
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Waits until main is in pause (34), the worker in clock_nanosleep (230) and
// the busy thread running, so the snapshot finds each at the end of its chain.
export async function waitParked(t: Backtrace): Promise<void> {
  for (let i = 0; i < 500; i++) {
    const calls = t.tids.map((tid) => syscallOf(t.pid, tid));
    if (t.tids.length === 3 && calls.includes('34') && calls.includes('230') && calls.includes('running')) return;
    await sleep(10);
  }
  throw new Error(`target threads not parked: ${t.tids.map((tid) => syscallOf(t.pid, tid)).join(', ')}`);
}

export function readCounter(t: Backtrace): bigint {
  const fd = fs.openSync(`/proc/${t.pid}/mem`, 'r');
  try {
    const b = Buffer.alloc(8);
    fs.readSync(fd, b, 0, 8, t.counter);
    return b.readBigUInt64LE(0);
  } finally {
    fs.closeSync(fd);
  }
}


export interface Note { type: number; name: string; desc: Buffer }
export interface Phdr { type: number; flags: number; offset: number; vaddr: number; filesz: number; memsz: number }

// The core's program headers and notes, parsed from the ELF spec's layouts.
export function parseCore(buf: Buffer): { phdrs: Phdr[]; notes: Note[] } {
  const phoff = Number(buf.readBigUInt64LE(32));
  const phdrs: Phdr[] = [];
  for (let i = 0; i < buf.readUInt16LE(56); i++) {
    const o = phoff + 56 * i;
    const n = (at: number) => Number(buf.readBigUInt64LE(o + at));
    phdrs.push({ type: buf.readUInt32LE(o), flags: buf.readUInt32LE(o + 4), offset: n(8), vaddr: n(16), filesz: n(32), memsz: n(40) });
  }
  const pn = phdrs.find((p) => p.type === 4)!;
  const notes: Note[] = [];
  const al = (n: number) => (n + 3) & ~3;
  for (let o = pn.offset; o < pn.offset + pn.filesz;) {
    const namesz = buf.readUInt32LE(o), descsz = buf.readUInt32LE(o + 4), type = buf.readUInt32LE(o + 8);
    const name = buf.toString('latin1', o + 12, o + 12 + namesz - 1);
    notes.push({ type, name, desc: buf.subarray(o + 12 + al(namesz), o + 12 + al(namesz) + descsz) });
    o += 12 + al(namesz) + al(descsz);
  }
  return { phdrs, notes };
}

// NT_FILE: count, page size, count × {start, end, offset in pages}, then names.
export function parseFileNote(d: Buffer): { start: number; end: number; offset: number; name: string }[] {
  const count = Number(d.readBigUInt64LE(0)), ps = Number(d.readBigUInt64LE(8));
  const names = d.toString('utf8', 16 + 24 * count).split('\0');
  return Array.from({ length: count }, (_, i) => ({
    start: Number(d.readBigUInt64LE(16 + 24 * i)), end: Number(d.readBigUInt64LE(24 + 24 * i)),
    offset: Number(d.readBigUInt64LE(32 + 24 * i)) * ps, name: names[i],
  }));
}


// True when want appears in frames (innermost first) in order, each matched by a pattern.
export function chain(frames: string[] | undefined, want: RegExp[]): boolean {
  let i = 0;
  for (const f of frames ?? []) if (i < want.length && want[i].test(f)) i++;
  return i === want.length;
}
