// Bad input gives a clear error and leaves the target untouched: a PID that does
// not exist, not a PID, ourselves, a kernel thread, an already-traced process.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { once } from 'node:events';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, buildTarget, startTarget, writeProtectedPages } from './process-target';
import { BIN, run } from './helpers/cli';

async function failure(pid: number): Promise<Error & { code?: string }> {
  const cap = captureProcess(pid);
  try {
    for await (const _ of cap.events) { /* drain */ }
  } catch (e) {
    return e as Error & { code?: string };
  }
  throw new Error(`capture of ${pid} unexpectedly succeeded`);
}

function unusedPid(): number {
  const max = Number(fs.readFileSync('/proc/sys/kernel/pid_max', 'utf8'));
  for (let p = max - 1; p > 1; p--) if (!fs.existsSync(`/proc/${p}`)) return p;
  throw new Error('no free pid');
}

test('a PID that does not exist', async () => {
  const e = await failure(unusedPid());
  assert.is(e.code, 'ESRCH');
  assert.match(e.message, /does not exist/);
});

test('not a process id, and ourselves', async () => {
  assert.is((await failure(0)).code, 'EINVAL');
  assert.is((await failure(-5)).code, 'EINVAL');
  const self = await failure(process.pid);
  assert.is(self.code, 'EINVAL');
  assert.match(self.message, /cannot capture/);
});

// A real kernel answer, not a simulation: under a seccomp filter the userfaultfd
// syscall returns ENOSYS, as on a kernel built without it.
test('no userfaultfd for the capture (as on a kernel without it): clear error, target untouched', async () => {
  const t = await startTarget('anon', 32, 2);
  try {
    const r = await run(`'${buildTarget('no-uffd')}' ${BIN.capture}`, ['--pid', String(t.pid), '-o', '/dev/null']);
    assert.is(r.code, 1, r.stderr);
    assert.match(r.stderr, /this kernel offers no userfaultfd to us/);
    assert.match(r.stderr, /\[ENOSYS\]/);
    assert.is(tracerOf(t.pid), 0, 'never attached');
    assert.match(await t.command('check'), /^check ok/);
    assert.ok((await allThreadsProgress(t)).ok, 'threads progress');
  } finally {
    t.kill();
  }
});

// The same filter on the target: a tracer that can suspend it (root) captures
// (test/process-seccomp.test.ts); one that cannot refuses before touching it.
test('a target whose seccomp filter blocks userfaultfd, and no way to suspend it: refused untouched', async () => {
  const t = await startTarget('anon', 32, 2, undefined, [buildTarget('no-uffd')]);
  try {
    const cap = captureProcess(t.pid, { testNoSuspendSeccomp: true });
    const e = await (async () => { try { for await (const _ of cap.events) { /* drain */ } } catch (x) { return x as Error & { code?: string }; } })();
    assert.is(e?.code, 'EPERM');
    assert.match(e!.message, /runs under seccomp \(Seccomp: 2\)/);
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0);
    assert.is(tracerOf(t.pid), 0, 'never attached');
    assert.match(await t.command('check'), /^check ok/);
    assert.ok((await allThreadsProgress(t)).ok, 'threads progress');
  } finally {
    t.kill();
  }
});

// Writable private file mappings cannot be write-protected and are copied while
// the target is frozen; past 64 MiB that would stretch the pause, so it is refused.
test('over 64 MiB that cannot be write-protected: refused while frozen, target released', async () => {
  const script = [
    'import mmap, sys, tempfile, time',
    'f = tempfile.TemporaryFile(); f.truncate(80 << 20)',
    'm = mmap.mmap(f.fileno(), 80 << 20, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)',
    'for i in range(0, 80 << 20, 4096): m[i] = 1',
    'print("ready", flush=True)',
    'while True: m[0] = (m[0] + 1) % 256; time.sleep(0.005)',
  ].join('\n');
  const py = spawn('python3', ['-c', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    await once(py.stdout!, 'data');
    const r = await run(BIN.capture, ['--pid', String(py.pid), '-o', '/dev/null']);
    assert.is(r.code, 1, r.stderr);
    assert.match(r.stderr, /the target has 8\d MiB of writable memory that cannot be write-protected .* refused: File too large \[EFBIG\]/);
    assert.is(tracerOf(py.pid!), 0, 'detached');
    assert.ok(/State:\s*[RS]/.test(fs.readFileSync(`/proc/${py.pid}/status`, 'utf8')), 'running or sleeping, not stopped');
  } finally {
    py.kill('SIGKILL');
  }
});

function tracerOf(pid: number): number {
  return Number(/TracerPid:\s*(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

test('a kernel thread cannot be captured', async () => {
  const e = await failure(2); // kthreadd
  assert.is(e.code, 'EPERM');
  assert.match(e.message, /PTRACE_SEIZE/);
});

test('an already-traced process is refused and left running untouched', async () => {
  const t = await startTarget('anon', 32, 2);
  let tracer: ChildProcess | undefined;
  try {
    tracer = spawn(buildTarget('tracer'), [String(t.pid)], { stdio: ['ignore', 'pipe', 'inherit'] });
    await once(tracer.stdout!, 'data');
    const e = await failure(t.pid);
    assert.is(e.code, 'EPERM');
    assert.match(e.message, /already-traced/);
    assert.match(e.message, new RegExp(`TracerPid:\\s*${tracer.pid}`));
    assert.is(writeProtectedPages(t.pid, t.base, t.size), 0);
    assert.match(await t.command('check'), /^check ok/);
    assert.ok((await allThreadsProgress(t)).ok, 'threads progress');
  } finally {
    tracer?.kill('SIGKILL');
    t.kill();
  }
});

test.run();
