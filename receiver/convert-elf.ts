// Writes a process image as an ELF64 x86_64 core file that `gdb PROGRAM core`
// opens: the threads' registers and the captured memory at the snapshot point.
//
//   0        Elf64_Ehdr            e_type ET_CORE, e_machine EM_X86_64
//   64       Elf64_Phdr[n]         PT_NOTE, then one PT_LOAD per mapping, by address
//   (64+56n  Elf64_Shdr            only when n >= 0xffff: holds the real n, PN_XNUM)
//   N        PT_NOTE contents      per thread, main thread first:
//                                    NT_PRSTATUS (pr_pid = tid, user_regs_struct),
//                                    NT_FPREGSET (FXSAVE area) when captured,
//                                    NT_X86_XSTATE ("LINUX": the XSAVE area, AVX,
//                                    AVX-512, PKRU) when captured;
//                                  after the first thread's: NT_PRPSINFO, NT_AUXV,
//                                    NT_FILE (file-backed mappings, for gdb to find
//                                    the executable and libraries)
//   page     PT_LOAD contents      each captured mapping's bytes at its own
//   aligned                        page-aligned offset; zero pages are holes
//
// Every mapping of the snapshot's maps gets a PT_LOAD, like the kernel's own core
// dumps: captured ones with p_filesz = their length (the capture also copies
// RELRO and the vdso), the others (unmodified file text, guard pages, vvar) with
// p_filesz = 0, so gdb knows the address space and reads those bytes from the
// files NT_FILE names.
//
// In images from captures that did not copy RELRO, one page may carry bytes the
// capture did not record: the executable's page holding DT_DEBUG (see
// restoreDebugPointer), rebuilt from the file on disk.
//
// Pages the target discarded (munmap, MADV_DONTNEED) after the snapshot point,
// before they were saved, are not in the image: they read as zero in the core,
// which is also what the target itself would have read after the discard.
import * as fs from 'node:fs';
import { openPrivateFile, type CreateOptions } from '../io/private-file';
import type { ImageReader } from './image-reader';
import { Progress } from '../io/progress';
import { decodeProcessState, STATE_KIND, type ProcessMap, type ProcessState, type ProcessThread } from '../format/process-state';

const EHDR_SIZE = 64;
const PHDR_SIZE = 56;
const SHDR_SIZE = 64;
const PN_XNUM = 0xffff;
const PT_LOAD = 1;
const PT_NOTE = 4;
const PF_X = 1, PF_W = 2, PF_R = 4;
const NT_PRSTATUS = 1, NT_FPREGSET = 2, NT_PRPSINFO = 3, NT_AUXV = 6, NT_FILE = 0x46494c45, NT_X86_XSTATE = 0x202;
const PRSTATUS_SIZE = 336; // struct elf_prstatus on x86_64
const PRSTATUS_REG = 112; // offset of pr_reg (elf_gregset_t == user_regs_struct)
const PRPSINFO_SIZE = 136; // struct elf_prpsinfo on x86_64
const GREGS_SIZE = 27 * 8;
const FPREGS_SIZE = 512;
const USER_TOP = 2 ** 47; // [vsyscall] and other kernel addresses are not the target's memory

export interface ElfLoad {
  vaddr: number;
  memsz: number;
  filesz: number; // = memsz for a captured mapping, 0 for one that was not captured
  flags: number;
  block: number; // image block holding the bytes, -1 when not captured
  offset: number; // in the core file
  data?: Buffer; // bytes rebuilt at conversion time (block -1, filesz = data.length)
}

export interface ElfCoreSummary {
  threads: number;
  loads: number;
  capturedLoads: number;
  fileMappings: number;
  size: number; // apparent size of the core file
  warnings: string[];
}

function flagsOf(perms: string): number {
  return (perms[0] === 'r' ? PF_R : 0) | (perms[1] === 'w' ? PF_W : 0) | (perms[2] === 'x' ? PF_X : 0);
}

