// The buffer pool under stress: the smallest pool (--buffer-mb 2: two batches),
// a slow consumer that holds native batches and releases them late, out of
// order, from timers, and many captures in a row, some abandoned mid-stream
// while every batch is held (the saver then sleeps in Acquire and only the
// abort can wake it). A lost wakeup shows up as a capture that never ends, a
// close that never returns, or a target left waiting on a protected page.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import type { StreamEvent, PageBatch } from '../format/events';
import { allThreadsProgress, checkInvariant, collect, startTarget, writeProtectedPages, type Target } from './process-target';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// Hands each batch to `collect` after a delay, then releases it later from a
// timer, so releases race the saver's Acquire and arrive out of order.
async function* slowly(cap: ReturnType<typeof captureProcess>, delayMs: number, stopAfter = Infinity): AsyncGenerator<StreamEvent> {
  let n = 0, abandoned = false;
  const pending: Promise<void>[] = [];
  for await (const ev of cap.events) {
    if (ev.type === 'end') await Promise.all(pending); // releases are valid until the stream closes
    if (ev.type !== 'pages') { yield ev; continue; }
    if (n++ >= stopAfter) { abandoned = true; return; } // held batches stay held: the saver waits for one
    await sleep(delayMs);
    yield ev;
    const b: PageBatch = ev.batch;
    // An abandoned stream closes the capture first: its late releases are moot.
    pending.push(sleep(n % 3).then(() => { if (!abandoned) cap.release(b); }));
  }
}

async function targetFine(t: Target, what: string) {
  assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, `${what}: no page left write-protected`);
  const p = await allThreadsProgress(t);
  assert.ok(p.ok, `${what}: every thread progresses: ${p.before} -> ${p.after}`);
}

test('tiny pool, slow consumer, 12 captures: each completes, consistent, target unharmed', async () => {
  const t = await startTarget('anon', 24, 3);
  try {
    let waits = 0;
    for (let i = 0; i < 12; i++) {
      const cap = captureProcess(t.pid, { bufferMb: 2, zeroCopy: true, stallTimeoutMs: 20_000 });
      const c = await collect(slowly(cap, i % 4), t.base, t.size);
      const s = cap.stats();
      assert.ok(c.end, `capture ${i} ended`);
      assert.is(s.state, 'done', `capture ${i}`);
      assert.is(c.duplicates, 0);
      assert.is(c.missing, 0);
      const r = checkInvariant(c.region!);
      assert.ok(r.ok, `capture ${i}: ${r.detail}`);
      waits += s.bufferWaits;
      await targetFine(t, `capture ${i}`);
    }
    // Otherwise the test did not exercise the wait it is about.
    assert.ok(waits > 0, `the saver waited for buffers (${waits} times)`);
    console.log(`  12 captures, 2 MiB pool: the saver waited for a buffer ${waits} times`);
  } finally {
    t.kill();
  }
});

test('tiny pool: 16 captures abandoned while every batch is held end promptly, target unharmed', async () => {
  const t = await startTarget('anon', 24, 3);
  try {
    for (let i = 0; i < 16; i++) {
      const cap = captureProcess(t.pid, { bufferMb: 2, zeroCopy: true, stallTimeoutMs: 20_000 });
      const t0 = Date.now();
      // Stop after 1-3 batches; holding them leaves the saver waiting in Acquire
      // (or about to), and closing the stream must wake it.
      await collect(slowly(cap, i % 3, 1 + (i % 3)), t.base, t.size);
      const ms = Date.now() - t0;
      assert.ok(ms < 15_000, `capture ${i} closed in ${ms} ms, long before the 20 s watchdog`);
      assert.is.not(cap.stats().state, "done", `capture ${i} was abandoned before its end`);
      await targetFine(t, `abandoned capture ${i}`);
    }
    const live = await t.command('check');
    assert.match(live, /^check ok/, live);
  } finally {
    t.kill();
  }
});

test.run();
