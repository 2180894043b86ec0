// Runs the real CLIs as a user would: compiled bins under dist/bin, through a
// shell when a pipe is part of the test. Every run is bounded by a timeout.
import { spawn } from 'node:child_process';
import * as path from 'node:path';

const binDir = path.resolve(__dirname, '..', '..', 'bin');
const bin = (name: string) => `'${process.execPath}' '${path.join(binDir, `bgsnap-${name}.js`)}'`;

export const BIN = { capture: bin('capture'), receive: bin('receive'), convert: bin('convert'), inspect: bin('inspect') };

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export function sh(command: string, timeoutMs = 60_000, input?: Buffer): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', command], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`timed out after ${timeoutMs} ms: ${command}\n${stderr}`));
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

// Runs one bin with arguments (no shell quoting concerns for the arguments).
export function run(binCmd: string, args: string[], timeoutMs = 60_000, input?: Buffer): Promise<RunResult> {
  const quoted = args.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ');
  return sh(`${binCmd} ${quoted}`, timeoutMs, input);
}