// One PT_LOAD per captured block, plus one with no file bytes for each user-space
// mapping of the maps that no block covers.
export function planLoads(img: ImageReader, state: ProcessState): ElfLoad[] {
  const permsOfBlock = new Map<number, string>(state.maps.filter((m) => m.block >= 0).map((m) => [m.block, m.perms]));
  const loads: ElfLoad[] = img.blocks.map((b, i) => {
    // The block name "START-END PERMS [PATH]" carries the perms too, should the map line be missing.
    const perms = permsOfBlock.get(i) ?? b.name.split(' ')[1] ?? 'rw-p';
    return { vaddr: b.address, memsz: b.length, filesz: b.length, flags: flagsOf(perms), block: i, offset: 0 };
  });
  const covered = (m: ProcessMap) => loads.some((l) => m.start < l.vaddr + l.memsz && l.vaddr < m.end);
  for (const m of state.maps) {
    if (m.block >= 0 || m.end > USER_TOP || covered(m)) continue;
    loads.push({ vaddr: m.start, memsz: m.end - m.start, filesz: 0, flags: flagsOf(m.perms), block: -1, offset: 0 });
  }
  return loads.sort((a, b) => a.vaddr - b.vaddr);
}

// Fields of the /proc/PID/status text taken during the freeze.
interface StatusInfo {
  name: string;
  state: string;
  ppid: number;
  pgrp: number;
  sid: number;
  uid: number; // real ids, as the kernel's fill_psinfo writes them
  gid: number;
}

function parseStatus(text: string, fallbackName: string): StatusInfo {
  const field = (k: string) => new RegExp(`^${k}:\\s*(.*)$`, 'm').exec(text)?.[1] ?? '';
  const num = (k: string, i = 0) => Number(field(k).split(/\s+/)[i]) || 0;
  return {
    name: field('Name') || fallbackName, state: field('State').charAt(0) || 'S',
    ppid: num('PPid'), pgrp: num('NSpgid'), sid: num('NSsid'), uid: num('Uid', 0), gid: num('Gid', 0), // Uid: real effective saved fs
  };
}

function u64(buf: Buffer, off: number, v: number): void {
  buf.writeBigUInt64LE(BigInt(v), off);
}

// An ELF note: namesz, descsz, type, name (NUL-terminated), desc, each padded to 4.
function note(name: string, type: number, desc: Buffer): Buffer {
  const nm = Buffer.from(`${name}\0`, 'latin1');
  const pad = (n: number) => (4 - (n % 4)) % 4;
  const head = Buffer.alloc(12);
  head.writeUInt32LE(nm.length, 0);
  head.writeUInt32LE(desc.length, 4);
  head.writeUInt32LE(type, 8);
  return Buffer.concat([head, nm, Buffer.alloc(pad(nm.length)), desc, Buffer.alloc(pad(desc.length))]);
}

function prstatus(t: ProcessThread, st: StatusInfo): Buffer {
  if (t.regs.length !== GREGS_SIZE) throw new Error(`thread ${t.tid}: registers are ${t.regs.length} bytes, expected ${GREGS_SIZE}`);
  const d = Buffer.alloc(PRSTATUS_SIZE);
  // No signal caused this "dump" (pr_cursig 0); a signal held at the freeze is
  // pending, so it goes in pr_sigpend (bit signo-1).
  if (t.pendingSignal > 0 && t.pendingSignal <= 64) d.writeBigUInt64LE(1n << BigInt(t.pendingSignal - 1), 16);
  d.writeInt32LE(t.tid, 32);
  d.writeInt32LE(st.ppid, 36);
  d.writeInt32LE(st.pgrp, 40);
  d.writeInt32LE(st.sid, 44);
  t.regs.copy(d, PRSTATUS_REG);
  d.writeInt32LE(t.fpregs.length === FPREGS_SIZE ? 1 : 0, PRSTATUS_REG + GREGS_SIZE); // pr_fpvalid
  return d;
}

