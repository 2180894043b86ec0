// A JIT flipping its code areas RW -> RX -> RW (and PROT_NONE and back) while
// captured. mprotect sends no userfaultfd event and keeps the PTEs'
// write-protection, so an area registered while writable but not writable at
// the snapshot faults in no captured segment: the fault must be resolved at
// once, or the writer faults on the same page until the capture ends.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, checkInvariant, collect, startTarget, writeProtectedPages, type Collected } from './process-target';

const PAGE = 4096;
const SCRATCH_MAGIC = 0x6863726174637362n;

// Code pages that made it into the snapshot are whole: every stamp equals the
// version (the page being written at the snapshot point is exempt).
function tornCodePages(c: Collected, region: Buffer): number {
  const active = region.readBigUInt64LE(2048) === 1n;
  const filling = Number(region.readBigUInt64LE(2056));
  let torn = 0;
  for (const [bi, img] of c.blockImages) {
    for (let o = 0; o < img.length; o += PAGE) {
      if (img.readBigUInt64LE(o) !== SCRATCH_MAGIC || (active && c.blocks[bi].address + o === filling)) continue;
      const v = img.readBigUInt64LE(o + 24);
      for (let k = 1; k <= 63; k++) if (img.readBigUInt64LE(o + 64 * k) !== v) { torn++; break; }
    }
  }
  return torn;
}

test('W^X flips during captures: every thread keeps running, snapshots consistent', async () => {
  const t = await startTarget('wx', 64, 1);
  try {
    // At least 8 captures, and more (up to 40) until one met a flipped area:
    // whether a flip falls inside a capture depends on the machine's pace.
    let stray = 0, n = 0;
    for (let i = 0; i < 40 && (i < 8 || stray === 0); i++, n++) {
      // Paced so each capture lasts ~1.5 s: the flipper must progress during it.
      const cap = captureProcess(t.pid, { rateLimitMBps: 60, stallTimeoutMs: 60_000 });
      const done = collect(cap.events, t.base, t.size, true);
      await new Promise((r) => setTimeout(r, 300));
      const during = await allThreadsProgress(t, 400, 0);
      const c = await done;
      const s = cap.stats();
      stray += s.layoutEvents.strayFaults;
      assert.ok(during.ok, `capture ${i}: every thread progresses during the capture (${during.before} -> ${during.after}, stray ${s.layoutEvents.strayFaults})`);
      assert.ok(c.end, 'capture completed');
      assert.is(c.duplicates, 0, 'no page recorded twice');
      const r = checkInvariant(c.region!);
      assert.ok(r.ok, r.detail);
      assert.is(tornCodePages(c, c.region!), 0, 'captured code pages are whole');
    }
    console.log(`  ${n} captures, ${stray} faults outside captured segments resolved`);
    assert.ok(stray > 0, 'some capture met a flipped area (else this test proved nothing)');
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, 'nothing left protected');
    assert.match(await t.command('check'), /^check ok/);
  } finally {
    t.kill();
  }
});

test.run();
