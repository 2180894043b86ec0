// Cores as the kernel writes them, opened in the debuggers people use. The
// three-thread target (test/targets/backtrace.c) is captured through the real
// CLI pipe twice, by default and with --include-dontdump, and converted:
//   - its MADV_DONTDUMP range is left out by default (its secret is in neither
//     the image nor the core, the normal range's marker is in both), kept with
//     --include-dontdump;
//   - its read-only anonymous mappings (JIT code made r-x, data made r--) are in
//     the core: gdb disassembles the code and reads the data;
//   - the worker's ymm0 (NT_X86_XSTATE) is in its note as the kernel sizes it, and
//     reads back in gdb (its low half only where gdb 13 knows no AMD layout;
//     xmm0 in lldb);
//   - gdb, lldb and elfutils' eu-stack each list every thread with its frames;
//   - code made writable and rewritten after the snapshot is saved as it was.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { captureProcess } from '../capture/process-source';
import type { PageBatch } from '../format/events';
import { readProcessState } from '../receiver/convert-elf';
import { ImageReader } from '../receiver/image-reader';
import {
  buildBacktrace, chain, JIT_MARKER, JIT_REWRITE, MARKER, NT_PRSTATUS, NT_X86_XSTATE, parseCore, RO_MARKER, SECRET, sleep, startBacktrace, syscallOf, waitParked, YMM0,
  type Backtrace,
} from './helpers/backtrace';
import { tmpDir } from './helpers/net';

let target: Backtrace;
let dir: string;
let worker = 0; // the thread whose ymm0 holds YMM0 (parked in nanosleep)

// The target's 48 MiB of written memory makes the capture stop it twice:
// MADV_DONTDUMP is then known before the pre-protection, not only in the freeze.
async function captureTo(name: string, flags = ''): Promise<{ image: string; core: string }> {
  const image = path.join(dir, name), core = path.join(dir, `${name}.core`), stats = path.join(dir, `${name}.json`);
  // --allow-nondumpable: the target's real ids differ from its effective ones
  // (test/targets/backtrace.c), which bgsnap cannot tell from non-dumpable.
  const r = await sh(`${BIN.capture} --pid ${target.pid} --allow-nondumpable ${flags} --stats ${stats} | ${BIN.receive} -o ${image}`, 60_000);
  assert.is(r.code, 0, r.stderr);
  assert.is(JSON.parse(fs.readFileSync(stats, 'utf8')).pause.stops, 2, 'two stops');
  const c = await run(BIN.convert, [image, '--to', 'elf-core', '-o', core]);
  assert.is(c.code, 0, c.stderr);
  return { image, core };
}

let plain: { image: string; core: string };
let withDd: { image: string; core: string };

test.before(async () => {
  try {
    target = await startBacktrace(buildBacktrace());
    dir = tmpDir('cores');
    await waitParked(target);
    worker = target.tids.find((t) => syscallOf(target.pid, t) === '230')!;
    plain = await captureTo('img');
    withDd = await captureTo('img-dd', '--include-dontdump');
  } catch (e) {
    console.error(`  core-debuggers set-up failed: ${(e as Error).stack}`); // uvu would count the tests failed without saying why
    throw e;
  }
});

test.after(() => {
  try { process.kill(target.pid, 'SIGKILL'); } catch { /* gone */ }
  fs.rmSync(dir, { recursive: true, force: true });
});

const holds = (file: string, text: string) => fs.readFileSync(file).includes(Buffer.from(text, 'latin1'));

async function mapAt(image: string, addr: number) {
  const img = await ImageReader.open(image);
  try {
    return (await readProcessState(img)).maps.find((m) => m.start <= addr && addr < m.end)!;
  } finally {
    await img.close();
  }
}