function prpsinfo(s: ProcessState, st: StatusInfo): Buffer {
  const d = Buffer.alloc(PRPSINFO_SIZE);
  // The kernel's letters by state index; 't' (our own tracing stop during the
  // freeze, when status was read) is reported as stopped.
  const letter = st.state === 't' ? 'T' : st.state;
  const idx = 'RSDTZW'.indexOf(letter);
  d.writeInt8(idx < 0 ? 0 : idx, 0);
  d.write(idx < 0 ? '.' : letter, 1, 'latin1');
  d.writeUInt32LE(st.uid, 16);
  d.writeUInt32LE(st.gid, 20);
  d.writeInt32LE(s.pid, 24);
  d.writeInt32LE(st.ppid, 28);
  d.writeInt32LE(st.pgrp, 32);
  d.writeInt32LE(st.sid, 36);
  Buffer.from(st.name, 'utf8').subarray(0, 15).copy(d, 40); // pr_fname[16], NUL-terminated
  Buffer.from(s.argv.join(' '), 'utf8').subarray(0, 79).copy(d, 56); // pr_psargs[80]
  return d;
}

// Mappings backed by a file (the kernel's vm_file): regular files, memfd and
// shared memory all have an inode and a path that is not a [pseudo] name.
function fileMaps(s: ProcessState): ProcessMap[] {
  return s.maps.filter((m) => m.inode !== 0 && m.path !== '' && !m.path.startsWith('[') && m.end <= USER_TOP);
}

// NT_FILE: count, page size, then {start, end, file offset in pages} per mapping,
// then the mappings' names, each NUL-terminated, in the same order.
function fileNote(maps: ProcessMap[], pageSize: number): Buffer {
  const table = Buffer.alloc(16 + 24 * maps.length);
  u64(table, 0, maps.length);
  u64(table, 8, pageSize);
  maps.forEach((m, i) => {
    u64(table, 16 + 24 * i, m.start);
    u64(table, 24 + 24 * i, m.end);
    u64(table, 32 + 24 * i, Math.floor(m.offset / pageSize));
  });
  return Buffer.concat([table, ...maps.map((m) => Buffer.from(`${m.path}\0`, 'utf8'))]);
}

// The first thread is the main thread (process-state puts tid == pid first); gdb
// makes the first NT_PRSTATUS its current thread, and attaches each NT_FPREGSET
// and NT_X86_XSTATE to the NT_PRSTATUS before it. The order is the kernel's
// (fs/binfmt_elf.c write_note_info): the process-wide notes follow the first
// thread's NT_PRSTATUS, its other register sets come after them. No NT_SIGINFO:
// no signal caused this dump.
export function buildNotes(s: ProcessState): Buffer {
  const st = parseStatus(s.status, s.exe.split('/').pop() ?? '');
  const parts: Buffer[] = [];
  s.threads.forEach((t, i) => {
    parts.push(note('CORE', NT_PRSTATUS, prstatus(t, st)));
    if (i === 0) {
      parts.push(note('CORE', NT_PRPSINFO, prpsinfo(s, st)));
      parts.push(note('CORE', NT_AUXV, s.auxv));
      parts.push(note('CORE', NT_FILE, fileNote(fileMaps(s), s.pageSize)));
    }
    if (t.fpregs.length === FPREGS_SIZE) parts.push(note('CORE', NT_FPREGSET, t.fpregs));
    if (t.xstate.length > 0) parts.push(note('LINUX', NT_X86_XSTATE, t.xstate));
  });
  return Buffer.concat(parts);
}

function elfHeader(phnum: number, shoff: number): Buffer {
  const h = Buffer.alloc(EHDR_SIZE);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2 /* 64-bit */, 1 /* little-endian */, 1 /* EV_CURRENT */, 0 /* SYSV ABI */]).copy(h, 0);
  h.writeUInt16LE(4, 16); // ET_CORE
  h.writeUInt16LE(62, 18); // EM_X86_64
  h.writeUInt32LE(1, 20); // e_version
  u64(h, 32, EHDR_SIZE); // e_phoff
  u64(h, 40, shoff);
  h.writeUInt16LE(EHDR_SIZE, 52);
  h.writeUInt16LE(PHDR_SIZE, 54);
  h.writeUInt16LE(Math.min(phnum, PN_XNUM), 56);
  h.writeUInt16LE(shoff ? SHDR_SIZE : 0, 58);
  h.writeUInt16LE(shoff ? 1 : 0, 60); // e_shnum
  return h;
}

