// Runs a test target that forks (test/targets/seccomp.c, oddity.c): the child is
// the target, so it is not this process's child and our waitpid never sees its
// ptrace stops; the parent stays, reports the target's end ("exit status=S
// signal=N"), and relays our stdin to it. Optionally as another user (setpriv).
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildTarget, lineReader } from '../process-target';
import { BIN, run, type RunResult } from './cli';
import { tmpDir } from './net';

export interface ForkedTarget {
  pid: number;
  ready: string; // the target's "ready ..." line
  ask(cmd: string): Promise<string>; // one command line, one reply line
  send(cmd: string): void; // a command with no reply (it may end the target)
  close(): Promise<string>; // end stdin: the target exits; its parent's "exit ..." line
  kill(): void;
}

export async function startForked(name: string, args: string[], asUid?: number): Promise<ForkedTarget> {
  const argv = [buildTarget(name), ...args];
  const child: ChildProcess = asUid === undefined
    ? spawn(argv[0], argv.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] })
    : spawn('setpriv', [`--reuid=${asUid}`, `--regid=${asUid}`, '--clear-groups', ...argv], { stdio: ['pipe', 'pipe', 'inherit'] });
  const next = lineReader(child.stdout!, name);
  const ready = await next(60_000);
  const m = /^ready pid=(\d+)/.exec(ready);
  if (!m) throw new Error(`${name} ${args.join(' ')} said: ${ready}`);
  const pid = Number(m[1]);
  return {
    pid, ready,
    send: (cmd) => { child.stdin!.write(`${cmd}\n`); },
    ask: (cmd) => { child.stdin!.write(`${cmd}\n`); return next(); },
    close: () => { child.stdin!.end(); return next(); },
    kill: () => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } child.kill('SIGKILL'); },
  };
}

export function statusOf(pid: number): string {
  return fs.readFileSync(`/proc/${pid}/status`, 'utf8');
}

export function statusField(pid: number, key: string): string {
  return new RegExp(`^${key}:\\s*(.*)$`, 'm').exec(statusOf(pid))?.[1] ?? '';
}

// The target was never left traced or stopped.
export function untouched(pid: number): boolean {
  return statusField(pid, 'TracerPid') === '0' && !/^[tT]/.test(statusField(pid, 'State'));
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export interface CaptureRun extends RunResult { stats?: Record<string, any> }

// bgsnap-capture --pid PID to /dev/null with --stats, optionally with env and extra args.
export async function captureCli(pid: number, extra: string[] = [], env = ''): Promise<CaptureRun> {
  const statsFile = path.join(tmpDir('pre'), 'stats.json');
  const r: CaptureRun = await run(`${env} ${BIN.capture}`, ['--pid', String(pid), '-o', '/dev/null', '--stats', statsFile, ...extra], 120_000);
  if (fs.existsSync(statsFile)) r.stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'));
  fs.rmSync(path.dirname(statsFile), { recursive: true, force: true });
  return r;
}