test('MADV_DONTDUMP range left out by default: not captured, not in the image or the core', async () => {
  const m = await mapAt(plain.image, target.secret);
  assert.is(m.how, 'skipped: MADV_DONTDUMP');
  assert.is(m.block, -1);
  assert.not.ok(holds(path.join(plain.image, 'data'), SECRET), 'image data lacks the secret');
  assert.not.ok(holds(plain.core, SECRET), 'core lacks the secret');
  assert.ok(holds(path.join(plain.image, 'data'), MARKER), 'image data has the marker');
  assert.ok(holds(plain.core, MARKER), 'core has the marker');
  const load = parseCore(fs.readFileSync(plain.core)).phdrs.find((p) => p.type === 1 && p.vaddr <= target.secret && target.secret < p.vaddr + p.memsz);
  assert.ok(load && load.filesz === 0, 'its PT_LOAD has no file bytes, as in a kernel core');
});

test('--include-dontdump keeps it', async () => {
  assert.is((await mapAt(withDd.image, target.secret)).how, 'protected');
  assert.ok(holds(path.join(withDd.image, 'data'), SECRET), 'image data has the secret');
  assert.ok(holds(withDd.core, SECRET), 'core has the secret');
  assert.ok(holds(withDd.core, MARKER), 'core has the marker');
});

test('read-only anonymous mappings (JIT code, read-only data) are captured and in the core', async () => {
  const jit = await mapAt(plain.image, target.jit), ro = await mapAt(plain.image, target.ro);
  assert.is(jit.perms, 'r-xp');
  assert.is(ro.perms, 'r--p');
  assert.is(jit.how, 'protected', 'write-protected like writable memory: a later mprotect+write saves it first');
  assert.is(ro.how, 'protected');
  const r = await run('gdb', ['-batch', '-nx', '-ex', 'x/2i jit', '-ex', 'x/s jit+16', '-ex', 'x/s ro+16', target.bin, plain.core], 120_000);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /mov\s+\$0x2a,%eax/);
  assert.match(r.stdout, /ret/);
  assert.match(r.stdout, `"${JIT_MARKER}"`);
  assert.match(r.stdout, `"${RO_MARKER}"`);
});

// gdb's view of each thread's ymm0 as four u64, by LWP.
function ymmByLwp(out: string): Map<number, string> {
  const map = new Map<number, string>();
  let lwp = 0;
  for (const line of out.split('\n')) {
    const th = /^Thread \d+ \(.*LWP (\d+)\)\):$/.exec(line);
    if (th) lwp = Number(th[1]);
    const v = /^\$\d+ = (\{.*\})$/.exec(line);
    if (v && lwp) map.set(lwp, v[1]);
  }
  return map;
}

const u64s = (b: Buffer) => `{${[0, 8, 16, 24].map((o) => `0x${b.readBigUInt64LE(o).toString(16)}`).join(', ')}}`;

// A thread's NT_X86_XSTATE: the one after its NT_PRSTATUS (pr_pid at 32).
function xstateOf(core: string, tid: number): Buffer | undefined {
  let cur = 0;
  for (const n of parseCore(fs.readFileSync(core)).notes) {
    if (n.type === NT_PRSTATUS) cur = n.desc.readInt32LE(32);
    if (n.type === NT_X86_XSTATE && cur === tid) return n.desc;
  }
  return undefined;
}

// The XSAVE area's size for the features XCR0 enables, in the standard
// format ptrace and the kernel's cores use: CPUID leaf 0xD, sub-leaf 0, EBX.
async function xsaveSize(): Promise<number> {
  const src = path.join(dir, 'xsave-size.c'), bin = path.join(dir, 'xsave-size');
  fs.writeFileSync(src, '#include <cpuid.h>\n#include <stdio.h>\nint main(void) { unsigned a, b, c, d; if (!__get_cpuid_count(0xd, 0, &a, &b, &c, &d)) return 1; printf("%u\\n", b); return 0; }\n');
  const cc = await run('gcc', ['-O2', '-o', bin, src]);
  assert.is(cc.code, 0, cc.stderr);
  const r = await run(bin, []);
  assert.is(r.code, 0, r.stderr);
  return Number(r.stdout.trim());
}

