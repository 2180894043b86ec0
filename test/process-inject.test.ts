// Injection cannot harm the target. The ptrace tracer is the bgsnap-freezer
// helper process; these tests cause each hazard for real: SIGKILL of the
// capture with injected registers in place or with vm.unprivileged_userfaultfd
// open, an injected syscall that never returns, a stream of queued signals with
// payloads during captures, and a thread frozen inside an rseq critical section.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { captureProcess, type ProcessCaptureOptions } from '../capture/process-source';
import {
  allThreadsProgress, buildTarget, checkInvariant, collect, isAlive, killCaptureAt, lineReader, startTarget, writeProtectedPages, type Target,
} from './process-target';

const SYSCTL = '/proc/sys/vm/unprivileged_userfaultfd';
const NOBODY = 65534;

interface LineTarget { pid: number; command(cmd: string): Promise<string>; kill(): void }

// A test target that forks into the background, says "ready pid=N", and
// answers one line per command written to its fd 3.
async function lineTarget(name: string, args: string[] = []): Promise<LineTarget> {
  const child: ChildProcess = spawn(buildTarget(name), args, { stdio: ['ignore', 'pipe', 'inherit', 'pipe'] });
  const next = lineReader(child.stdout!, name);
  const m = /ready pid=(\d+)/.exec(await next());
  if (!m) throw new Error(`${name} did not start`);
  const pid = Number(m[1]);
  const ctl = child.stdio[3] as NodeJS.WritableStream & { destroy(): void };
  return {
    pid,
    command: (cmd) => { ctl.write(`${cmd}\n`); return next(); },
    kill: () => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } ctl.destroy(); (child.stdout as NodeJS.ReadableStream & { destroy(): void }).destroy(); },
  };
}

async function captureOnce(pid: number, opts: ProcessCaptureOptions = {}) {
  const cap = captureProcess(pid, opts);
  for await (const _ of cap.events) { /* drain */ }
  return cap.stats();
}

async function captureError(pid: number, opts: ProcessCaptureOptions): Promise<Error & { code?: string }> {
  try {
    await captureOnce(pid, opts);
  } catch (e) {
    return e as Error & { code?: string };
  }
  throw new Error('capture unexpectedly succeeded');
}

// Freezer helpers still running for `pid` (each one exits once it has detached).
function freezersOf(pid: number): number[] {
  const out: number[] = [];
  for (const p of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const argv = fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
      if (argv[0].endsWith('/bgsnap-freezer') && argv[1] === String(pid)) out.push(Number(p));
    } catch { /* gone */ }
  }
  return out;
}

function pendingSignals(pid: number): string {
  const st = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  return [...st.matchAll(/^(SigPnd|ShdPnd):\s*(\w+)/gm)].map((m) => `${m[1]}=${m[2]}`).join(' ');
}

async function assertRecovered(t: Target, label: string) {
  await new Promise((r) => setTimeout(r, 200));
  assert.ok(isAlive(t.pid), `${label}: target alive`);
  assert.equal(freezersOf(t.pid), [], `${label}: the freezer helper exited`);
  assert.is(tracerOf(t.pid), 0, `${label}: no tracer left`);
  assert.is(writeProtectedPages(t.pid, t.base, t.size), 0, `${label}: no page write-protected`);
  assert.is(pendingSignals(t.pid), 'SigPnd=0000000000000000 ShdPnd=0000000000000000', `${label}: no signal left pending`);
  const p = await allThreadsProgress(t);
  assert.ok(p.ok, `${label}: every thread progresses ${p.before} -> ${p.after}`);
  assert.match(await t.command('check'), /^check ok/, `${label}: live memory`);
  const cap = captureProcess(t.pid);
  const c = await collect(cap.events, t.base, t.size);
  const r = checkInvariant(c.region!);
  assert.ok(r.ok, `${label}: a later snapshot ${r.detail}`);
}

