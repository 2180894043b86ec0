// KSM merges pages in write-protected ranges and rebuilds their PTEs without
// the userfaultfd write-protect bit (Linux 6.18 mm/ksm.c replace_page), so a
// later write breaks the sharing by copy on write with no fault to hold it on.
// A MADV_MERGEABLE target rewriting its pages in sweeps while ksmd merges them
// fast: every page the snapshot holds must be its content at the snapshot
// point; pages written behind our back are left out and counted, never saved
// wrong. The ksmd settings are restored afterwards.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import { spawn } from 'node:child_process';
import { captureProcess } from '../capture/process-source';
import { buildTarget, collect, isAlive } from './process-target';

const PAGE = 4096;
const KSM = '/sys/kernel/mm/ksm/';
const SETTINGS = ['run', 'pages_to_scan', 'sleep_millisecs'];

async function startKsmTarget(mib: number, sweepMs: number): Promise<{ pid: number; base: number; size: number }> {
  const child = spawn(buildTarget('ksm'), [String(mib), String(sweepMs)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout!.on('data', (d: Buffer) => { buf += d.toString(); if (buf.includes('\n')) resolve(buf.split('\n')[0]); });
    child.on('error', reject);
  });
  const m = /ready pid=(\d+) base=0x([0-9a-f]+) size=(\d+)/.exec(line);
  if (!m) throw new Error(`ksm target said: ${line}`);
  return { pid: Number(m[1]), base: parseInt(m[2], 16), size: Number(m[3]) };
}

// The region must read [v ... v, (one page being written), v-1 ... v-1]
// over the pages the snapshot holds.
function checkSweep(img: Buffer, recorded: Uint8Array, first: number): string[] {
  const bad: string[] = [];
  const vals: (bigint | undefined)[] = [];
  let torn = 0;
  for (let p = 0; p < img.length / PAGE; p++) {
    if (recorded[first + p] !== 1) { vals.push(undefined); continue; }
    const v = img.readBigUInt64LE(p * PAGE);
    let whole = true;
    for (let k = 1; k < PAGE / 8 && whole; k++) whole = img.readBigUInt64LE(p * PAGE + 8 * k) === v;
    if (!whole) { torn++; vals.push(undefined); continue; }
    vals.push(v);
  }
  if (torn > 1) bad.push(`${torn} torn pages`);
  const seen = vals.filter((v): v is bigint => v !== undefined);
  const top = seen.reduce((a, b) => (b > a ? b : a), 0n);
  let boundary = -1;
  vals.forEach((v, p) => {
    if (v === undefined) return;
    if (v !== top && v !== top - 1n) bad.push(`page ${p} holds ${v}, the sweep is at ${top}`);
    if (v === top - 1n && boundary < 0) boundary = p;
    if (v === top && boundary >= 0 && bad.length < 20) bad.push(`page ${p} holds ${v} after page ${boundary} held ${top - 1n}: written after the snapshot`);
  });
  return bad;
}

test('KSM merging during a capture: the snapshot holds no page written after it', async () => {
  const saved = SETTINGS.map((k) => fs.readFileSync(KSM + k, 'utf8').trim());
  let pid = 0;
  try {
    fs.writeFileSync(KSM + 'pages_to_scan', '5000');
    fs.writeFileSync(KSM + 'sleep_millisecs', '10');
    fs.writeFileSync(KSM + 'run', '1');
    const t = await startKsmTarget(64, 3000);
    pid = t.pid;
    const merged = () => Number(fs.readFileSync(`/proc/${t.pid}/ksm_merging_pages`, 'utf8'));
    for (const until = Date.now() + 15_000; merged() < 2000 && Date.now() < until;) await new Promise((r) => setTimeout(r, 100));
    const sharing = merged();
    // Paced to ~8 s so the target rewrites every page (every 3 s) meanwhile.
    const cap = captureProcess(t.pid, { rateLimitMBps: 8, stallTimeoutMs: 60_000 });
    const c = await collect(cap.events, t.base, t.size);
    const s = cap.stats();
    console.log(`  target pages merged by KSM before the capture: ${sharing}, after: ${merged()}; capture ${s.seconds.toFixed(1)} s, ${s.faults} faults, lost protection ${s.lostProtectionPages}, discarded ${s.discardedPages}`);
    assert.ok(sharing >= 2000, 'ksmd merges the target\'s pages');
    assert.ok(c.end, 'capture completed');
    assert.is(c.duplicates, 0);
    assert.is(c.missing, 0);
    const rb = c.blocks[c.regionBlock];
    const first = (t.base - rb.address) / PAGE;
    const bad = checkSweep(c.region!, c.recorded.get(c.regionBlock)!, first);
    assert.equal(bad.slice(0, 5), [], `${bad.length} problems`);
    assert.ok(isAlive(t.pid), 'target alive');
  } finally {
    if (pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
    // run first: stop merging before the speed settings go back.
    fs.writeFileSync(KSM + 'run', saved[0] === '1' ? '1' : saved[0]);
    fs.writeFileSync(KSM + 'pages_to_scan', saved[1]);
    fs.writeFileSync(KSM + 'sleep_millisecs', saved[2]);
    assert.equal(SETTINGS.map((k) => fs.readFileSync(KSM + k, 'utf8').trim()), saved, 'ksmd settings restored');
  }
});

test.run();