// The note is checked against the CPU's own statement of its size and the
// kernel's of its features (XCR0, in the software bytes at 464), then read by
// gdb. gdb 13 (Debian 12) knows Intel's layouts only: AMD's with PKRU
// (2440 bytes, where Intel's is 2696) it refuses ("Section .reg-xstate too
// small", for the kernel's own cores too), and shows only ymm0's low half.
test('gdb: the worker thread ymm0 from NT_X86_XSTATE', async () => {
  const xs = xstateOf(plain.core, worker);
  assert.ok(xs, 'the worker has NT_X86_XSTATE');
  assert.is(xs!.length, await xsaveSize(), 'as long as the CPU\'s XSAVE area for the enabled features');
  assert.ok((xs!.readBigUInt64LE(464) & 4n) !== 0n, 'XCR0 has AVX');
  assert.ok((xs!.readBigUInt64LE(512) & 4n) !== 0n, 'XSTATE_BV has AVX');
  assert.ok(xs!.subarray(576, 592).equals(YMM0.subarray(16)), 'ymm0\'s upper half in the AVX area');
  const r = await run('gdb', ['-batch', '-nx', '-ex', 'thread apply all p/x $ymm0.v4_int64', target.bin, plain.core], 120_000);
  console.log(`${r.stdout}${r.stderr}`.replace(/^/gm, '  | '));
  assert.is(r.code, 0, r.stderr);
  const ymm = ymmByLwp(r.stdout);
  assert.is(ymm.size, target.tids.length, 'every thread has ymm0');
  if (`${r.stdout}${r.stderr}`.includes(`.reg-xstate/${worker}' in core file too small`)) {
    console.log(`  gdb reads no AVX state from this CPU's ${xs!.length}-byte layout; the low half from NT_FPREGSET`);
    assert.match(ymm.get(worker) ?? '', u64s(YMM0).slice(1, 40), `worker ${worker} ymm0's low half`);
  } else {
    assert.is(ymm.get(worker), u64s(YMM0), `worker ${worker} ymm0`);
  }
});

type Frames = Map<number, string[]>; // function names by tid, innermost first

function expectFrames(frames: Frames, who: string): void {
  assert.equal([...frames.keys()].sort((a, b) => a - b), target.tids, `${who}: every thread`);
  const main = frames.get(target.pid);
  assert.ok(chain(main, [/pause/, /^level_two$/, /^level_one$/, /^main$/]), `${who} main: ${main?.join(' <- ')}`);
  const work = frames.get(worker);
  assert.ok(chain(work, [/nanosleep/, /^worker_wait$/, /^worker_main$/, /^start_thread$/]), `${who} worker: ${work?.join(' <- ')}`);
  const busy = frames.get(target.tids.find((t) => t !== target.pid && t !== worker)!);
  assert.ok(chain(busy, [/^busy_loop$/, /^busy_main$/, /^start_thread$/]), `${who} busy: ${busy?.join(' <- ')}`);
}

// `thread list` lines give "thread #N: tid = T"; `bt all` frames "frame #k: 0x… module`function…".
function lldbFrames(out: string): { frames: Frames; index: Map<number, number> } {
  const frames: Frames = new Map(), index = new Map<number, number>(), tidOf = new Map<number, number>();
  let cur: string[] | undefined;
  for (const line of out.split('\n')) {
    const listed = /thread #(\d+): tid = (\d+)/.exec(line);
    if (listed) { tidOf.set(Number(listed[1]), Number(listed[2])); index.set(Number(listed[2]), Number(listed[1])); }
    const th = /^\W*thread #(\d+),/.exec(line);
    if (th) frames.set(tidOf.get(Number(th[1])) ?? -1, (cur = []));
    const fr = /frame #\d+: 0x[0-9a-f]+ [^`\s]+`([A-Za-z_][\w.@]*)/.exec(line);
    if (fr && cur) cur.push(fr[1]);
  }
  return { frames, index };
}

