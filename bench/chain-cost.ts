// Issue 10's bench: a live chain against a full snapshot each time, in one run.
// Three identical targets (bench/hotset.c: MIB MiB written once, then one
// thread rewriting random pages of a hot HOT% of it, flat out). Target A is
// captured as a chain (one generation every EVERY s, in-process, pages
// dropped as they come); target C as the same chain with the dirty set
// protected inside the freeze only (preProtect false: the engine before its
// pre-protection of later generations); right after each generation of both,
// target B gets a full snapshot. Per generation: the target's pause and the
// page data stored (non-zero pages). (The writers' slowdown per tracking
// method is bench/tracking-cost.ts.)
//   node dist/bench/chain-cost.js [--mib 256] [--hot 5] [--every 1] [--gens 6]
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { captureProcess } from '../capture/process-source';
import { captureProcessChain, type ProcessChain } from '../capture/process-chain';
import { lineReader } from '../test/process-target';
import { arg, machine } from './args';

const SRC = path.resolve(__dirname, '..', '..', 'bench', 'hotset.c');

function hotsetBin(): string {
  const hash = crypto.createHash('sha256').update(fs.readFileSync(SRC)).digest('hex').slice(0, 12);
  const out = path.join(os.tmpdir(), 'bgsnap-bench', `hotset-${hash}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    execFileSync('gcc', ['-O2', '-Wall', '-pthread', '-o', `${out}.${process.pid}`, SRC], { stdio: 'inherit' });
    fs.renameSync(`${out}.${process.pid}`, out);
  }
  return out;
}

async function start(mib: number, hot: number): Promise<{ pid: number; child: ChildProcess }> {
  const child = spawn(hotsetBin(), [String(mib), String(hot)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const ready = await lineReader(child.stdout!, 'hotset')(120_000);
  return { pid: Number(/ready pid=(\d+)/.exec(ready)![1]), child };
}

async function fullSnapshot(pid: number): Promise<{ pauseMs: number; bytes: number }> {
  const src = captureProcess(pid);
  for await (const ev of src.events) void ev; // pages dropped as they come, as the chains'
  const s = src.stats();
  return { pauseMs: s.pauseMs, bytes: s.bytes };
}

// Pull one chain's events up to the end of its next generation (false: the chain ended).
async function nextGeneration(it: AsyncIterator<unknown>): Promise<boolean> {
  for (let r = await it.next(); !r.done; r = await it.next()) if ((r.value as { type: string }).type === 'generation-end') return true;
  return false;
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '256')), hot = Number(arg('--hot', '5'));
  const every = Number(arg('--every', '1')), gens = Number(arg('--gens', '6'));
  console.log(`chain-cost: ${mib} MiB, ${hot}% hot, a generation every ${every} s, ${gens} generations; ${machine()}`);
  const targets = [await start(mib, hot), await start(mib, hot), await start(mib, hot)];
  const full: { pauseMs: number; bytes: number }[] = [];
  try {
    const chains: ProcessChain[] = [true, false].map((pre) => captureProcessChain(targets[pre ? 0 : 1].pid, { everyMs: every * 1000, count: gens, preProtect: pre }));
    const its = chains.map((c) => c.events[Symbol.asyncIterator]());
    for (let k = 1; k <= gens; k++) {
      for (const it of its) await nextGeneration(it);
      full.push(await fullSnapshot(targets[2].pid));
    }
    for (const it of its) await nextGeneration(it); // the END
    report(chains, full);
  } finally {
    for (const t of targets) t.child.kill('SIGKILL');
  }
}

function report(chains: ProcessChain[], full: { pauseMs: number; bytes: number }[]): void {
  const MiB = (x: number) => (x / 2 ** 20).toFixed(1);
  const [a, c] = chains.map((ch) => ch.stats().generations);
  console.log('| generation | chain: pause | chain, dirty set protected in the freeze only: pause | chain: data stored | full snapshot: pause | full: data stored |');
  console.log('|---|---|---|---|---|---|');
  a.forEach((g, i) => {
    console.log(`| ${g.generation} | ${g.pauseMs.toFixed(1)} ms | ${c[i].pauseMs.toFixed(1)} ms | ${MiB(g.bytes)} MiB (${g.dataPages} pages) | ${full[i].pauseMs.toFixed(1)} ms | ${MiB(full[i].bytes)} MiB |`);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
