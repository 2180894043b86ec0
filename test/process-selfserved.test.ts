// A target that serves part of its own memory: a memfd range registered with
// its own userfaultfd (MISSING mode) and filled by its own handler thread. We
// cannot protect that range (EBUSY), so it is copied while the target is
// frozen, and reading a page the handler has not filled waits for the handler,
// which is frozen too. The read is bounded: the capture fails with ETIMEDOUT
// naming the range, and the target is released with its handler working.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, isAlive, startTarget, writeProtectedPages } from './process-target';

test('a range the target serves itself: bounded frozen read, clear error, target released', async () => {
  const t = await startTarget('selfuffd', 32, 2);
  try {
    const started = Date.now();
    const cap = captureProcess(t.pid, { frozenReadTimeoutMs: 1000 });
    let error: (Error & { code?: string }) | undefined;
    try {
      for await (const _ of cap.events) void _;
    } catch (e) {
      error = e as Error & { code?: string };
    }
    const ms = Date.now() - started;
    console.log(`  failed after ${ms} ms: ${error?.code} ${error?.message}`);
    assert.ok(error, 'the capture cannot complete');
    assert.is(error!.code, 'ETIMEDOUT', error!.message);
    assert.match(error!.message, /reading 0x[0-9a-f]+ in [0-9a-f]+-[0-9a-f]+ rw-s \/memfd:bgsnap-self .*while the target was frozen/);
    assert.match(error!.message, /serves this memory itself/);
    assert.ok(ms < 10_000, `failed within the timeout, not left waiting (${ms} ms)`);
    assert.ok(isAlive(t.pid), 'target alive');
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'no page write-protected');
    assert.ok((await allThreadsProgress(t)).ok, 'every thread progresses');
    assert.match(await t.command('probe'), /^probe page=255 magic=5346 index=255$/, 'its own handler still serves its faults');
    assert.match(await t.command('check'), /^check ok/);
  } finally {
    t.kill();
  }
});

test.run();