// With PN_XNUM program headers or more, e_phnum says PN_XNUM and the real count
// is sh_info of section header 0 (an SHT_NULL entry).
function extnumSection(phnum: number): Buffer {
  const s = Buffer.alloc(SHDR_SIZE);
  u64(s, 32, 1); // sh_size = e_shnum
  s.writeUInt32LE(phnum, 44); // sh_info
  return s;
}

function phdr(type: number, flags: number, offset: number, vaddr: number, filesz: number, memsz: number, align: number): Buffer {
  const p = Buffer.alloc(PHDR_SIZE);
  p.writeUInt32LE(type, 0);
  p.writeUInt32LE(flags, 4);
  u64(p, 8, offset);
  u64(p, 16, vaddr);
  u64(p, 32, filesz);
  u64(p, 40, memsz);
  u64(p, 48, align);
  return p;
}

// --- The executable's DT_DEBUG --------------------------------------------------
// gdb finds the shared libraries through the dynamic linker's r_debug, reached
// from the DT_DEBUG entry of the executable's .dynamic, which ld.so fills in at
// start-up. .dynamic lies in the RELRO part of the executable: read-only
// afterwards, so captures that saved only writable memory lack it (current ones
// copy it: then this does nothing), and the file on disk holds 0
// there: gdb would see no libraries and no backtrace through libc. So that one
// page is rebuilt from the executable's file with DT_DEBUG = AT_BASE + the
// st_value of ld.so's exported _r_debug, and used only when the captured memory
// at that address really holds an r_debug whose r_ldbase is AT_BASE.
const AT_BASE = 7, AT_ENTRY = 9, DT_DEBUG = 21, PT_DYNAMIC = 2, SHT_DYNSYM = 11;

function auxvValue(auxv: Buffer, type: number): number {
  for (let o = 0; o + 16 <= auxv.length; o += 16) {
    if (Number(auxv.readBigUInt64LE(o)) === type) return Number(auxv.readBigUInt64LE(o + 8));
  }
  return 0;
}

function pread(fd: number, off: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  fs.readSync(fd, b, 0, len, off);
  return b;
}

// An ELF file on disk, if it is still the one that was mapped (same inode).
function withFile<T>(m: ProcessMap, fn: (fd: number) => T): T {
  if (fs.statSync(m.path).ino !== m.inode) throw new Error(`${m.path} changed since the snapshot`);
  const fd = fs.openSync(m.path, 'r');
  try {
    if (!pread(fd, 0, 4).equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) throw new Error(`${m.path} is not ELF`);
    return fn(fd);
  } finally {
    fs.closeSync(fd);
  }
}

// st_value of a symbol in the file's .dynsym (located through the section headers).
function dynsymValue(fd: number, name: string): number {
  const h = pread(fd, 0, EHDR_SIZE);
  const sh = pread(fd, Number(h.readBigUInt64LE(40)), h.readUInt16LE(58) * h.readUInt16LE(60));
  const sec = (i: number) => ({
    type: sh.readUInt32LE(i * SHDR_SIZE + 4), link: sh.readUInt32LE(i * SHDR_SIZE + 40),
    off: Number(sh.readBigUInt64LE(i * SHDR_SIZE + 24)), size: Number(sh.readBigUInt64LE(i * SHDR_SIZE + 32)),
  });
  for (let i = 0; i < h.readUInt16LE(60); i++) {
    const s = sec(i);
    if (s.type !== SHT_DYNSYM) continue;
    const syms = pread(fd, s.off, s.size);
    const str = sec(s.link);
    const strs = pread(fd, str.off, str.size);
    for (let o = 0; o + 24 <= syms.length; o += 24) {
      const at = syms.readUInt32LE(o);
      if (strs.toString('latin1', at, strs.indexOf(0, at)) === name) return Number(syms.readBigUInt64LE(o + 8));
    }
  }
  throw new Error(`no ${name} in the dynamic linker's symbols`);
}

