// A watchdog releasing the target under a stuck saver must not close the
// userfaultfd under it: the process could reuse that number for another file,
// which would then receive the saver's ioctls. It unregisters the target's
// mappings through the fd instead; only the capture thread closes it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, startTarget, writeProtectedPages } from './process-target';

function userfaultfds(): number {
  let n = 0;
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try { if (fs.readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[userfaultfd]') n++; } catch { /* closed meanwhile */ }
  }
  return n;
}

test('the watchdog releases the target under a stuck saver without closing its fd', async () => {
  const t = await startTarget('anon', 128, 3);
  try {
    const before = userfaultfds();
    const started = Date.now();
    // 'stuck': the saver sleeps 12 s after its first chunk, deaf to abort, as
    // if inside a kernel call.
    const cap = captureProcess(t.pid, { stallTimeoutMs: 1000, testHoldAt: 'stuck', testHoldMs: 12_000, rateLimitMBps: 50 });
    const done = (async () => { for await (const _ of cap.events) void _; })().then(() => undefined, (e: Error & { code?: string }) => e);
    const wp = () => writeProtectedPages(t.pid, t.base, t.size);
    while (wp() === 0 && Date.now() - started < 20_000) await new Promise((r) => setTimeout(r, 50));
    while (wp() > 0 && Date.now() - started < 20_000) await new Promise((r) => setTimeout(r, 100));
    const releasedMs = Date.now() - started;
    const open = userfaultfds();
    console.log(`  released after ${releasedMs} ms (stall 1 s + grace 1 s); userfaultfds open ${open} (before ${before}); state ${cap.stats().state}`);
    assert.is(wp(), 0, 'released');
    assert.is(open, before + 1, 'the stuck saver\'s userfaultfd is still open: its number cannot be reused under it');
    assert.ok((await allThreadsProgress(t, 400, 3000)).ok, 'every thread progresses while the saver is stuck'); // patience within its 12 s
    const error = await done;
    assert.ok(error, 'the capture failed');
    assert.is(error!.code, 'ETIMEDOUT', error!.message);
    assert.is(userfaultfds(), before, 'closed once the saver ended');
    assert.match(await t.command('check'), /^check ok/);
  } finally {
    t.kill();
  }
});

test.run();
