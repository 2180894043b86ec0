// Shared pieces of the process capture benchmarks: the baselines (a plain
// process_vm_readv copy, gcore), the real pipe `bgsnap-capture --pid |
// bgsnap-receive`, an in-process capture that checks the invariant page by page
// (no 4 GiB buffers), and range formatting. Each benchmark runs its contenders
// side by side in one invocation, since the machine's load changes by the minute.
import { execFileSync, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { captureProcess, type ProcessCaptureOptions, type ProcessCaptureStats } from '../capture/process-source';
import { ImageReader } from '../receiver/image-reader';
import { InvariantStream, type InvariantResult } from '../test/process-target';

const PAGE = 4096;
const REPO = path.resolve(__dirname, '..', '..');
export const BIN = {
  capture: path.join(REPO, 'dist', 'bin', 'bgsnap-capture.js'),
  receive: path.join(REPO, 'dist', 'bin', 'bgsnap-receive.js'),
};

export { arg, machine, range } from './args';

// Built once per source content, like the test targets.
function pvmcopyBin(): string {
  const src = path.join(REPO, 'bench', 'pvmcopy.c');
  const hash = crypto.createHash('sha256').update(fs.readFileSync(src)).digest('hex').slice(0, 12);
  const out = path.join(os.tmpdir(), 'bgsnap-bench', `pvmcopy-${hash}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    execFileSync('gcc', ['-O2', '-Wall', '-o', `${out}.${process.pid}`, src], { stdio: 'inherit' });
    fs.renameSync(`${out}.${process.pid}`, out);
  }
  return out;
}

// Plain sequential copy of [base, base+size) into /dev/null: seconds of its
// copy loop (timed inside pvmcopy, after its start-up).
export function plainCopy(pid: number, base: number, size: number): number {
  return plainCopyTimed(pid, base, size).inside;
}

// Both clocks: `inside` is pvmcopy's own loop, `wall` the whole command from
// outside (through sh, start-up included), as pipeCapture times bgsnap-capture.
export function plainCopyTimed(pid: number, base: number, size: number): { inside: number; wall: number } {
  const bin = pvmcopyBin();
  const t0 = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', `'${bin}' ${pid} ${base.toString(16)} ${size} > /dev/null`], { encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`pvmcopy failed: ${r.stderr}`);
  return { inside: Number(r.stderr.trim().split(' ')[0]), wall };
}

// gcore's wall time: it stops the target for the whole dump.
export function gcoreSeconds(pid: number): number {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-gcore-'));
  try {
    const t0 = process.hrtime.bigint();
    execFileSync('gcore', ['-o', path.join(dir, 'core'), String(pid)], { stdio: 'ignore' });
    return Number(process.hrtime.bigint() - t0) / 1e9;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export interface PipeRun {
  seconds: number; // wall time of the whole pipe, until the image is durable
  stats: Record<string, unknown> & Partial<ProcessCaptureStats>;
  image: string;
}

// `bgsnap-capture ARGS | bgsnap-receive -o IMAGE`, both real processes; with
// toNull the stream goes to /dev/null instead (the capture side alone). `capture`:
// another build's bgsnap-capture.js, to compare builds side by side.
export function pipeCapture(captureArgs: string[], dir: string, toNull = false, capture = BIN.capture): PipeRun {
  const image = path.join(dir, `img-${Date.now()}`);
  const statsFile = path.join(dir, 'capture.json');
  const code = path.join(dir, 'capture.code');
  const sink = toNull ? '> /dev/null' : `| node ${BIN.receive} -q -o ${image}`;
  const cmd = `{ node ${capture} ${captureArgs.join(' ')} --stats ${statsFile}; echo $? > ${code}; } ${sink}`;
  const t0 = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', cmd], { encoding: 'utf8', stdio: ['ignore', 'ignore', 'pipe'] });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0 || fs.readFileSync(code, 'utf8').trim() !== '0') throw new Error(`pipe failed (${r.status}): ${r.stderr}`);
  return { seconds, stats: JSON.parse(fs.readFileSync(statsFile, 'utf8')), image };
}

// The invariant over the target's region as stored in an image, read in pieces.
export async function imageInvariant(image: string, base: number, size: number): Promise<InvariantResult> {
  const img = await ImageReader.open(image);
  try {
    const bi = img.blocks.findIndex((b) => b.address <= base && base + size <= b.address + b.pages * PAGE);
    if (bi < 0) throw new Error('region block not in the image');
    const first = (base - img.blocks[bi].address) / PAGE;
    const pages = size / PAGE;
    const inv = new InvariantStream(pages);
    const buf = Buffer.alloc(4096 * PAGE);
    for (let p = 0; p < pages; p += 4096) {
      const n = Math.min(4096, pages - p);
      img.readPages(bi, first + p, n, buf);
      for (let i = 0; i < n; i++) inv.page(p + i, buf, i * PAGE);
    }
    return inv.result();
  } finally {
    await img.close();
  }
}

// In-process capture, pages checked as they arrive and released at once, so
// capture memory stays at --buffer-mb whatever the target's size.
export async function checkedCapture(pid: number, base: number, size: number, opts: ProcessCaptureOptions): Promise<{ stats: ProcessCaptureStats; inv: InvariantResult }> {
  const cap = captureProcess(pid, { bufferMb: 64, ...opts, zeroCopy: true });
  const inv = new InvariantStream(size / PAGE);
  let first = -1, block = -1;
  for await (const ev of cap.events) {
    if (ev.type === 'blocks') {
      block = ev.blocks.findIndex((b) => b.address <= base && base + size <= b.address + b.length);
      first = (base - ev.blocks[block].address) / PAGE;
    } else if (ev.type === 'pages') {
      const { index, zero, data } = ev.batch;
      let off = 0;
      for (let i = 0; i < index.length; i++) {
        const p = index[i] - first;
        const mine = ev.batch.block === block && p >= 0 && p < size / PAGE;
        if (zero[i]) { if (mine) inv.zero(p); continue; }
        if (mine) inv.page(p, data, off);
        off += PAGE;
      }
      cap.release(ev.batch);
    }
  }
  return { stats: cap.stats(), inv: inv.result() };
}
