// Bad input gives a clear error and leaves the target untouched: a PID that does
// not exist, not a PID, ourselves, a kernel thread, an already-traced process.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { once } from 'node:events';
import { captureProcess } from '../capture/process-source';
import { allThreadsProgress, buildTarget, startTarget, writeProtectedPages } from './process-target';

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
