// bgsnap-convert --to elf-core on a live capture: a three-thread C target
// (test/targets/backtrace.c) is captured through the real pipe
// `bgsnap-capture --pid | bgsnap-receive`, converted, and opened with the real
// gdb, which must show each thread's call chain (through libc), the thread count
// and the target's globals. The notes are parsed here to check their contents;
// the read-only mappings copied after the freeze (RELRO, vdso) carry real bytes,
// so nothing is rebuilt from the executable's file and gdb reads the vdso from
// the core; --to raw must reproduce a mapping's bytes; QEMU images are refused.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { READ_ONLY_HOW } from '../capture/readonly-maps';
import { readProcessState, restoreDebugPointer } from '../receiver/convert-elf';
import { ImageReader } from '../receiver/image-reader';
import { genStream } from './helpers/qemu-gen';
import {
  AT_SYSINFO_EHDR, buildBacktrace, NT_AUXV, NT_FILE, NT_FPREGSET, NT_PRPSINFO, NT_PRSTATUS, NT_X86_XSTATE, parseCore, parseFileNote,
  chain, patternByte, readCounter, REAL_GID, REAL_UID, sleep, SOME_GLOBAL, startBacktrace, tasks, taskState, waitParked, type Backtrace,
} from './helpers/backtrace';
import { tmpDir } from './helpers/net';

let target: Backtrace;
let dir: string;
let image: string;
let core: string;

test.before(async () => {
  target = await startBacktrace(buildBacktrace());
  dir = tmpDir('elf');
  image = path.join(dir, 'img');
  core = path.join(dir, 'core');
  await waitParked(target);
});

test.after(() => {
  try { process.kill(target.pid, 'SIGKILL'); } catch { /* gone */ }
  fs.rmSync(dir, { recursive: true, force: true });
});

test('live capture through the CLI pipe; the target keeps running', async () => {
  // The target's real ids differ from its effective ones on purpose (the core
  // must carry the real ones); bgsnap cannot tell whether such a process is
  // dumpable, so it is asked for explicitly.
  const r = await sh(`${BIN.capture} --pid ${target.pid} --allow-nondumpable | ${BIN.receive} -o ${image}`, 60_000);
  assert.is(r.code, 0, r.stderr);
  assert.equal(tasks(target.pid), target.tids, 'same threads after the capture');
  for (const tid of target.tids) assert.not.match(taskState(target.pid, tid), /[TtZX]/, `thread ${tid} state`);
  const before = readCounter(target);
  await sleep(100);
  assert.ok(readCounter(target) > before, 'busy thread still writing memory');
});

test('bgsnap-convert --to elf-core writes a sparse core, no warnings', async () => {
  const r = await run(BIN.convert, [image, '--to', 'elf-core', '-o', core]);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stderr, '', 'no warnings (DT_DEBUG restored)');
  const st = fs.statSync(core);
  assert.ok(st.blocks * 512 < st.size, `sparse: ${st.blocks * 512} bytes allocated of ${st.size}`);
  const re = await run('readelf', ['-hlW', core]);
  assert.is(re.code, 0, re.stderr);
  assert.not.match(re.stderr, /warning|error/i, re.stderr);
  assert.match(re.stdout, /Type:\s+CORE/);
});

test('--to elf-core shows progress on a terminal; the same core', async () => {
  // script(1) gives convert a pseudo-terminal, as an interactive user has.
  const tty = await sh(`script -qec "${BIN.convert.replace(/'/g, '')} ${image} --to elf-core -o ${core}.tty" /dev/null`, 60_000);
  assert.is(tty.code, 0, tty.stdout + tty.stderr);
  assert.match(tty.stdout, /bgsnap-convert: \d+ of \d+ pages \(\d+%\)/);
  assert.ok(fs.readFileSync(`${core}.tty`).equals(fs.readFileSync(core)), 'the same core with or without a terminal');
});

test('RELRO and vdso captured read-only: the DT_DEBUG page is real, not rebuilt', async () => {
  const img = await ImageReader.open(image);
  try {
    const state = await readProcessState(img);
    const copied = state.maps.filter((m) => m.how === READ_ONLY_HOW);
    assert.ok(copied.some((m) => m.path === target.bin && m.perms === 'r--p'), 'executable RELRO copied');
    assert.ok(copied.some((m) => /libc\.so\.6$/.test(m.path) && m.perms === 'r--p'), 'libc RELRO copied');
    assert.ok(copied.some((m) => m.path === '[vdso]'), 'vdso copied');
    assert.not.ok(state.maps.some((m) => /^\[vvar/.test(m.path) && m.block >= 0), 'vvar not captured');
    assert.ok(copied.every((m) => img.blocks[m.block].address === m.start), 'block per copied mapping');
    assert.is(await restoreDebugPointer(img, state), undefined, 'no page rebuilt from the executable file');
  } finally {
    await img.close();
  }
});

// Frames of `thread apply all bt`, by LWP: the function names in order.
function backtraces(out: string): Map<number, string[]> {
  const map = new Map<number, string[]>();
  let frames: string[] | undefined;
  for (const line of out.split('\n')) {
    const th = /^Thread \d+ \(.*LWP (\d+)\)\):?$/.exec(line);
    if (th) map.set(Number(th[1]), (frames = []));
    const fr = /^#\d+\s+(?:0x[0-9a-f]+ in )?(\S+) \(/.exec(line);
    if (fr && frames) frames.push(fr[1]);
  }
  return map;
}

