// Issue 10's bench: a live chain against a full snapshot each time, in one run.
// Two identical targets (bench/hotset.c: MIB MiB written once, then one thread
// rewriting random pages of a hot HOT% of it, flat out). Target A is captured
// as a chain (one generation every EVERY s, in-process, pages dropped as they
// come); right after each of its generations, target B gets a full snapshot.
// Per generation: the target's pause and the page data stored (non-zero
// pages), chain beside full. (The writers' slowdown per tracking method is
// bench/tracking-cost.ts.)
//   node dist/bench/chain-cost.js [--mib 256] [--hot 5] [--every 1] [--gens 6]
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { captureProcess } from '../capture/process-source';
import { captureProcessChain } from '../capture/process-chain';
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
  for await (const ev of src.events) void ev; // pages dropped as they come, as the chain's
  const s = src.stats();
  return { pauseMs: s.pauseMs, bytes: s.bytes };
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '256')), hot = Number(arg('--hot', '5'));
  const every = Number(arg('--every', '1')), gens = Number(arg('--gens', '6'));
  console.log(`chain-cost: ${mib} MiB, ${hot}% hot, a generation every ${every} s, ${gens} generations; ${machine()}`);
  const [a, b] = [await start(mib, hot), await start(mib, hot)];
  const full: { pauseMs: number; bytes: number }[] = [];
  try {
    const chain = captureProcessChain(a.pid, { everyMs: every * 1000, count: gens });
    for await (const ev of chain.events) if (ev.type === 'generation-end') full.push(await fullSnapshot(b.pid));
    const MiB = (x: number) => (x / 2 ** 20).toFixed(1);
    console.log('| generation | chain: pause | chain: data stored | full snapshot: pause | full: data stored |');
    console.log('|---|---|---|---|---|');
    chain.stats().generations.forEach((g, i) => {
      console.log(`| ${g.generation} | ${g.pauseMs.toFixed(1)} ms | ${MiB(g.bytes)} MiB (${g.dataPages} pages) | ${full[i].pauseMs.toFixed(1)} ms | ${MiB(full[i].bytes)} MiB |`);
    });
  } finally {
    for (const t of [a, b]) t.child.kill('SIGKILL');
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
