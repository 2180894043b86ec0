// Everything that can break between a real `bgsnap-capture --pid --to` and the
// receiver: the receiver killed (SIGKILL) or stopped (SIGTERM) mid-stream, the
// capture killed mid-stream, the TCP connection cut by a proxy, the receiver's
// disk full (a small tmpfs). Each must end with a clear error, a non-zero exit,
// an image marked incomplete, and a target that keeps running intact.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ImageReader } from '../receiver/image-reader';
import { BIN } from './helpers/cli';
import { startProxy, startReceiver, tmpDir, writeToken, waitFor } from './helpers/net';
import { isAlive, startTarget, type Target } from './process-target';

const work = tmpDir('net-fail');
const token = writeToken(work);
const auth = ['--insecure', '--token-file', token];

interface Cli {
  pid: number;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(sig: NodeJS.Signals): void;
}

function capture(t: Target, url: string, name: string, extra: string[] = []): Cli {
  const args = ['--pid', String(t.pid), '--to', url, ...auth, '--name', name, '--buffer-mb', '16', ...extra];
  const proc = spawn('/bin/sh', ['-c', `exec ${BIN.capture} ${args.map((a) => `'${a}'`).join(' ')}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const timer = setTimeout(() => proc.kill('SIGKILL'), 90_000);
  void exited.then(() => clearTimeout(timer));
  return { pid: proc.pid!, stderr: () => err, exited, kill: (sig) => proc.kill(sig) };
}

// "Mid-stream": the image exists on the receiver and has taken some data.
async function midStream(root: string, name: string): Promise<void> {
  await waitFor(() => fs.existsSync(path.join(root, name, 'data')) && fs.statSync(path.join(root, name, 'data')).blocks > 2048, 30_000, 'data on the receiver');
}

async function assertIncomplete(image: string, reason: RegExp): Promise<void> {
  const img = await ImageReader.open(image);
  try {
    assert.is(img.status.status, 'incomplete');
    assert.match(img.status.reason, reason);
  } finally {
    await img.close();
  }
}

async function assertTargetFine(t: Target): Promise<void> {
  await new Promise((r) => setTimeout(r, 200));
  assert.ok(isAlive(t.pid), 'target alive');
  assert.match(await t.command('check'), /^check ok/);
}

// A paced scan (about 10 s for 192 MiB) leaves time to break things mid-stream.
const PACED = ['--rate-limit', '20'];

test('receiver killed (SIGKILL) mid-stream: capture fails, image incomplete, target runs', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, auth);
  const t = await startTarget('anon', 192, 3);
  try {
    const c = capture(t, rx.url, 'killed-rx', PACED);
    await midStream(root, 'killed-rx');
    await rx.kill('SIGKILL');
    const r = await c.exited;
    assert.is.not(r.code, 0);
    assert.match(c.stderr(), /lost before the receiver acknowledged|ECONNRESET|EPIPE/);
    await assertIncomplete(path.join(root, 'killed-rx'), /receiving/);
    await assertTargetFine(t);
  } finally {
    t.kill();
  }
});

test('receiver stopped (SIGTERM) mid-stream: image marked incomplete, capture told why, receiver exits 0', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, auth);
  const t = await startTarget('anon', 192, 3);
  try {
    const c = capture(t, rx.url, 'stopped-rx', PACED);
    await midStream(root, 'stopped-rx');
    const rxExit = await rx.kill('SIGTERM');
    assert.is(rxExit.code, 0, rx.stderr());
    const r = await c.exited;
    assert.is.not(r.code, 0);
    assert.match(c.stderr(), /image incomplete: the receiver is shutting down/);
    await assertIncomplete(path.join(root, 'stopped-rx'), /the receiver is shutting down/);
    await assertTargetFine(t);
  } finally {
    t.kill();
  }
});

test('capture killed (SIGKILL) mid-stream: image incomplete, receiver serves on, target runs', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, auth);
  const t = await startTarget('anon', 192, 3);
  try {
    const c = capture(t, rx.url, 'killed-cap', PACED);
    await midStream(root, 'killed-cap');
    c.kill('SIGKILL');
    assert.is((await c.exited).signal, 'SIGKILL');
    await waitFor(() => /killed-cap incomplete/.test(rx.stderr()), 20_000, 'the receiver to close the image');
    await assertIncomplete(path.join(root, 'killed-cap'), /connection was lost before the END frame|input ended before/);
    await assertTargetFine(t);
    const again = capture(t, rx.url, 'after-kill');
    assert.is((await again.exited).code, 0, again.stderr());
  } finally {
    t.kill();
    await rx.kill();
  }
});

test('connection cut by a proxy mid-stream: capture fails, image incomplete, target runs', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, auth);
  const proxy = await startProxy(rx.port);
  const t = await startTarget('anon', 192, 3);
  try {
    const c = capture(t, proxy.url, 'cut', PACED);
    await midStream(root, 'cut');
    proxy.cut();
    const r = await c.exited;
    assert.is.not(r.code, 0);
    assert.match(c.stderr(), /lost before the receiver acknowledged|ECONNRESET|EPIPE/);
    await waitFor(() => /cut incomplete/.test(rx.stderr()), 20_000, 'the receiver to close the image');
    await assertIncomplete(path.join(root, 'cut'), /connection was lost before the END frame|input ended before/);
    await assertTargetFine(t);
  } finally {
    proxy.close();
    t.kill();
    await rx.kill();
  }
});

test('receiver disk full (8 MiB tmpfs): capture fails with the reason, image incomplete, target runs', async () => {
  const root = tmpDir('tmpfs');
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', root]);
  const rx = await startReceiver(root, auth);
  const t = await startTarget('anon', 64, 3);
  try {
    const c = capture(t, rx.url, 'full');
    const r = await c.exited;
    assert.is.not(r.code, 0);
    assert.match(c.stderr(), /image incomplete: .*(ENOSPC|no space)/i, c.stderr() + rx.stderr());
    // LevelDB cannot even open its index on a full disk (recovery writes), so
    // make room as an operator would, then read it. The reason may not have
    // fit; the status written at creation says incomplete either way.
    await rx.kill();
    execFileSync('mount', ['-o', 'remount,size=64m', root]);
    await assertIncomplete(path.join(root, 'full'), /ENOSPC|no space|receiving/i);
    await assertTargetFine(t);
  } finally {
    t.kill();
    await rx.kill();
    execFileSync('umount', [root]);
  }
});

test.after(() => fs.rmSync(work, { recursive: true, force: true }));
test.run();
