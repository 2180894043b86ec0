// Targets that change their memory layout while being captured (madvise
// DONTNEED, munmap + mmap, mremap), a target running as an unprivileged user,
// and shared memory with holes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { captureProcess } from '../capture/process-source';
import {
  allThreadsProgress, buildTarget, checkInvariant, collect, startTarget, writeProtectedPages, type Collected,
} from './process-target';

const PAGE = 4096;
const SCRATCH_MAGIC = 0x6863726174637362n;

// Scratch pages must be whole (stamps equal their version) and in order: a page
// saved from the wrong place after an mremap would show the wrong neighbour.
// The page the churn thread was filling at the snapshot point is exempt.
function checkScratch(c: Collected, region: Buffer): { pages: number; bad: string[] } {
  const active = region.readBigUInt64LE(2048) === 1n;
  const filling = Number(region.readBigUInt64LE(2056));
  const bad: string[] = [];
  let pages = 0;
  for (const [bi, img] of c.blockImages) {
    const addr = c.blocks[bi].address;
    let prev: { slot: bigint; page: bigint } | undefined;
    for (let p = 0; p < img.length / PAGE; p++) {
      const o = p * PAGE;
      if (img.readBigUInt64LE(o) !== SCRATCH_MAGIC) { prev = undefined; continue; }
      pages++;
      const slot = img.readBigUInt64LE(o + 8), page = img.readBigUInt64LE(o + 16), version = img.readBigUInt64LE(o + 24);
      const exempt = active && addr + o === filling;
      for (let k = 1; k <= 63 && !exempt; k++) {
        if (img.readBigUInt64LE(o + 64 * k) !== version) { bad.push(`block ${bi} page ${p} torn`); break; }
      }
      if (prev && prev.slot === slot && page !== prev.page + 1n) bad.push(`block ${bi} page ${p} out of order`);
      prev = { slot, page };
    }
  }
  return { pages, bad };
}

test('a target that frees, unmaps and moves memory while captured', async () => {
  const t = await startTarget('churn', 64, 2);
  try {
    await new Promise((r) => setTimeout(r, 200));
    const cap = captureProcess(t.pid, { rateLimitMBps: 40 });
    const c = await collect(cap.events, t.base, t.size, true);
    const s = cap.stats();
    assert.ok(c.end, 'capture completed');
    assert.is(c.duplicates, 0, 'no page recorded twice (saved or discarded)');
    assert.is(c.missing, 0, 'every page saved or marked discarded');
    const r = checkInvariant(c.region!);
    assert.ok(r.ok, r.detail);
    const ev = s.layoutEvents;
    assert.ok(ev.remove > 0 && ev.unmap > 0 && ev.remap > 0, `layout events seen: ${JSON.stringify(ev)}`);
    assert.ok(s.discardedPages > 0, 'destroyed pages are marked discarded');
    const total = [...c.discarded.values()].reduce((a, b) => a + b, 0);
    assert.is(total, s.discardedPages, 'discard events match the count');
    const sc = checkScratch(c, c.region!);
    assert.ok(sc.pages > 100, `scratch pages captured: ${sc.pages}`);
    assert.equal(sc.bad, []);
    console.log(`  churn: ${JSON.stringify(ev)}, discarded ${s.discardedPages}, scratch pages ${sc.pages}, ${s.seconds.toFixed(2)} s`);
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0);
    assert.ok((await allThreadsProgress(t)).ok, 'threads progress');
  } finally {
    t.kill();
  }
});

test('a target running as nobody (vm.unprivileged_userfaultfd=0)', async () => {
  const sysctl = '/proc/sys/vm/unprivileged_userfaultfd';
  const before = fs.readFileSync(sysctl, 'utf8').trim();
  const t = await startTarget('anon', 64, 2, 65534);
  try {
    assert.is(fs.statSync(`/proc/${t.pid}`).uid, 65534, 'target runs as nobody');
    const cap = captureProcess(t.pid);
    const c = await collect(cap.events, t.base, t.size);
    const r = checkInvariant(c.region!);
    assert.ok(r.ok, r.detail);
    assert.is(c.missing, 0);
    assert.is(cap.stats().sysctlToggled, before === '0', 'sysctl opened only when it had to be');
    assert.is(fs.readFileSync(sysctl, 'utf8').trim(), before, 'sysctl restored');
    assert.match(await t.command('check'), /^check ok/);
    assert.ok((await allThreadsProgress(t)).ok);
  } finally {
    t.kill();
  }
});

// Resident kB of the mapping starting at addr (/proc/PID/smaps).
function rssKb(pid: number, addr: number): number {
  const text = fs.readFileSync(`/proc/${pid}/smaps`, 'utf8');
  const at = text.indexOf(`${addr.toString(16)}-`);
  return Number(/\nRss:\s+(\d+)/.exec(text.slice(at))?.[1] ?? -1);
}

test('shared memory with holes: the holes are recorded as zero, never read (so never allocated)', async () => {
  const child = spawn(buildTarget('sparse'), ['64'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [line] = (await once(child.stdout!, 'data')) as [Buffer];
  const m = /ready pid=(\d+) memfd=0x([0-9a-f]+) shared=0x([0-9a-f]+) size=(\d+) fd=(\d+)/.exec(line.toString());
  assert.ok(m, line.toString());
  const pid = Number(m![1]), size = Number(m![4]);
  const maps = [parseInt(m![2], 16), parseInt(m![3], 16)];
  try {
    const blocks = () => fs.statSync(`/proc/${pid}/fd/${m![5]}`).blocks;
    const before = { rss: maps.map((a) => rssKb(pid, a)), blocks: blocks() };
    const cap = captureProcess(pid);
    const c = await collect(cap.events, maps[0], size, true);
    assert.ok(c.end);
    assert.is(c.missing, 0);
    for (const addr of maps) {
      const bi = c.blocks.findIndex((b) => b.address === addr);
      const img = c.blockImages.get(bi)!;
      let bad = 0;
      for (let p = 0; p < size / PAGE; p++) {
        const written = p % 2048 < 256;
        if (img.readBigUInt64LE(p * PAGE) !== (written ? BigInt(p + 1) : 0n) || img[p * PAGE + 100] !== (written ? 0x5a : 0)) bad++;
      }
      assert.is(bad, 0, `mapping ${addr.toString(16)}: pages with wrong content`);
    }
    assert.equal({ rss: maps.map((a) => rssKb(pid, a)), blocks: blocks() }, before, 'nothing allocated in the target');
    assert.ok(cap.stats().untouchedPages >= (2 * size / PAGE) * 7 / 8, `holes as zero records: ${cap.stats().untouchedPages}`);
  } finally {
    process.kill(pid, 'SIGKILL');
  }
});

test.run();