let gdbOut = '';

test('gdb opens the core: three threads, each call chain, globals', async () => {
  const cmds = ['info threads', 'thread apply all bt', 'print/x some_global', 'print greeting', 'print heap_values[0]@4',
    'print/x *pattern@8', 'print busy_counter', 'info sharedlibrary'];
  const r = await run('gdb', ['-batch', '-nx', ...cmds.flatMap((c) => ['-ex', c]), target.bin, core], 120_000);
  gdbOut = r.stdout;
  console.log(`${r.stdout}${r.stderr}`.replace(/^/gm, '  | '));
  assert.is(r.code, 0, r.stderr);
  assert.not.match(r.stdout + r.stderr, 'Failed to read a valid object file image', 'gdb reads the vdso from the core');
  assert.match(r.stdout, `Core was generated by \`${target.bin}'`);
  assert.match(r.stdout, new RegExp(`Current thread is 1 \\(.*LWP ${target.pid}\\)`));
  assert.is(r.stdout.split('\n').filter((l) => /^\*?\s+\d+\s+(Thread 0x|LWP )/.test(l)).length, 3, 'info threads: 3');
  const bt = backtraces(r.stdout);
  assert.equal([...bt.keys()].sort((a, b) => a - b), target.tids, 'one backtrace per captured thread');
  const [main, ...others] = [bt.get(target.pid)!, ...target.tids.filter((t) => t !== target.pid).map((t) => bt.get(t)!)];
  assert.ok(chain(main, [/pause/, /^level_two$/, /^level_one$/, /^main$/]), `main thread: ${main.join(' <- ')}`);
  const worker = others.find((f) => f.includes('worker_wait')) ?? [];
  assert.ok(chain(worker, [/nanosleep/, /^worker_wait$/, /^worker_main$/, /^start_thread$/]), `worker: ${worker.join(' <- ')}`);
  const busy = others.find((f) => f.includes('busy_loop')) ?? [];
  assert.ok(chain(busy, [/^busy_loop$/, /^busy_main$/, /^start_thread$/]), `busy: ${busy.join(' <- ')}`);
  assert.match(r.stdout, `= ${SOME_GLOBAL}`);
  assert.match(r.stdout, '= "hello from bgsnap"');
  assert.match(r.stdout, '= {11, 22, 33, 44}');
  const bytes = Array.from({ length: 8 }, (_, i) => `0x${patternByte(i).toString(16)}`).join(', ');
  assert.match(r.stdout, `= {${bytes}}`);
  assert.match(r.stdout, /libc\.so\.6/, 'gdb found libc through the captured DT_DEBUG');
});