// lldb 14 (Debian 12) reads no AVX state from any ELF core: its ymm0 is
// "unavailable" for gdb's own gcore output too. It shows xmm0, the low half,
// from NT_FPREGSET.
test('lldb: every thread with its frames, and the worker xmm0', async () => {
  const r = await run('lldb', ['-b', '-o', 'thread list', '-o', 'thread backtrace all', '-c', plain.core, target.bin], 120_000);
  console.log(r.stdout.replace(/^/gm, '  | '));
  assert.is(r.code, 0, r.stderr);
  const { frames, index } = lldbFrames(r.stdout);
  expectFrames(frames, 'lldb');
  const y = await run('lldb', ['-b', '-o', `thread select ${index.get(worker)}`, '-o', 'register read xmm0', '-c', plain.core, target.bin], 120_000);
  assert.is(y.code, 0, y.stderr);
  const bytes = [...YMM0.subarray(0, 16)].map((b) => `0x${b.toString(16)}`).join(' ');
  assert.match(y.stdout, `xmm0 = {${bytes}}`);
});

// "TID T:" then "#k  0x… function".
function euFrames(out: string): Frames {
  const frames: Frames = new Map();
  let cur: string[] | undefined;
  for (const line of out.split('\n')) {
    const th = /^TID (\d+):/.exec(line);
    if (th) frames.set(Number(th[1]), (cur = []));
    const fr = /^#\d+\s+0x[0-9a-f]+\s+(?:- \d+\s+)?(\S+)/.exec(line);
    if (fr && cur) cur.push(fr[1].replace(/@.*$/, ''));
  }
  return frames;
}

test('eu-stack: every thread with its frames', async () => {
  const r = await run('eu-stack', [`--core=${plain.core}`, '-e', target.bin], 120_000);
  console.log(r.stdout.replace(/^/gm, '  | '));
  assert.is(r.code, 0, r.stderr);
  expectFrames(euFrames(r.stdout), 'eu-stack');
});

function readMem(pid: number, addr: number, len: number): Buffer {
  const fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  try {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, addr);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

// The bytes of page `page` of a batch (its non-zero pages lie back to back).
function pageOf(batch: PageBatch, page: number): Buffer | undefined {
  let at = 0;
  for (let i = 0; i < batch.index.length; i++) {
    if (batch.index[i] === page) return batch.zero[i] ? Buffer.alloc(4096) : Buffer.from(batch.data.subarray(at * 4096, (at + 1) * 4096));
    if (!batch.zero[i]) at++;
  }
  return undefined;
}

// Last: it rewrites the target's code page. The capture's 2 MiB of buffers are
// left full (nothing is consumed), so its scan, in address order, stops in the
// ballast below the code page (2 MiB: a pool of 4 MiB or more keeps a reserve
// for faults, and the write would be saved and let through at once); the target then flips the page writable and
// writes it. That write must wait (the page is write-protected, not copied
// later), and the page is saved as it was at the snapshot.
test('JIT code made writable and rewritten after the snapshot: the write waits, the old code is saved', async () => {
  const cap = captureProcess(target.pid, { zeroCopy: true, bufferMb: 2, allowNonDumpable: true });
  const events = cap.events[Symbol.asyncIterator]();
  let blocks: { address: number; length: number }[] = [];
  for (let r = await events.next(); !r.done && r.value.type !== 'state'; r = await events.next()) {
    if (r.value.type === 'blocks') blocks = r.value.blocks;
  }
  const block = blocks.findIndex((b) => b.address <= target.jit && target.jit < b.address + b.length);
  assert.ok(block >= 0, 'the code page is a captured block');
  process.kill(target.pid, 'SIGUSR1');
  await sleep(500);
  assert.match(readMem(target.pid, target.jit + 16, 32).toString('latin1'), JIT_MARKER, 'the rewrite waits for the capture');
  let saved: Buffer | undefined;
  for (let r = await events.next(); !r.done; r = await events.next()) {
    if (r.value.type !== 'pages') continue;
    if (r.value.batch.block === block) saved = pageOf(r.value.batch, (target.jit - blocks[block].address) / 4096) ?? saved;
    cap.release(r.value.batch);
  }
  assert.ok(saved, 'code page saved');
  assert.ok(saved!.includes(Buffer.from(JIT_MARKER)), 'saved as it was at the snapshot');
  await sleep(100);
  assert.match(readMem(target.pid, target.jit + 16, 32).toString('latin1'), JIT_REWRITE, 'then the target went on and rewrote it');
});

test.run();
