// Targets bgsnap refuses by name before touching them (capture/preflight.ts,
// capture/native/preflight.cc), each left running, untraced, and unchanged:
// non-dumpable processes (unless --allow-nondumpable), a zombie main thread, a
// parent stopped in vfork, writable mappings over 8 TiB, 1 GiB hugetlb pages.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { captureCli, startForked, untouched, type ForkedTarget } from './helpers/forked-target';
import { tmpDir } from './helpers/net';

async function withTarget(mode: string, fn: (t: ForkedTarget) => Promise<void>, asUid?: number): Promise<void> {
  const t = await startForked('oddity', [mode], asUid);
  try {
    await fn(t);
  } finally {
    t.kill();
  }
}

const NONDUMPABLE = /is not dumpable \(prctl\(PR_SET_DUMPABLE, 0\).*refused; --allow-nondumpable .*\[EPERM\]/;

test('a non-dumpable target is refused untouched, and captured with --allow-nondumpable', () => withTarget('nondumpable', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`process ${t.pid} ${NONDUMPABLE.source}`));
  assert.ok(untouched(t.pid));
  const ok = await captureCli(t.pid, ['--allow-nondumpable']);
  assert.is(ok.code, 0, ok.stderr);
  assert.ok(ok.stats!.pages > 0);
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

test('a non-root non-dumpable target is refused too', () => withTarget('nondumpable', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, NONDUMPABLE);
  assert.ok(untouched(t.pid));
}, 65534));

test('a dumpable non-root target is not taken for a non-dumpable one', () => withTarget('memfd', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
}, 65534));

// Debian's openssh-client: ssh-agent makes itself non-dumpable to protect its keys.
test('real ssh-agent is refused as non-dumpable', async () => {
  const sock = path.join(tmpDir('agent'), 'sock');
  const out = execFileSync('ssh-agent', ['-a', sock], { encoding: 'utf8' });
  const pid = Number(/SSH_AGENT_PID=(\d+)/.exec(out)![1]);
  try {
    const r = await captureCli(pid);
    assert.is(r.code, 1, r.stderr);
    assert.match(r.stderr, NONDUMPABLE);
    assert.ok(untouched(pid));
    const list = spawnSync('ssh-add', ['-l'], { env: { ...process.env, SSH_AUTH_SOCK: sock }, encoding: 'utf8' });
    assert.match(list.stdout, /no identities/, 'the agent still answers');
  } finally {
    process.kill(pid, 'SIGKILL');
    fs.rmSync(path.dirname(sock), { recursive: true, force: true });
  }
});

test('a zombie main thread with live threads: clear error, untouched', () => withTarget('zombie', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`process ${t.pid}'s main thread has exited \\(zombie\\) while 2 other threads run.*\\[ESRCH\\]`));
  assert.is(await t.close(), 'exit status=0 signal=0', 'its threads ran on and exited cleanly');
}));

test('a parent stopped in vfork: clear error, untouched', () => withTarget('vfork', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`thread ${t.pid} of process ${t.pid} is a parent waiting in vfork\\(\\).*\\[EBUSY\\]`));
  assert.ok(untouched(t.pid));
  assert.is(await t.close(), 'exit status=0 signal=0', 'the parent went on after its child left');
}));

test('a 16 TiB PROT_NONE shadow is skipped and the rest captured', () => withTarget('shadow', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.ok(r.stats!.capturedBytes < 2 ** 40, `captured ${r.stats!.capturedBytes}`);
}));

test('a 16 TiB writable NORESERVE mapping is refused by name, untouched', () => withTarget('shadow-rw', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 1, r.stderr);
  assert.match(r.stderr, /mapping [0-9a-f]+-[0-9a-f]+ rw-p is 16384 GiB: writable mappings over 8 TiB .* cannot be captured \[EFBIG\]/);
  assert.ok(untouched(t.pid));
  assert.is(await t.close(), 'exit status=0 signal=0');
}));

const HUGE = (kb: number) => `/sys/kernel/mm/hugepages/hugepages-${kb}kB/nr_hugepages`;

// Reserves n more hugetlb pages of that size for fn only, and gives them back.
async function withHugePages(kb: number, n: number, fn: () => Promise<void>): Promise<void> {
  const before = fs.readFileSync(HUGE(kb), 'utf8').trim();
  try {
    fs.writeFileSync(HUGE(kb), String(Number(before) + n));
    if (Number(fs.readFileSync(HUGE(kb), 'utf8')) < Number(before) + n) {
      console.log(`  (${n} hugetlb page(s) of ${kb} kB could not be reserved on this machine: test not run)`);
      return;
    }
    await fn();
  } finally {
    fs.writeFileSync(HUGE(kb), before);
  }
}

test('2 MiB hugetlb pages are captured', () => withHugePages(2048, 4, () => withTarget('hugetlb2m', async (t) => {
  const r = await captureCli(t.pid);
  assert.is(r.code, 0, r.stderr);
  assert.ok(r.stats!.pages >= 2048, `pages ${r.stats!.pages}`);
  assert.is(await t.close(), 'exit status=0 signal=0');
})));

test('1 GiB hugetlb pages are refused by name, untouched', async () => {
  await withHugePages(1048576, 1, async () => {
    await withTarget('hugetlb1g', async (t) => {
      const r = await captureCli(t.pid);
      assert.is(r.code, 1, r.stderr);
      assert.match(r.stderr, /mapping [0-9a-f-]+ rw-p \/anon_hugepage.* is backed by 1024 MiB hugetlb pages.*\[EOPNOTSUPP\]/);
      assert.ok(untouched(t.pid));
      assert.is(await t.close(), 'exit status=0 signal=0');
    });
  });
});

test.run();
