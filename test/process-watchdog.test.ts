// A capture whose consumer stops taking pages must not hold the target's writers
// forever: the watchdog drops the write protection after stallTimeoutMs, the
// capture fails saying so, and the target runs on, unprotected and intact.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { assertReleased, startTarget } from './process-target';

test('a consumer that holds every buffer: the watchdog releases the target', async () => {
  const t = await startTarget('anon', 128, 3);
  try {
    // zeroCopy batches are never released here, so after 8 MiB the saver can
    // put no page anywhere and the target's writers wait on it.
    const cap = captureProcess(t.pid, { zeroCopy: true, bufferMb: 8, stallTimeoutMs: 1500 });
    const started = Date.now();
    let error: (Error & { code?: string }) | undefined;
    try {
      for await (const _ of cap.events) void _;
    } catch (e) {
      error = e as Error & { code?: string };
    }
    assert.ok(error, 'the capture cannot complete');
    assert.is(error!.code, 'ETIMEDOUT', error!.message);
    assert.match(error!.message, /capture stalled for \d+ ms; protection dropped/);
    assert.ok(Date.now() - started < 15_000, 'released within the timeout, not left waiting');
    await assertReleased(t);
  } finally {
    t.kill();
  }
});

test.run();
