// Which QEMUs forget their write protection, and the refusal that comes before
// QEMU is touched when bgsnap could not undo that (capture/qemu-uffd.ts). The
// release itself is tested on a real QEMU 7.2 in vm-faults and vm-disks-faults.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { forgetsWriteProtection, refuseUnlessReleasable } from '../capture/qemu-uffd';

test('QEMU before 8.1 forgets its write protection; 8.1 and later do not', () => {
  assert.equal(['6.0.0', '7.2.22', '8.0.5', '8.1.0', '9.2.0', '10.0.2'].map(forgetsWriteProtection), [true, true, true, false, false, false]);
});

// As nobody, against this (root's) test process: pidfd_getfd is not allowed.
function asNobody(version: string): { status: number | null; stderr: string } {
  const mod = path.join(__dirname, '..', 'capture', 'qemu-uffd.js');
  const code = `require(${JSON.stringify(mod)}).refuseUnlessReleasable(${JSON.stringify(version)}, ${process.pid})`;
  const r = spawnSync('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', process.execPath, '-e', code], { encoding: 'utf8' });
  return { status: r.status, stderr: r.stderr };
}

test('a 7.2 capture is refused up front when bgsnap may not take QEMU\'s fds; root may; 8.1+ needs nothing', () => {
  if (process.getuid?.() !== 0) return console.log('  (not run: needs root to act as nobody)');
  // nobody must be able to load this checkout: a clone inside a 0700 directory
  // (mktemp -d) is out of its reach, and then this cannot be run.
  const mod = path.join(__dirname, '..', 'capture', 'qemu-uffd.js');
  if (spawnSync('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', 'test', '-r', mod]).status !== 0) {
    return console.log(`  (not run: nobody cannot read ${mod}; clone into a directory others can enter)`);
  }
  const refused = asNobody('7.2.22');
  assert.is.not(refused.status, 0);
  assert.match(refused.stderr, /QEMU 7\.2\.22 \(pid \d+\) leaves guest RAM write-protected .*EPERM.*QEMU 8\.1 or later/s);
  assert.is(asNobody('10.0.2').status, 0, 'QEMU 10 cleans up itself: no check');
  refuseUnlessReleasable('7.2.22', process.pid); // root: allowed, does not throw
});

test.run();
