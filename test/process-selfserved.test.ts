// A target that serves part of its own memory: a memfd range registered with
// its own userfaultfd (MISSING mode) and filled by its own handler thread, or
// a file on its own FUSE mount. We cannot protect those ranges (EBUSY; a
// private file mapping), so they are copied while the target is frozen, and
// reading a page not yet filled waits for the target's handler or FUSE server,
// which is frozen too. The read is bounded: the capture fails with ETIMEDOUT
// naming the range, and the target is released with its handler working.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, isAlive, startTarget, writeProtectedPages } from './process-target';

// The capture fails within the timeout naming the range (`path`), and the
// target is released with its own server still answering.
async function boundedAndReleased(mode: 'selfuffd' | 'selffuse', path: RegExp) {
  const t = await startTarget(mode, 32, 2);
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
    console.log(`  ${mode}: failed after ${ms} ms: ${error?.code} ${error?.message}`);
    assert.ok(error, 'the capture cannot complete');
    assert.is(error!.code, 'ETIMEDOUT', error!.message);
    assert.match(error!.message, path);
    assert.match(error!.message, /while the target was frozen/);
    assert.match(error!.message, /serves this memory itself/);
    assert.ok(ms < 10_000, `failed within the timeout, not left waiting (${ms} ms)`);
    assert.ok(isAlive(t.pid), 'target alive');
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'no page write-protected');
    assert.ok((await allThreadsProgress(t)).ok, 'every thread progresses');
    assert.match(await t.command('probe'), /^probe page=255 magic=5346 index=255$/, 'its own server still answers');
    assert.match(await t.command('check'), /^check ok/);
  } finally {
    t.kill();
  }
}

test('a range the target serves itself (its userfaultfd): bounded frozen read, clear error, target released', async () => {
  await boundedAndReleased('selfuffd', /reading 0x[0-9a-f]+ in [0-9a-f]+-[0-9a-f]+ rw-s \/memfd:bgsnap-self /);
});

// FUSE: a file the target implements, mapped private and writable (which
// userfaultfd cannot write-protect, so it is copied while frozen). Mounting
// needs root.
test('a file the target serves itself (FUSE): bounded frozen read, clear error, target released', async () => {
  if (process.getuid?.() !== 0) return console.log('  not run: mounting FUSE needs root');
  await boundedAndReleased('selffuse', /reading 0x[0-9a-f]+ in [0-9a-f]+-[0-9a-f]+ rw-p \S*file /);
});

test.run();
