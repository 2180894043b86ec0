// Killing the capturing process with SIGKILL at any moment must leave the target
// running normally: right after the injection (threads still stopped), once its
// memory is write-protected ahead of the freeze (the target running), while
// frozen with every page write-protected, while its writers wait on a fault the
// saver is not serving, and in the middle of a paced copy. Afterwards no page is
// write-protected, no thread is stuck, memory is intact, and a second snapshot
// is consistent.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import {
  allThreadsProgress, checkInvariant, collect, isAlive, killCaptureAt, startTarget, writeProtectedPages, type Target,
} from './process-target';

async function assertRecovered(t: Target, label: string) {
  await new Promise((r) => setTimeout(r, 100));
  assert.ok(isAlive(t.pid), `${label}: target alive`);
  assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, `${label}: no page write-protected`);
  const p = await allThreadsProgress(t);
  assert.ok(p.ok, `${label}: every thread progresses ${p.before} -> ${p.after}`);
  const live = await t.command('check');
  assert.match(live, /^check ok/, `${label}: ${live}`);
  const cap = captureProcess(t.pid);
  const c = await collect(cap.events, t.base, t.size);
  const r = checkInvariant(c.region!);
  assert.ok(r.ok, `${label}: second snapshot ${r.detail}`);
  assert.is(c.duplicates, 0);
}

// [label, hold point, marker, delay ms, rate MB/s, target MiB]: 128 MiB targets
// are write-protected ahead of the snapshot freeze; a 16 MiB one in one stop.
const cases: [string, string, RegExp, number, number, number][] = [
  ['right after injection (threads stopped, uffd not yet armed)', 'inject', /bgsnap-hold inject/, 50, 0, 128],
  ['with injected registers in place (the freezer helper rolls back)', 'injecting', /bgsnap-hold injecting/, 50, 0, 128],
  ['with injected registers in place, one-stop freeze', 'injecting', /bgsnap-hold injecting/, 50, 0, 16],
  ['while protected ahead of the freeze, writers waiting on unserved faults', 'preprotect', /bgsnap-hold preprotect/, 300, 0, 128],
  ['during the freeze, every page write-protected', 'frozen', /bgsnap-hold frozen/, 50, 0, 128],
  ['during a one-stop freeze (small target), every page write-protected', 'frozen', /bgsnap-hold frozen/, 50, 0, 16],
  ['mid-copy while writers wait on unserved faults', 'copy', /bgsnap-hold copy/, 300, 0, 128],
  ['mid-copy of a paced scan', '-', /started/, 700, 60, 128],
];

for (const [label, at, marker, delay, rate, mib] of cases) {
  test(`SIGKILL of the capture ${label}: the target keeps running`, async () => {
    const t = await startTarget('anon', mib, 3);
    try {
      await killCaptureAt(t.pid, at, marker, delay, rate);
      await assertRecovered(t, label);
    } finally {
      t.kill();
    }
  });
}

test.run();
