// Test targets for process capture (test/targets/*.c, built here with gcc into a
// cache dir) and the invariant checker that reads a captured region.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as crypto from 'node:crypto';
import * as assert from 'uvu/assert';
import type { StreamEvent, BlockInfo } from '../format/events';
import { ImageReader } from '../receiver/image-reader';

const SRC = path.resolve(__dirname, '..', '..', 'test', 'targets');
const CACHE = path.join(os.tmpdir(), 'bgsnap-test-targets');
const PAGE = 4096;

// Compile a target once per source content; world-readable so `nobody` can run it.
export function buildTarget(name: string): string {
  const files = fs.readdirSync(SRC).filter((f) => /\.[ch]$/.test(f)).sort();
  const hash = crypto.createHash('sha256');
  for (const f of files) hash.update(f).update(fs.readFileSync(path.join(SRC, f)));
  const out = path.join(CACHE, `${name}-${hash.digest('hex').slice(0, 12)}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(CACHE, { recursive: true, mode: 0o755 });
    fs.chmodSync(CACHE, 0o755);
    const tmp = `${out}.${process.pid}`;
    execFileSync('gcc', ['-O2', '-Wall', '-pthread', '-o', tmp, path.join(SRC, `${name}.c`)], { stdio: 'inherit' });
    fs.renameSync(tmp, out);
  }
  return out;
}

export type Mode = 'anon' | 'shared' | 'memfd' | 'thp' | 'churn' | 'storm' | 'wx' | 'selfuffd' | 'selffuse';

export interface Target {
  pid: number;
  base: number;
  size: number;
  threads: number;
  command(cmd: 'check' | 'counts' | 'probe'): Promise<string>;
  kill(): void;
}

// Reads a target's stdout line by line: next(ms) resolves with the next line,
// or rejects if none comes within ms (the target is stuck or gone).
export function lineReader(out: NodeJS.ReadableStream, name: string): (ms?: number) => Promise<string> {
  const lines: string[] = [];
  const waiters: ((l: string) => void)[] = [];
  let buf = '';
  out.on('data', (d: Buffer) => {
    buf += d.toString();
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const w = waiters.shift();
      if (w) w(line); else lines.push(line);
    }
  });
  return (ms = 20_000) => new Promise<string>((resolve, reject) => {
    const l = lines.shift();
    if (l !== undefined) return resolve(l);
    const t = setTimeout(() => reject(new Error(`${name} did not answer`)), ms);
    waiters.push((x) => { clearTimeout(t); resolve(x); });
  });
}

// Start the invariant target; it forks into the background so it is not our
// child (our own waitpid for children would otherwise see its ptrace stops).
// Commands go through fd 3, replies come on its stdout.
// `wrapper` runs the target through another command (e.g. a seccomp launcher).
export async function startTarget(mode: Mode, mib: number, writers = 3, asUid?: number, wrapper: string[] = []): Promise<Target> {
  const bin = buildTarget('invariant');
  const argv = [...wrapper, bin, mode, String(mib), String(writers)];
  const child: ChildProcess = asUid !== undefined
    ? spawn('setpriv', [`--reuid=${asUid}`, `--regid=${asUid}`, '--clear-groups', ...argv], { stdio: ['ignore', 'pipe', 'inherit', 'pipe'] })
    : spawn(argv[0], argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit', 'pipe'] });
  const next = lineReader(child.stdout!, 'target');
  const ready = await next(60_000);
  const m = /ready pid=(\d+) base=0x([0-9a-f]+) size=(\d+) threads=(\d+)/.exec(ready);
  if (!m) throw new Error(`target said: ${ready}`);
  const ctl = child.stdio[3] as NodeJS.WritableStream;
  const pid = Number(m[1]);
  return {
    pid, base: parseInt(m[2], 16), size: Number(m[3]), threads: Number(m[4]),
    command: (cmd) => { ctl.write(`${cmd}\n`); return next(); },
    kill: () => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } (child.stdout as NodeJS.ReadableStream & { destroy(): void }).destroy(); (ctl as NodeJS.WritableStream & { destroy(): void }).destroy(); },
  };
}

export function isAlive(pid: number): boolean {
  try {
    const st = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) [ZX] /.test(st);
  } catch {
    return false;
  }
}

// Per-thread progress counters; all must advance over `ms` (no thread stuck).
// Each thread's counter must move within `ms`; one that did not is looked at
// again for up to `patienceMs` more: a thread of a target sharing 2 busy cores
// (or stalled in the kernel's THP compaction) can go 400 ms without running,
// while one stuck in a fault stays stuck however long we look. Pass
// patienceMs 0 where the window itself is the point (progress during a capture).
export async function allThreadsProgress(t: Target, ms = 400, patienceMs = 10_000): Promise<{ ok: boolean; before: number[]; after: number[] }> {
  const parse = (l: string) => l.replace(/^counts /, '').split(' ').map(Number);
  const before = parse(await t.command('counts'));
  await new Promise((r) => setTimeout(r, ms));
  let after = parse(await t.command('counts'));
  const moved = () => before.length === t.threads && after.every((v, i) => v > before[i]);
  for (const until = Date.now() + patienceMs; !moved() && Date.now() < until;) {
    await new Promise((r) => setTimeout(r, 250));
    after = parse(await t.command('counts'));
  }
  return { ok: moved(), before, after };
}

// How many pages of [base, base+size) carry the uffd write-protect bit (57).
export function writeProtectedPages(pid: number, base: number, size: number): number {
  const fd = fs.openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    const n = size / PAGE;
    const buf = Buffer.alloc(n * 8);
    fs.readSync(fd, buf, 0, buf.length, (base / PAGE) * 8);
    let wp = 0;
    for (let i = 0; i < n; i++) if (buf.readBigUInt64LE(i * 8) & (1n << 57n)) wp++;
    return wp;
  } finally {
    fs.closeSync(fd);
  }
}

export interface InvariantResult {
  ok: boolean;
  sum: bigint;
  want: bigint;
  badStamps: number;
  inflight: number;
  detail: string;
}

// Verify the invariant over a region image: the conserved sum, completed with
// the journals of transfers caught in flight, and every page's stamps equal
// (pages named by an in-flight journal may be half-stamped).
export function checkInvariant(img: Buffer): InvariantResult {
  const inv = new InvariantStream(img.length / PAGE);
  for (let p = 0; p < img.length / PAGE; p++) inv.page(p, img, p * PAGE);
  return inv.result();
}

// The same check fed one page at a time, in any order, without holding the
// region: what a benchmark needs for a 4 GiB target. Zero pages count as value 0.
// The invariant target's region in generation k of an image, checked.
export async function invariantAt(img: string, k: number, t: Target): Promise<void> {
  const r = await ImageReader.open(img, { generation: k });
  try {
    const j = r.blocks.findIndex((b) => b.address === t.base);
    const buf = Buffer.alloc(t.size);
    r.readPages(j, 0, t.size / PAGE, buf);
    const inv = checkInvariant(buf);
    assert.ok(inv.ok, `generation ${k}: ${inv.detail}`);
  } finally {
    await r.close();
  }
}

export class InvariantStream {
  private readonly values: BigInt64Array;
  private readonly badStamp: Uint8Array;
  private readonly seen: Uint8Array;
  private page0: Buffer | undefined;
  constructor(readonly pages: number) {
    this.values = new BigInt64Array(pages);
    this.badStamp = new Uint8Array(pages);
    this.seen = new Uint8Array(pages);
  }

  page(p: number, buf: Buffer, off: number): void {
    this.seen[p] = 1;
    if (p === 0) { this.page0 = Buffer.from(buf.subarray(off, off + PAGE)); return; }
    this.values[p] = buf.readBigInt64LE(off);
    // gen and stamps compared as 32-bit halves: BigInt reads made 4 GiB checks slow.
    const lo = buf.readUInt32LE(off + 16), hi = buf.readUInt32LE(off + 20);
    for (let k = 1; k <= 63; k++) {
      if (buf.readUInt32LE(off + 64 * k) !== lo || buf.readUInt32LE(off + 64 * k + 4) !== hi) { this.badStamp[p] = 1; break; }
    }
  }

  zero(p: number): void {
    this.seen[p] = 1;
    if (p === 0) this.page0 = Buffer.alloc(PAGE);
  }

  result(): InvariantResult {
    const h = this.page0 ?? Buffer.alloc(PAGE);
    const pages = Number(h.readBigUInt64LE(8)), threads = Number(h.readBigUInt64LE(16)), initial = h.readBigUInt64LE(24);
    let correction = 0n;
    let inflight = 0;
    const exempt = new Set<number>();
    const notes: string[] = [];
    if (pages !== this.pages) notes.push(`header says ${pages} pages, region has ${this.pages}`);
    for (let t = 0; t < threads; t++) {
      const o = 256 + 64 * t;
      if (h.readBigUInt64LE(o) !== 1n) continue;
      inflight++;
      const i = Number(h.readBigUInt64LE(o + 8)), j = Number(h.readBigUInt64LE(o + 16));
      const d = h.readBigInt64LE(o + 32), oi = h.readBigInt64LE(o + 40), oj = h.readBigInt64LE(o + 48);
      const vi = this.values[i], vj = this.values[j];
      // A prefix of the thread's writes: i untouched or decremented by d, j likewise.
      if (!(vi === oi || vi === oi - d) || !(vj === oj || vj === oj + d)) notes.push(`journal ${t} inconsistent`);
      correction += (vi - oi) + (vj - oj);
      exempt.add(i).add(j);
    }
    let sum = 0n, badStamps = 0, unseen = 0;
    for (let p = 1; p < this.pages; p++) {
      sum += this.values[p];
      if (!this.seen[p]) unseen++;
      if (this.badStamp[p] && !exempt.has(p)) badStamps++;
    }
    if (unseen) notes.push(`${unseen} pages never seen`);
    const want = BigInt(this.pages - 1) * initial;
    const ok = sum - correction === want && badStamps === 0 && notes.length === 0;
    return { ok, sum: sum - correction, want, badStamps, inflight, detail: `sum ${sum - correction} want ${want} badStamps ${badStamps} inflight ${inflight} ${notes.join(', ')}` };
  }
}

export interface Collected {
  blocks: BlockInfo[];
  region: Buffer | undefined; // the block starting at `base`
  regionBlock: number;
  pageRecords: number;
  duplicates: number; // pages recorded twice in the region block
  missing: number; // region pages never recorded nor discarded
  discarded: Map<number, number>; // block -> discarded page count
  states: { kind: string; data: Buffer }[];
  end: boolean;
  blockImages: Map<number, Buffer>; // every block's bytes, when wanted
  recorded: Map<number, Uint8Array>; // block -> 1 per page recorded (2 = discarded)
}

// Read pages straight from capture events into images of the blocks.
// The region may share a block with a neighbouring mapping the kernel merged it
// with, so it is located by containment.
export async function collect(events: AsyncIterable<StreamEvent>, base: number, size: number, allBlocks = false): Promise<Collected> {
  const c: Collected = {
    blocks: [], region: undefined, regionBlock: -1, pageRecords: 0, duplicates: 0, missing: 0,
    discarded: new Map(), states: [], end: false, blockImages: new Map(), recorded: new Map(),
  };
  for await (const ev of events) {
    if (ev.type === 'blocks') {
      c.blocks = ev.blocks;
      c.regionBlock = ev.blocks.findIndex((b) => b.address <= base && base + size <= b.address + b.length);
      ev.blocks.forEach((b, i) => {
        c.recorded.set(i, new Uint8Array(b.length / PAGE));
        if (allBlocks || i === c.regionBlock) c.blockImages.set(i, Buffer.alloc(b.length));
      });
    } else if (ev.type === 'pages') {
      const { block, index, zero, data } = ev.batch;
      const img = c.blockImages.get(block);
      const rec = c.recorded.get(block)!;
      let off = 0;
      for (let i = 0; i < index.length; i++) {
        c.pageRecords++;
        if (rec[index[i]]) c.duplicates++;
        rec[index[i]] = 1;
        if (zero[i]) continue;
        if (img) data.copy(img, index[i] * PAGE, off, off + PAGE);
        off += PAGE;
      }
    } else if (ev.type === 'discard') {
      const rec = c.recorded.get(ev.batch.block)!;
      for (const p of ev.batch.index) { if (rec[p]) c.duplicates++; rec[p] = 2; }
      c.discarded.set(ev.batch.block, (c.discarded.get(ev.batch.block) ?? 0) + ev.batch.index.length);
    } else if (ev.type === 'state') {
      c.states.push(ev.state);
    } else if (ev.type === 'end') {
      c.end = true;
    }
  }
  const rb = c.blocks[c.regionBlock];
  c.region = rb && c.blockImages.get(c.regionBlock)!.subarray(base - rb.address, base - rb.address + size);
  for (const rec of c.recorded.values()) for (const r of rec) if (!r) c.missing++;
  return c;
}

// A deliberately torn copy: read the region through /proc/PID/mem while the
// target runs (what process_vm_readv or gcore without a freeze would see).
export function tornCopy(pid: number, base: number, size: number): Buffer {
  const img = Buffer.alloc(size);
  const fd = fs.openSync(`/proc/${pid}/mem`, 'r');
  try {
    for (let off = 0; off < size; off += 1 << 20) {
      fs.readSync(fd, img, off, Math.min(1 << 20, size - off), base + off);
    }
  } finally {
    fs.closeSync(fd);
  }
  return img;
}

export function anonHugeKb(pid: number): number {
  const text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  return Number(/AnonHugePages:\s+(\d+)/.exec(text)?.[1] ?? 0);
}

// Start a capture child and SIGKILL it once `marker` shows on its stdout/stderr
// (plus delayMs). Resolves when the child is gone.
export function killCaptureAt(pid: number, holdAt: string, marker: RegExp, delayMs = 50, rate = 0): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'process-capture-child.js'), String(pid), holdAt, '20000', String(rate)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let armed = false;
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`marker ${marker} never seen: ${out}`)); }, 30_000);
    const onData = (d: Buffer) => {
      out += d.toString();
      if (armed || !marker.test(out)) return;
      armed = true;
      setTimeout(() => child.kill('SIGKILL'), delayMs);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (signal !== 'SIGKILL') reject(new Error(`capture child ended by itself (${code}): ${out}`));
      else resolve(out);
    });
  });
}

// The target after a capture ended, however it ended: no page left
// write-protected, every thread making progress, its own memory check passing.
export async function assertReleased(t: Target): Promise<void> {
  assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'no page left write-protected');
  const p = await allThreadsProgress(t);  // it looks again for up to 10 s before calling a thread stuck
  assert.ok(p.ok, `every thread progresses (counts ${p.before.join(' ')} -> ${p.after.join(' ')})`);
  assert.match(await t.command('check'), /^check ok/);
}
