// Process capture, end to end on real processes: a 256 MiB target whose threads
// keep writing is snapshotted at one point in time (the invariant holds exactly),
// while a plain copy of the same running memory breaks it; shared memory, memfd
// and THP targets; the target is left running, unprotected and intact.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { decodeProcessState } from '../format/process-state';
import {
  allThreadsProgress, anonHugeKb, checkInvariant, collect, startTarget, tornCopy, writeProtectedPages, type Mode, type Target,
} from './process-target';

async function snapshot(t: Target, opts = {}) {
  const cap = captureProcess(t.pid, opts);
  const c = await collect(cap.events, t.base, t.size);
  return { c, stats: cap.stats() };
}

async function assertTargetFine(t: Target) {
  assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'no page left write-protected');
  const live = await t.command('check');
  assert.match(live, /^check ok/, live);
  const p = await allThreadsProgress(t);
  assert.ok(p.ok, `every thread progresses: ${p.before} -> ${p.after}`);
}

test('256 MiB private anonymous target: a consistent point-in-time snapshot', async () => {
  const t = await startTarget('anon', 256, 3);
  try {
    await new Promise((r) => setTimeout(r, 300));
    const { c, stats } = await snapshot(t);
    assert.ok(c.end, 'stream ended');
    assert.ok(c.region, 'region block found');
    assert.is(c.duplicates, 0, 'every page saved once');
    assert.is(c.missing, 0, 'every page of every block accounted for');
    const r = checkInvariant(c.region!);
    assert.ok(r.ok, r.detail);
    assert.is(stats.state, 'done');
    assert.ok(stats.pauseMs > 0 && stats.pauseMs < 1000, `pause ${stats.pauseMs} ms`);
    assert.ok(stats.pagesByFault > 0, 'writers hit protected pages');
    assert.ok(stats.pagesByScan > 0);
    assert.is(stats.threads, t.threads + 1);
    const state = decodeProcessState(c.states[0].data);
    assert.is(state.pid, t.pid);
    assert.is(state.threads.length, t.threads + 1);
    assert.is(state.threads[0].tid, t.pid);
    assert.is(state.threads[0].regs.length, 27 * 8);
    assert.ok(state.maps.some((m) => m.path === '[heap]' || m.path === '[stack]'));
    assert.ok(state.auxv.length > 0 && state.auxv.length % 16 === 0);
    console.log(`  256 MiB: pause ${stats.pauseMs.toFixed(2)} ms (protect ${stats.pause.protectMs.toFixed(2)}), ` +
      `${stats.seconds.toFixed(2)} s, ${stats.throughputMBps.toFixed(0)} MB/s, fault pages ${stats.pagesByFault}, ` +
      `scan ${stats.pagesByScan}, fault wait p50 ${stats.faultWaitP50Ms.toFixed(2)} p99 ${stats.faultWaitP99Ms.toFixed(2)} max ${stats.faultWaitMaxMs.toFixed(2)} ms, inflight ${r.inflight}`);
    await assertTargetFine(t);
  } finally {
    t.kill();
  }
});

test('control: a copy of the running memory without the freeze breaks the invariant', async () => {
  const t = await startTarget('anon', 256, 3);
  try {
    let broken = 0;
    for (let i = 0; i < 3; i++) if (!checkInvariant(tornCopy(t.pid, t.base, t.size)).ok) broken++;
    assert.ok(broken >= 2, `torn copies detected: ${broken}/3`);
  } finally {
    t.kill();
  }
});

for (const mode of ['shared', 'memfd'] as Mode[]) {
  test(`${mode} memory target: consistent`, async () => {
    const t = await startTarget(mode, 64, 3);
    try {
      const { c, stats } = await snapshot(t);
      assert.ok(c.region && c.end);
      assert.is(c.duplicates, 0);
      assert.is(c.missing, 0);
      const r = checkInvariant(c.region!);
      assert.ok(r.ok, r.detail);
      assert.ok(stats.pagesByFault + stats.pagesByScan >= t.size / 4096);
      await assertTargetFine(t);
    } finally {
      t.kill();
    }
  });
}

test('THP target: consistent, and its huge pages stay huge', async () => {
  const t = await startTarget('thp', 256, 3);
  try {
    const before = anonHugeKb(t.pid);
    assert.ok(before >= 128 * 1024, `target has huge pages: ${before} kB`);
    for (let i = 0; i < 2; i++) {
      const { c, stats } = await snapshot(t);
      const r = checkInvariant(c.region!);
      assert.ok(r.ok, r.detail);
      assert.is(c.duplicates, 0);
      console.log(`  THP 256 MiB: pause ${stats.pauseMs.toFixed(2)} ms (protect ${stats.pause.protectMs.toFixed(2)}), ${stats.seconds.toFixed(2)} s`);
    }
    const after = anonHugeKb(t.pid);
    assert.ok(after >= before - 4096, `AnonHugePages ${before} -> ${after} kB`);
    await assertTargetFine(t);
  } finally {
    t.kill();
  }
});

test.run();
