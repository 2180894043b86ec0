// Targets whose seccomp filter acts on userfaultfd(2), the syscall bgsnap
// injects (SystemCallFilter=, browser sandboxes): killing, trapping (SIGSYS),
// failing with an errno, or notifying a supervisor. As root the filter is
// suspended for our injected syscalls only (PTRACE_O_SUSPEND_SECCOMP): the
// capture succeeds, the filter never fired, and it is still in force afterwards
// (the target then calls userfaultfd itself and meets the filter's action).
// A tracer that cannot suspend it refuses before touching the target.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { captureCli, startForked, statusField, untouched } from './helpers/forked-target';

// What the target sees when it calls userfaultfd itself after the capture.
const AFTER: Record<string, RegExp> = {
  kill: /^exit status=-1 signal=31$/, // SIGSYS: killed by the filter
  trap: /^ret=\S+ errno=\d+ sigsys=1 notes=0$/,
  errno: /^ret=-1 errno=13 sigsys=0 notes=0$/, // EACCES, the filter's errno
  notify: /^ret=-1 errno=1 sigsys=0 notes=1$/, // the supervisor saw it and said EPERM
};

for (const action of Object.keys(AFTER)) {
  test(`seccomp ${action} on userfaultfd: captured, target unharmed, filter still in force`, async () => {
    const t = await startForked('seccomp', [action]);
    try {
      assert.is(statusField(t.pid, 'Seccomp'), '2');
      const filters = statusField(t.pid, 'Seccomp_filters');
      const r = await captureCli(t.pid);
      assert.is(r.code, 0, r.stderr);
      assert.is(r.stats?.seccompSuspended, true);
      assert.ok(r.stats!.pages > 1000, `pages ${r.stats!.pages}`);
      assert.ok(untouched(t.pid), 'detached, running');
      assert.is(statusField(t.pid, 'Seccomp_filters'), filters, 'the same filters');
      assert.is(await t.ask('count'), 'sigsys=0 notes=0', 'the filter never fired for our syscalls');
      const after = action === 'kill' ? (t.send('call'), await t.close()) : await t.ask('call');
      assert.match(after, AFTER[action]);
    } finally {
      t.kill();
    }
  });
}

// Pre-copy plants two userfaultfds in its first stop (the second, synchronous,
// for a finish with faults): the filter is suspended for both, and neither
// reaches it.
for (const action of ['kill', 'notify']) {
  test(`seccomp ${action} on userfaultfd, --precopy (two injections): captured, unharmed, filter in force`, async () => {
    const t = await startForked('seccomp', [action]);
    try {
      const filters = statusField(t.pid, 'Seccomp_filters');
      const r = await captureCli(t.pid, ['--precopy']);
      assert.is(r.code, 0, r.stderr);
      assert.is(r.stats?.seccompSuspended, true);
      assert.ok(untouched(t.pid), 'detached, running');
      assert.is(statusField(t.pid, 'Seccomp_filters'), filters, 'the same filters');
      assert.is(await t.ask('count'), 'sigsys=0 notes=0', 'the filter never fired for our syscalls');
      const after = action === 'kill' ? (t.send('call'), await t.close()) : await t.ask('call');
      assert.match(after, AFTER[action]);
    } finally {
      t.kill();
    }
  });
}

test('a tracer that cannot suspend seccomp refuses the target before touching it', async () => {
  const t = await startForked('seccomp', ['kill']);
  try {
    const r = await captureCli(t.pid, [], 'BGSNAP_TEST_NO_SUSPEND_SECCOMP=1');
    assert.is(r.code, 1, r.stderr);
    assert.match(r.stderr, new RegExp(`thread ${t.pid} of process ${t.pid} runs under seccomp \\(Seccomp: 2\\).*refused before touching it \\[EPERM\\]`));
    assert.ok(untouched(t.pid));
    assert.is(await t.ask('count'), 'sigsys=0 notes=0');
    t.send('call');
    assert.match(await t.close(), AFTER.kill, 'filter in force');
  } finally {
    t.kill();
  }
});

// A real non-root tracer: bgsnap run as nobody on nobody's sandboxed process
// lacks CAP_SYS_ADMIN, so it refuses before any ptrace request.
test('non-root: bgsnap as nobody refuses nobody\'s seccomp target before touching it', async () => {
  // nobody must be able to run this checkout's bgsnap-capture: a clone inside a
  // 0700 directory (mktemp -d) is out of its reach, and then this cannot be run.
  const capture = path.resolve(__dirname, '..', 'bin', 'bgsnap-capture.js');
  if (spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'test', '-r', capture]).status !== 0) {
    console.log(`  (not run: nobody cannot read ${capture}; clone into a directory others can enter)`);
    return;
  }
  const t = await startForked('seccomp', ['trap'], 65534);
  try {
    const r = await captureCli(t.pid, [], 'setpriv --reuid=65534 --regid=65534 --clear-groups');
    assert.is(r.code, 1, r.stderr);
    assert.match(r.stderr, /runs under seccomp \(Seccomp: 2\).*needs root \(CAP_SYS_ADMIN\).*\[EPERM\]/);
    assert.ok(untouched(t.pid));
    assert.is(await t.ask('count'), 'sigsys=0 notes=0');
  } finally {
    t.kill();
  }
});

test.run();
