// Memory write-protection cannot fully see, and mappings that are not ordinary
// memory. Writes that bypass the protection (a write(2) to a memfd that is also
// mapped, io_uring fixed buffers) are reported in --stats and on stderr. Device
// memory (VM_IO | VM_PFNMAP; here a perf_event ring) is left out and does not
// count toward the 64 MiB frozen-copy cap; a private /dev/zero mapping is
// anonymous memory: its untouched pages are recorded as zero without reading.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureCli, startForked, untouched, type ForkedTarget } from './helpers/forked-target';

async function withTarget(mode: string, fn: (t: ForkedTarget) => Promise<void>): Promise<void> {
  const t = await startForked('oddity', [mode]);
  try {
    await fn(t);
  } finally {
    t.kill();
  }
}

test('a memfd both mapped and open, written with write(2) during the capture: reported', () => withTarget('memfd', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.equal(r.stats!.unseenWrites.mappedFds, ['fd 3: /memfd:oddity-memfd (deleted)']);
  assert.match(r.stderr, /warning: fd 3: \/memfd:oddity-memfd \(deleted\) is also mapped shared and writable: write\(2\) to it changes the mapped pages without a fault/);
  assert.is(r.stats!.unseenWrites.ioUringBuffers, 0);
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

test('io_uring registered (fixed) buffers, and an O_DIRECT file: reported', () => withTarget('iouring', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stats!.unseenWrites.ioUringBuffers, 1);
  assert.is(r.stats!.unseenWrites.ioUringBufferBytes, 1 << 20);
  assert.match(r.stderr, /warning: 1 io_uring fixed buffer\(s\) \(1048576 bytes\) are pinned/);
  assert.equal(r.stats!.unseenWrites.mappedFds, []);
  assert.is(r.stats!.unseenWrites.directIoFds.length, 1);
  assert.match(r.stderr, /warning: fd \d+: \S+oddity-\w+ is open with O_DIRECT/);
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

test('an ordinary target reports nothing unseen', () => withTarget('devzero', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.equal(r.stats!.unseenWrites.warnings, []);
  assert.not.match(r.stderr, /warning/);
}));

// 128 MiB of perf rings, writable and shared: before, it was counted as memory to
// copy while frozen and the capture was refused (EFBIG) past 64 MiB.
test('device memory (128 MiB of perf_event rings, VM_IO|VM_PFNMAP) is left out, not counted toward the cap', () => withTarget('perf', async (t) => {
  // The kernel marks perf rings VM_DONTDUMP ("dd"), so by default they are left
  // out as its cores leave them out: not captured at all.
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.ok(r.stats!.capturedBytes < 64 << 20, `captured ${r.stats!.capturedBytes} bytes`);
  assert.ok(r.stats!.pagesCopiedFrozen < 1000, `copied ${r.stats!.pagesCopiedFrozen}`);
  // With --include-dontdump they are captured blocks whose pages are unreadable:
  // recorded as discarded, not copied.
  const dd = await captureCli(t.pid, ['--include-dontdump']);
  assert.is(dd.code, 0, dd.stderr);
  assert.ok(dd.stats!.discardedPages >= 2 * 16385, `discarded ${dd.stats!.discardedPages}`);
  assert.ok(dd.stats!.pagesCopiedFrozen < 1000, `copied ${dd.stats!.pagesCopiedFrozen}`);
  assert.ok(untouched(t.pid));
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

// 64 MiB private /dev/zero, 1 MiB of it written: the 63 MiB never touched are
// zero records taken from the page tables, not pages read one by one (all the
// rest of the target, thread stacks included, has fewer than 5000 such pages).
test('a private /dev/zero mapping counts as anonymous memory', () => withTarget('devzero', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.ok(r.stats!.untouchedPages >= 16128, `untouched ${r.stats!.untouchedPages}`);
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

test.run();