// Link-time address of the executable's DT_DEBUG value, and its e_entry.
function debugSlot(fd: number): { slot: number; entry: number } | undefined {
  const h = pread(fd, 0, EHDR_SIZE);
  const ph = pread(fd, Number(h.readBigUInt64LE(32)), h.readUInt16LE(54) * h.readUInt16LE(56));
  for (let o = 0; o < ph.length; o += h.readUInt16LE(54)) {
    if (ph.readUInt32LE(o) !== PT_DYNAMIC) continue;
    const vaddr = Number(ph.readBigUInt64LE(o + 16));
    const dyn = pread(fd, Number(ph.readBigUInt64LE(o + 8)), Number(ph.readBigUInt64LE(o + 32)));
    for (let d = 0; d + 16 <= dyn.length; d += 16) {
      if (Number(dyn.readBigInt64LE(d)) === DT_DEBUG) return { slot: vaddr + d + 8, entry: Number(h.readBigUInt64LE(24)) };
    }
  }
  return undefined;
}

async function capturedBytes(img: ImageReader, addr: number, len: number): Promise<Buffer | undefined> {
  const i = img.blocks.findIndex((b) => b.address <= addr && addr + len <= b.address + b.length);
  if (i < 0) return undefined;
  const ps = img.format.pageSize;
  const page = Math.floor((addr - img.blocks[i].address) / ps);
  const m = await img.pages(i);
  if (!m.present.get(page) || !m.data.get(page)) return undefined;
  const off = addr - img.blocks[i].address - page * ps;
  return img.readPages(i, page, 1, Buffer.alloc(ps)).subarray(off, off + len);
}

// The rebuilt page as a PT_LOAD, undefined when nothing needs rebuilding (static
// executable, page captured), or a sentence saying why it could not be done.
export async function restoreDebugPointer(img: ImageReader, s: ProcessState): Promise<ElfLoad | string | undefined> {
  const base = auxvValue(s.auxv, AT_BASE);
  const ld = s.maps.find((m) => m.start === base && m.offset === 0 && m.inode !== 0);
  const exe = s.maps.find((m) => m.path === s.exe && m.offset === 0 && m.inode !== 0);
  if (!base || !ld || !exe) return undefined;
  try {
    const rDebug = base + withFile(ld, (fd) => dynsymValue(fd, '_r_debug'));
    const r = await capturedBytes(img, rDebug, 40); // struct r_debug: version, r_map, r_brk, r_state, r_ldbase
    if (!r || Number(r.readBigUInt64LE(32)) !== base) return `no r_debug at ${rDebug.toString(16)} in the captured memory`;
    const found = withFile(exe, debugSlot);
    if (!found) return undefined;
    const slot = auxvValue(s.auxv, AT_ENTRY) - found.entry + found.slot;
    const ps = s.pageSize;
    const page = Math.floor(slot / ps) * ps;
    const m = s.maps.find((x) => x.start <= page && page < x.end);
    const captured = img.blocks.some((b) => b.address < page + ps && page < b.address + b.length);
    if (!m || m.block >= 0 || captured || m.path !== s.exe) return undefined; // the real bytes are in the core
    const data = withFile(m, (fd) => pread(fd, m.offset + (page - m.start), ps));
    data.writeBigUInt64LE(BigInt(rDebug), slot - page);
    return { vaddr: page, memsz: ps, filesz: ps, flags: flagsOf(m.perms), block: -1, offset: 0, data };
  } catch (e) {
    return `executable's DT_DEBUG not restored (${(e as Error).message}): gdb may not find the shared libraries`;
  }
}

// Puts a rebuilt page in place of its part of the empty PT_LOAD covering it.
function insertLoad(loads: ElfLoad[], page: ElfLoad): ElfLoad[] {
  const out: ElfLoad[] = [page];
  for (const l of loads) {
    const end = l.vaddr + l.memsz;
    if (l.block >= 0 || end <= page.vaddr || page.vaddr + page.memsz <= l.vaddr) { out.push(l); continue; }
    if (l.vaddr < page.vaddr) out.push({ ...l, memsz: page.vaddr - l.vaddr });
    if (page.vaddr + page.memsz < end) out.push({ ...l, vaddr: page.vaddr + page.memsz, memsz: end - page.vaddr - page.memsz });
  }
  return out.sort((a, b) => a.vaddr - b.vaddr);
}

