// Issue 10's kernel case for tracking writes between generations: transparent
// huge pages (and 4 KiB pages) dropped with MADV_DONTNEED while tracked, then
// partly written again. A July 2026 kernel fix concerns PAGEMAP_SCAN missing
// the "written" state of ranges with no page table (what a dropped THP leaves).
// test/targets/thpdrop.c tracks its own memory with each method and prints what
// the method reports per interval; here we check that an engine which also
// reads UFFD_EVENT_REMOVE (marking a dropped range written and re-protecting
// it; sync needs UFFD_FEATURE_WP_UNPOPULATED for that re-protect to hold)
// gets exactly the pages whose content changed, for both methods; controls
// without the event or the feature show the check catching what they lose,
// and we print what the kernel's own report gives without the events.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as os from 'node:os';
import { buildTarget } from './process-target';

const THP = 512, SMALL = 3 * THP; // pages; the region is 3 THPs then 2 MiB of 4 KiB pages

type Runs = Set<number>;
interface Interval { written: Runs; removed: Runs; huge: number }
interface Report { armedHuge: number; intervals: Interval[] }

function pages(runs: string): Runs {
  const s = new Set<number>();
  if (runs === '-') return s;
  for (const r of runs.split(',')) {
    const [a, b] = r.split('-').map(Number);
    for (let i = a; i < b; i++) s.add(i);
  }
  return s;
}

function runs(s: Runs): string {
  const v = [...s].sort((a, b) => a - b), out: string[] = [];
  for (let i = 0; i < v.length;) {
    let j = i;
    while (j + 1 < v.length && v[j + 1] === v[j] + 1) j++;
    out.push(`${v[i]}-${v[j] + 1}`);
    i = j + 1;
  }
  return out.join(',') || '-';
}

function track(method: 'sync' | 'async', remove: boolean, unpopulated = true): Report {
  const argv = [method, remove ? '1' : '0', unpopulated ? '1' : '0'];
  const out = execFileSync(buildTarget('thpdrop'), argv, { encoding: 'utf8', timeout: 30_000 });
  const lines = out.trim().split('\n');
  const armed = /^armed huge=(\d+)$/.exec(lines[0]);
  if (!armed) throw new Error(`thpdrop ${method} said: ${out}`);
  const intervals = lines.slice(1).map((l) => {
    const m = /^interval=\d+ written=(\S+) removed=(\S+) huge=(\d+)$/.exec(l);
    if (!m) throw new Error(`thpdrop ${method}: unexpected line ${l}`);
    return { written: pages(m[1]), removed: pages(m[2]), huge: Number(m[3]) };
  });
  return { armedHuge: Number(armed[1]), intervals };
}

const range = (a: number, b: number) => Array.from({ length: b - a }, (_, i) => a + i);
// The pages whose content changed in each interval (thpdrop.c's script).
const CHANGED: Runs[] = [
  new Set([3]),
  new Set([5, ...range(THP, 3 * THP), ...range(SMALL + 30, SMALL + 40)]),
  new Set([7, THP + 12, 2 * THP + 20, SMALL + 32]),
];

const union = (a: Runs, b: Runs) => new Set([...a, ...b]);
const missing = (want: Runs, got: Runs) => runs(new Set([...want].filter((p) => !got.has(p))));
const extra = (want: Runs, got: Runs) => runs(new Set([...got].filter((p) => !want.has(p))));

function assertEngine(method: 'sync' | 'async', r: Report) {
  assert.is(r.armedHuge, 3 * THP, `${method}: the three THPs were huge when armed`);
  assert.is(r.intervals.length, 3);
  r.intervals.forEach((iv, k) => {
    const seen = union(iv.written, iv.removed);
    assert.is(missing(CHANGED[k], seen), '-', `${method} interval ${k + 1}: changed pages not reported`);
    assert.is(extra(CHANGED[k], seen), '-', `${method} interval ${k + 1}: pages reported but not changed`);
  });
}

function describe(method: string, r: Report): string {
  return r.intervals.map((iv, k) => `${method} interval ${k + 1}: written ${runs(iv.written)}, removed ${runs(iv.removed)}, ` +
    `kernel's report alone misses ${missing(CHANGED[k], iv.written)}, huge pages now ${iv.huge}`).join('\n');
}

test(`sync write-protect with UFFD_EVENT_REMOVE: every changed page, dropped THPs included (Linux ${os.release()})`, () => {
  const r = track('sync', true);
  console.log(describe('sync', r));
  assertEngine('sync', r);
  // The faults alone never see a dropped range: its new pages come in writable.
  assert.ok(!r.intervals[1].written.has(THP + 10), 'sync: a rewrite of a dropped THP faulted');
});

test('sync write-protect without the REMOVE event loses the dropped ranges (control: the check sees misses)', () => {
  const r = track('sync', false);
  console.log(describe('sync, no REMOVE', r));
  // Nothing re-protects what was dropped, so its later writes are lost for good.
  assert.is(missing(CHANGED[1], r.intervals[1].written), runs(new Set(range(THP, 3 * THP).concat(range(SMALL + 30, SMALL + 40)))));
  assert.is(missing(CHANGED[2], r.intervals[2].written), runs(new Set([THP + 12, 2 * THP + 20, SMALL + 32])));
});

test('sync write-protect with REMOVE but without UFFD_FEATURE_WP_UNPOPULATED misses first writes to a dropped range (control)', () => {
  const r = track('sync', true, false);
  console.log(describe('sync, no WP_UNPOPULATED', r));
  // Re-protecting a range with no page table does nothing without the feature,
  // so the page faulted in there by the next write comes in writable.
  assert.is(missing(CHANGED[2], union(r.intervals[2].written, r.intervals[2].removed)), runs(new Set([2 * THP + 20, SMALL + 32])));
});

test('WP_ASYNC + PAGEMAP_SCAN(WP_MATCHING) with UFFD_EVENT_REMOVE: every changed page', () => {
  const r = track('async', true);
  console.log(describe('async', r));
  assertEngine('async', r);
});

test('WP_ASYNC + PAGEMAP_SCAN without the REMOVE event: what the kernel reports by itself', () => {
  const r = track('async', false);
  console.log(describe('async, no REMOVE', r));
  const lost = r.intervals.map((iv, k) => missing(CHANGED[k], iv.written));
  if (lost.some((l) => l !== '-')) {
    console.log(`  Linux ${os.release()}: PAGEMAP_SCAN misses written pages (${lost.join(' | ')}): an engine must read UFFD_EVENT_REMOVE`);
  } else {
    console.log(`  Linux ${os.release()}: PAGEMAP_SCAN reports dropped ranges as written by itself`);
  }
  // Whatever the kernel, it must never report a page nobody changed.
  r.intervals.forEach((iv, k) => assert.is(extra(CHANGED[k], iv.written), '-', `async interval ${k + 1}`));
});

test.run();