function tracerOf(pid: number): number {
  return Number(/TracerPid:\s*(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}


// Run `body` with vm.unprivileged_userfaultfd at `value` and /dev/userfaultfd
// at `mode`, both put back afterwards.
async function withUffdAccess(value: string, mode: number, body: () => Promise<void>) {
  const sysctl = fs.readFileSync(SYSCTL, 'utf8').trim();
  const devMode = fs.statSync('/dev/userfaultfd').mode & 0o777;
  fs.writeFileSync(SYSCTL, value);
  fs.chmodSync('/dev/userfaultfd', mode);
  try {
    await body();
  } finally {
    fs.chmodSync('/dev/userfaultfd', devMode);
    fs.writeFileSync(SYSCTL, sysctl);
  }
}

test('SIGKILL of the capture with vm.unprivileged_userfaultfd open: it is put back, the target runs on', async () => {
  await withUffdAccess('0', 0o600, async () => {
    const t = await startTarget('anon', 128, 3, NOBODY);
    try {
      const out = await killCaptureAt(t.pid, 'sysctl', /bgsnap-hold sysctl/);
      assert.match(out, /bgsnap-hold sysctl/);
      await new Promise((r) => setTimeout(r, 200));
      assert.is(fs.readFileSync(SYSCTL, 'utf8').trim(), '0', 'sysctl back at 0');
      await assertRecovered(t, 'sysctl hold');
    } finally {
      t.kill();
    }
  });
});

test('a non-root target gets its userfaultfd through /dev/userfaultfd; the sysctl is never touched', async () => {
  await withUffdAccess('0', 0o666, async () => {
    const t = await startTarget('anon', 128, 3, NOBODY);
    try {
      const cap = captureProcess(t.pid);
      const c = await collect(cap.events, t.base, t.size);
      assert.ok(checkInvariant(c.region!).ok, 'snapshot consistent');
      assert.is(cap.stats().uffdVia, 'dev');
      assert.is(cap.stats().sysctlToggled, false);
      assert.is(fs.readFileSync(SYSCTL, 'utf8').trim(), '0');
      assert.match(await t.command('check'), /^check ok/);
    } finally {
      t.kill();
    }
  });
  // And with /dev/userfaultfd closed to it, the sysctl is the last resort.
  await withUffdAccess('0', 0o600, async () => {
    const t = await startTarget('anon', 16, 2, NOBODY);
    try {
      const s = await captureOnce(t.pid);
      assert.is(s.uffdVia, 'sysctl');
      assert.is(fs.readFileSync(SYSCTL, 'utf8').trim(), '0');
    } finally {
      t.kill();
    }
  });
});

test('an injected syscall that never returns is interrupted and undone: the capture fails, the target runs on', async () => {
  for (const mib of [16, 128]) { // one stop, and the arm stop of two
    const t = await startTarget('anon', mib, 3);
    try {
      const e = await captureError(t.pid, { testStuckInjection: true, injectTimeoutMs: 300 });
      assert.is(e.code, 'ETIMEDOUT', e.message);
      assert.match(e.message, /interrupted and restored/);
      await assertRecovered(t, `stuck injection, ${mib} MiB`);
    } finally {
      t.kill();
    }
  }
});

// The helper's own death outside an injected call: the kernel resumes its
// tracees, all parked in interrupt stops with their own registers.
test('SIGKILL of the freezer helper while the target is stopped: the capture fails, the target runs on', async () => {
  const t = await startTarget('anon', 128, 3);
  try {
    const failed = captureError(t.pid, { testHoldAt: 'inject', testHoldMs: 1500 });
    let helper = 0;
    for (let i = 0; i < 500 && !helper; i++) {
      await new Promise((r) => setTimeout(r, 10));
      const f = freezersOf(t.pid);
      if (f.length && tracerOf(t.pid) === f[0]) helper = f[0];
    }
    assert.ok(helper > 0, 'the helper traced the target');
    await new Promise((r) => setTimeout(r, 300));
    process.kill(helper, 'SIGKILL');
    const e = await failed;
    assert.is(e.code, 'EPIPE', e.message);
    assert.match(e.message, /freezer helper died/);
    await assertRecovered(t, 'helper killed');
  } finally {
    t.kill();
  }
});

test('SIGKILL of the freezer helper with vm.unprivileged_userfaultfd open: the capture puts it back', async () => {
  await withUffdAccess('0', 0o600, async () => {
    const t = await startTarget('anon', 16, 2, NOBODY);
    try {
      const failed = captureError(t.pid, { testHoldAt: 'sysctl', testHoldMs: 5000 });
      for (let i = 0; i < 500 && fs.readFileSync(SYSCTL, 'utf8').trim() !== '1'; i++) await new Promise((r) => setTimeout(r, 10));
      const helpers = freezersOf(t.pid);
      assert.is(helpers.length, 1, 'the helper holds the sysctl open');
      process.kill(helpers[0], 'SIGKILL');
      const e = await failed;
      assert.is(e.code, 'EPIPE', e.message);
      assert.is(fs.readFileSync(SYSCTL, 'utf8').trim(), '0', 'sysctl back at 0');
      await assertRecovered(t, 'helper killed with the sysctl open');
    } finally {
      t.kill();
    }
  });
});

test('signals: a stream of queued signals with payloads during captures, none lost, none invented', async () => {
  const t = await lineTarget('sigstream', ['700']);
  try {
    // At least 20 captures, and more until over 1000 signals were sent during
    // them: the sender's pace is the machine's, not a constant.
    let done = 0, refused = 0, sent = 0;
    for (let i = 0; i < 200 && (i < 20 || sent <= 1000); i++) {
      try {
        await captureOnce(t.pid);
        done++;
      } catch (e) {
        assert.is((e as { code?: string }).code, 'EAGAIN', String(e)); // a refusal is clean, nothing else
        refused++;
      }
      sent = Number(/sent=(\d+)/.exec(await t.command('sent'))![1]);
    }
    const r = await t.command('check');
    console.log(`  sigstream: ${done} captures (${refused} refused): ${r}`);
    const m = /sent=(\d+) got=(\d+) missing=(\d+) dup=(\d+) bad=(\d+)/.exec(r)!;
    assert.ok(Number(m[1]) > 1000, r);
    assert.is(m[3], '0', `missing: ${r}`);
    assert.is(m[4], '0', `duplicated: ${r}`);
    assert.is(m[5], '0', `invented: ${r}`);
    assert.ok(done >= 0.75 * (done + refused), `${done} of ${done + refused} captures done`);
  } finally {
    t.kill();
  }
});

test('rseq: a thread frozen inside a critical section resumes at its abort handler', async () => {
  const t = await lineTarget('rseq');
  try {
    const before = (await t.command('counts')).split(' ').map(Number);
    for (let i = 0; i < 20; i++) await captureOnce(t.pid);
    const after = (await t.command('counts')).split(' ').map(Number);
    console.log(`  rseq: commits ${after[1] - before[1]}, aborts ${after[2] - before[2]}, violations ${after[3]}`);
    assert.is(after[3], 0, 'no critical section resumed after the kernel cleared rseq_cs');
    assert.ok(after[2] > before[2], 'aborts happen');
    assert.ok(after[1] > before[1], 'it commits');
  } finally {
    t.kill();
  }
});

test.run();