// Headers and notes, with each PT_LOAD's file offset assigned (page-aligned,
// after the notes). Returns the bytes to write at offset 0 and the file size.
function layout(loads: ElfLoad[], notes: Buffer, pageSize: number): { head: Buffer; size: number } {
  const phnum = 1 + loads.length;
  const shoff = phnum >= PN_XNUM ? EHDR_SIZE + PHDR_SIZE * phnum : 0;
  const notesAt = EHDR_SIZE + PHDR_SIZE * phnum + (shoff ? SHDR_SIZE : 0);
  let at = Math.ceil((notesAt + notes.length) / pageSize) * pageSize;
  for (const l of loads) {
    l.offset = at;
    at += l.filesz;
  }
  const head = Buffer.concat([
    elfHeader(phnum, shoff),
    phdr(PT_NOTE, 0, notesAt, 0, notes.length, 0, 4),
    ...loads.map((l) => phdr(PT_LOAD, l.flags, l.offset, l.vaddr, l.filesz, l.memsz, pageSize)),
    shoff ? extnumSection(phnum) : Buffer.alloc(0),
    notes,
  ]);
  return { head, size: at };
}

// Only pages holding data are written, with positioned writes into a file
// truncated to full size: zero (and discarded) pages stay holes and read as zero.
async function writeLoads(img: ImageReader, fd: number, loads: ElfLoad[]): Promise<void> {
  const ps = img.format.pageSize;
  const buf = Buffer.allocUnsafe(256 * ps);
  const progress = new Progress('bgsnap-convert', loads.reduce((s, l) => s + (l.block < 0 ? 0 : img.blocks[l.block].pages), 0), 'pages');
  for (const l of loads) {
    if (l.data) fs.writeSync(fd, l.data, 0, l.data.length, l.offset);
    if (l.block < 0) continue;
    for await (const run of img.runs(l.block)) {
      progress.add(run.count);
      if (!run.data) continue;
      const bytes = img.readPages(l.block, run.first, run.count, buf);
      fs.writeSync(fd, bytes, 0, bytes.length, l.offset + run.first * ps);
    }
  }
  progress.done();
}

export async function readProcessState(img: ImageReader): Promise<ProcessState> {
  if (img.header.source !== 'process') {
    throw new Error(`--to elf-core needs a process image (bgsnap-capture --pid); ${img.dir} is a ${img.header.source} image: use --to qemu or --to raw`);
  }
  const blob = await img.state(STATE_KIND);
  if (!blob) throw new Error(`${img.dir} has no ${STATE_KIND} record (threads, maps): cannot write a core file`);
  const s = decodeProcessState(blob);
  if (s.arch !== 'x86_64') throw new Error(`core files for ${s.arch} are not supported`);
  if (s.threads.length === 0) throw new Error(`${img.dir}: the snapshot recorded no threads`);
  return s;
}

export async function convertToElfCore(img: ImageReader, outPath: string, opts: CreateOptions = {}): Promise<ElfCoreSummary> {
  const state = await readProcessState(img);
  const warnings: string[] = [];
  let loads = planLoads(img, state);
  const page = await restoreDebugPointer(img, state);
  if (typeof page === 'string') warnings.push(page);
  else if (page) loads = insertLoad(loads, page);
  const { head, size } = layout(loads, buildNotes(state), img.format.pageSize);
  const fd = openPrivateFile(outPath, opts);
  try {
    fs.ftruncateSync(fd, size);
    fs.writeSync(fd, head, 0, head.length, 0);
    await writeLoads(img, fd, loads);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  const capturedLoads = loads.filter((l) => l.block >= 0).length;
  return { threads: state.threads.length, loads: loads.length, capturedLoads, fileMappings: fileMaps(state).length, size, warnings };
}
