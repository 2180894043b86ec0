// Which read-only mappings are copied after the freeze: a private file mapping
// with modified pages (RELRO) and the vdso, but not one marked MADV_DONTDUMP
// (VmFlags "dd"), which is recorded as skipped unless includeDontDump. Real
// smaps text shapes, as Linux 6.x prints them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DONTDUMP_HOW, pickReadOnly } from '../capture/readonly-maps';
import type { ProcessMap } from '../format/process-state';

const map = (start: number, perms: string, path: string, inode: number): ProcessMap => ({
  start, end: start + 0x2000, perms, offset: 0, dev: '08:01', inode, path, block: -1, how: 'skipped: not writable',
});

function smapsEntry(m: ProcessMap, anonKb: number, flags: string): string {
  const hex = (v: number) => v.toString(16).padStart(8, '0');
  return [
    `${hex(m.start)}-${hex(m.end)} ${m.perms} 00000000 ${m.dev} ${m.inode}          ${m.path}`,
    'Size:                  8 kB', 'Rss:                   8 kB', `Anonymous:          ${anonKb} kB`, `VmFlags: ${flags}`,
  ].join('\n');
}

function setup(): { maps: ProcessMap[]; smaps: string } {
  const maps = [
    map(0x555555554000, 'r--p', '/usr/bin/prog', 11), // RELRO: modified
    map(0x7ffff7dd0000, 'r--p', '/usr/lib/libsecret.so', 12), // modified, then MADV_DONTDUMP
    map(0x7ffff7ff0000, 'r-xp', '[vdso]', 0),
  ];
  const smaps = [
    smapsEntry(maps[0], 8, 'rd mr mw me dw ac sd'),
    smapsEntry(maps[1], 8, 'rd mr mw me ac sd dd'),
    smapsEntry(maps[2], 0, 'rd ex mr mw me de sd'),
  ].join('\n') + '\n';
  return { maps, smaps };
}

test('a MADV_DONTDUMP read-only mapping is not copied, and says why', () => {
  const { maps, smaps } = setup();
  assert.equal(pickReadOnly(maps, smaps), [0, 2]);
  assert.is(maps[1].how, DONTDUMP_HOW);
});

test('includeDontDump copies it', () => {
  const { maps, smaps } = setup();
  assert.equal(pickReadOnly(maps, smaps, true), [0, 1, 2]);
});

test.run();