test('notes: NT_PRSTATUS per thread (main first), NT_PRPSINFO, NT_AUXV, NT_FILE, NT_FPREGSET, NT_X86_XSTATE; PT_LOAD data', () => {
  const buf = fs.readFileSync(core);
  const { phdrs, notes } = parseCore(buf);
  const pr = notes.filter((n) => n.type === NT_PRSTATUS && n.name === 'CORE');
  assert.is(pr.length, target.tids.length, 'NT_PRSTATUS count == threads');
  assert.is(pr[0].desc.readInt32LE(32), target.pid, 'main thread first');
  assert.equal(pr.map((n) => n.desc.readInt32LE(32)).sort((a, b) => a - b), target.tids);
  assert.is(notes.filter((n) => n.type === NT_FPREGSET).length, target.tids.length);
  // The kernel's order (write_note_info): the first thread's NT_PRSTATUS, the
  // process-wide notes, then its other register sets; NT_PRSTATUS, NT_FPREGSET,
  // NT_X86_XSTATE for each further thread.
  const order = notes.map((n) => n.type);
  const perThread = [NT_PRSTATUS, NT_FPREGSET, NT_X86_XSTATE];
  const wantOrder = [NT_PRSTATUS, NT_PRPSINFO, NT_AUXV, NT_FILE, NT_FPREGSET, NT_X86_XSTATE, ...target.tids.slice(1).flatMap(() => perThread)];
  assert.equal(order, wantOrder, "note order");
  const xs = notes.filter((n) => n.type === NT_X86_XSTATE);
  assert.ok(xs.every((n) => n.name === 'LINUX' && n.desc.length >= 576), 'NT_X86_XSTATE "LINUX", an XSAVE area with its header');
  assert.ok(xs.every((n) => (n.desc.readBigUInt64LE(464) & 7n) === 7n), 'its XCR0 (sw_reserved) has x87, SSE, AVX');
  const ps = notes.find((n) => n.type === NT_PRPSINFO)!;
  assert.is(ps.desc.readInt32LE(24), target.pid);
  assert.is(ps.desc.readUInt32LE(16), REAL_UID, 'pr_uid: the real uid (the target runs with effective uid 0)');
  assert.is(ps.desc.readUInt32LE(20), REAL_GID, 'pr_gid: the real gid');
  assert.is(ps.desc.toString('latin1', 40, 56).replace(/\0.*$/s, ''), path.basename(target.bin).slice(0, 15));
  assert.is(ps.desc.toString('latin1', 56).replace(/\0.*$/s, ''), target.bin, 'psargs = argv');
  const auxv = notes.find((n) => n.type === NT_AUXV)!.desc;
  assert.ok(auxv.equals(fs.readFileSync(`/proc/${target.pid}/auxv`)), 'auxv');
  let vdso = 0;
  for (let o = 0; o + 16 <= auxv.length; o += 16) if (auxv.readBigUInt64LE(o) === BigInt(AT_SYSINFO_EHDR)) vdso = Number(auxv.readBigUInt64LE(o + 8));
  const files = parseFileNote(notes.find((n) => n.type === NT_FILE)!.desc);
  assert.ok(files.some((f) => f.name === target.bin && f.offset === 0), 'NT_FILE names the executable');
  assert.ok(files.some((f) => /libc\.so\.6$/.test(f.name) && f.offset > 0), 'NT_FILE names libc with offsets');
  const loads = phdrs.filter((p) => p.type === 1);
  assert.ok(loads.every((l) => l.offset % 4096 === 0 && l.vaddr % 4096 === 0), 'page-aligned PT_LOADs');
  const vl = loads.find((l) => l.vaddr === vdso);
  assert.ok(vl && vl.filesz === vl.memsz && vl.filesz > 0, `vdso PT_LOAD at ${vdso.toString(16)} has file bytes`);
  assert.ok(buf.subarray(vl!.offset, vl!.offset + 4).equals(Buffer.from('\x7fELF', 'latin1')), 'vdso bytes: its ELF header');
  const pat = loads.find((l) => l.vaddr <= target.pattern && target.pattern + target.size <= l.vaddr + l.filesz)!;
  assert.ok(pat, 'pattern mapping captured in a PT_LOAD');
  const at = pat.offset + target.pattern - pat.vaddr;
  const want = Buffer.from(Array.from({ length: target.size }, (_, i) => patternByte(i)));
  assert.ok(buf.subarray(at, at + target.size).equals(want), 'PT_LOAD bytes = the pattern');
});

test('--to raw: the pattern mapping and the counter at their map.json offsets', async () => {
  const raw = path.join(dir, 'raw');
  const r = await run(BIN.convert, [image, '--to', 'raw', '-o', raw]);
  assert.is(r.code, 0, r.stderr);
  const layout = JSON.parse(fs.readFileSync(`${raw}.map.json`, 'utf8')) as { address: number; length: number; offset: number }[];
  const at = (addr: number, len: number) => {
    const l = layout.find((x) => x.address <= addr && addr + len <= x.address + x.length)!;
    assert.ok(l, `mapping of ${addr.toString(16)} in map.json`);
    const fd = fs.openSync(raw, 'r');
    try {
      const b = Buffer.alloc(len);
      fs.readSync(fd, b, 0, len, l.offset + addr - l.address);
      return b;
    } finally {
      fs.closeSync(fd);
    }
  };
  const want = Buffer.from(Array.from({ length: target.size }, (_, i) => patternByte(i)));
  assert.ok(at(target.pattern, target.size).equals(want), 'raw pattern bytes');
  const counter = at(target.counter, 8).readBigUInt64LE(0);
  assert.ok(counter > 0n, 'busy counter captured');
  assert.match(gdbOut, new RegExp(`\\$\\d+ = ${counter}\\n`), 'gdb sees the same counter as --to raw');
});

test('--to elf-core refuses a QEMU image', async () => {
  const qimg = path.join(dir, 'qemu-img');
  const r = await run(BIN.receive, ['-o', qimg], 60_000, genStream(7).bytes);
  assert.is(r.code, 0, r.stderr);
  const c = await run(BIN.convert, [qimg, '--to', 'elf-core', '-o', path.join(dir, 'qcore')]);
  assert.is.not(c.code, 0);
  assert.match(c.stderr, /needs a process image.*qemu image/);
  assert.not.ok(fs.existsSync(path.join(dir, 'qcore')), 'nothing written');
});

test.run();
