// Read-only memory a kernel core dump has but the native engine does not save
// (it saves writable and anonymous mappings):
//   - private file mappings whose pages were modified before they became
//     read-only: RELRO (.data.rel.ro, GOT, .dynamic with DT_DEBUG) after the
//     dynamic linker's mprotect. /proc/PID/smaps shows them with Anonymous > 0;
//     the file on disk does not hold those bytes.
//   - [vdso]: gdb loads its symbols from memory. ([vvar] is not readable as
//     memory and stays out.)
// They are read from /proc/PID/mem right after the freeze, not inside it. As the
// mappings are read-only that is the snapshot's content, unless the target
// mprotects one writable and writes it in the few milliseconds between.
import * as fs from 'node:fs';
import type { NativeMap } from './addon';
import type { BlockInfo, PageBatch } from '../format/events';

const PAGE = 4096;
const USER_TOP = 2 ** 47; // [vsyscall] is a kernel address
const BATCH_PAGES = 64;
export const READ_ONLY_CAP = 16 << 20; // bytes: RELRO and vdso are KiB per library
export const READ_ONLY_HOW = 'copied read-only after the freeze';
export const DONTDUMP_HOW = 'skipped: MADV_DONTDUMP';

export interface ReadOnlyCopy {
  blocks: BlockInfo[]; // to append to the native blocks
  maps: number[]; // per block, its index in the maps
  batches: PageBatch[]; // block = index among these blocks, rebased by the caller
  unreadable: { block: number; index: Uint32Array }[]; // pages /proc/PID/mem refused
  bytes: number; // page data (non-zero pages)
  skipped: string[]; // mappings left out by the cap
}

// "START-END" of each smaps entry -> its Anonymous: kB.
export function anonymousKb(smaps: string): Map<string, number> {
  return smapsField(smaps, /^Anonymous:\s+(\d+) kB/, (m) => Number(m[1]));
}

// "START-END" of each smaps entry whose VmFlags hold "dd" (MADV_DONTDUMP).
export function dontDumpRanges(smaps: string): Set<string> {
  const dd = smapsField(smaps, /^VmFlags:(.*)$/, (m) => m[1].split(' ').includes('dd'));
  return new Set([...dd].filter(([, v]) => v).map(([k]) => k));
}

function smapsField<T>(smaps: string, re: RegExp, value: (m: RegExpExecArray) => T): Map<string, T> {
  const out = new Map<string, T>();
  let range = '';
  for (const line of smaps.split('\n')) {
    const head = /^([0-9a-f]+-[0-9a-f]+) /.exec(line);
    if (head) range = head[1];
    const m = re.exec(line);
    if (m && range) out.set(range, value(m));
  }
  return out;
}

// As /proc prints them: at least 8 hex digits (a non-PIE binary sits at 0x00400000).
const hex8 = (v: number) => v.toString(16).padStart(8, '0');
const smapsRange = (m: NativeMap) => `${hex8(m.start)}-${hex8(m.end)}`;
const isFile = (m: NativeMap) => m.inode !== 0 && m.path !== '' && !m.path.startsWith('[');

// Uncaptured mappings to copy: read-only private file mappings holding modified
// pages, and the vdso; not MADV_DONTDUMP ones unless includeDontDump. Map
// indexes, in address order.
export function pickReadOnly(maps: NativeMap[], smaps: string, includeDontDump = false): number[] {
  const anon = anonymousKb(smaps);
  const dd = includeDontDump ? new Set<string>() : dontDumpRanges(smaps);
  const picked: number[] = [];
  maps.forEach((m, i) => {
    if (m.block >= 0 || m.end > USER_TOP) return;
    if (dd.has(smapsRange(m))) {
      m.how = DONTDUMP_HOW;
      return;
    }
    const modified = (m.perms === 'r--p' || m.perms === 'r-xp') && isFile(m) && (anon.get(smapsRange(m)) ?? 0) > 0;
    if (modified || m.path === '[vdso]') picked.push(i);
  });
  return picked;
}

// Same style as the engine's block names: "START-END PERMS [PATH]".
const blockName = (m: NativeMap) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.perms}${m.path ? ` ${m.path}` : ''}`;

const ZERO_PAGE = Buffer.alloc(PAGE);
const isZero = (buf: Buffer, at: number) => buf.subarray(at, at + PAGE).equals(ZERO_PAGE);

// One batch of up to BATCH_PAGES pages from `first`: zero pages as zero records,
// the others back to back in data (the native batches' layout). Undefined when
// /proc/PID/mem refuses the range.
function readBatch(fd: number, block: number, m: NativeMap, first: number, count: number): PageBatch | undefined {
  const buf = Buffer.alloc(count * PAGE);
  try {
    if (fs.readSync(fd, buf, 0, buf.length, m.start + first * PAGE) !== buf.length) return undefined;
  } catch {
    return undefined;
  }
  const index = new Uint32Array(count), zero = new Uint8Array(count);
  let w = 0;
  for (let i = 0; i < count; i++) {
    index[i] = first + i;
    zero[i] = isZero(buf, i * PAGE) ? 1 : 0;
    if (!zero[i]) buf.copy(buf, w++ * PAGE, i * PAGE, (i + 1) * PAGE);
  }
  return { block, index, zero, data: buf.subarray(0, w * PAGE) };
}

function copyMap(fd: number, block: number, m: NativeMap, out: ReadOnlyCopy): void {
  const pages = (m.end - m.start) / PAGE;
  for (let p = 0; p < pages; p += BATCH_PAGES) {
    const n = Math.min(BATCH_PAGES, pages - p);
    const b = readBatch(fd, block, m, p, n);
    if (b) {
      out.batches.push(b);
      out.bytes += b.data.length;
    } else out.unreadable.push({ block, index: Uint32Array.from({ length: n }, (_, i) => p + i) });
  }
}

// Picks and reads the mappings (at most READ_ONLY_CAP bytes of them). Call it at
// once after the freeze: the shorter the wait, the smaller the window above.
export function copyReadOnly(pid: number, maps: NativeMap[], opts: { cap?: number; includeDontDump?: boolean } = {}): ReadOnlyCopy {
  const cap = opts.cap ?? READ_ONLY_CAP;
  const out: ReadOnlyCopy = { blocks: [], maps: [], batches: [], unreadable: [], bytes: 0, skipped: [] };
  let smaps: string;
  let fd: number;
  try {
    smaps = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
    fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  } catch {
    return out; // the target is gone: the native stream reports that
  }
  try {
    let total = 0;
    for (const i of pickReadOnly(maps, smaps, opts.includeDontDump)) {
      const m = maps[i];
      if (total + (m.end - m.start) > cap) { out.skipped.push(blockName(m)); continue; }
      total += m.end - m.start;
      copyMap(fd, out.blocks.length, m, out);
      out.blocks.push({ name: blockName(m), length: m.end - m.start, address: m.start });
      out.maps.push(i);
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}
