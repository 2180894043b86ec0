// The CLIs as a user meets them: exit codes and messages for bad input, refusal
// to overwrite, incomplete images refused by convert, --stats output.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { BIN, run, sh } from './helpers/cli';
import { startTarget } from './process-target';
import { generate } from './helpers/streams';
import { tmpDir } from './helpers/net';

const RECEIVE_JS = path.resolve(__dirname, '..', 'bin', 'bgsnap-receive.js');
const dir = tmpDir('cli');
const img = (name: string) => path.join(dir, name);

test('receive: a complete stream exits 0 and writes --stats', async () => {
  const g = generate(41);
  const r = await run(BIN.receive, ['-o', img('ok'), '--stats', img('ok.json')], 30_000, g.stream);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /complete: \d+ pages/);
  const s = JSON.parse(fs.readFileSync(img('ok.json'), 'utf8'));
  assert.is(s.status, 'complete');
  assert.is(s.streamBytes, g.stream.length);
});

test('receive: an existing image is refused without --force, replaced with it', async () => {
  const g = generate(41);
  const r = await run(BIN.receive, ['-o', img('ok')], 30_000, g.stream);
  assert.is(r.code, 1);
  assert.match(r.stderr, /bgsnap-receive: image .* already exists \(use --force to replace it\)/);
  const f = await run(BIN.receive, ['-o', img('ok'), '--force'], 30_000, g.stream);
  assert.is(f.code, 0, f.stderr);
});

test('receive: truncated, garbage and empty input exit 2 with the reason, image marked incomplete', async () => {
  const g = generate(42);
  const cases: [string, Buffer, RegExp][] = [
    ['cut', g.stream.subarray(0, g.stream.length - 10), /INCOMPLETE: bgsnap stream: input ended before/],
    ['garbage', Buffer.from('hello, this is not a snapshot stream'), /INCOMPLETE: input stream: neither a bgsnap nor a QEMU migration stream/],
    ['empty', Buffer.alloc(0), /INCOMPLETE: input stream: input is empty/],
  ];
  for (const [name, input, re] of cases) {
    const r = await run(BIN.receive, ['-o', img(name)], 30_000, input);
    assert.is(r.code, 2, `${name}: ${r.stderr}`);
    assert.match(r.stderr, re);
    const i = await run(BIN.inspect, [img(name), '--json']);
    if (i.code === 0) assert.is(JSON.parse(i.stdout).status, 'incomplete');
  }
});

test('receive: SIGTERM mid-stream closes the image as incomplete with what arrived', async () => {
  const g = generate(43);
  const cut = g.frames.slice(0, 4).reduce((n, f) => n + f.length, 0); // magic, header, blocks, first pages
  const rx = spawn(process.execPath, [RECEIVE_JS, '-o', img('term')], { stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  rx.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  rx.stdin.write(g.stream.subarray(0, cut)); // and the stream stays open
  await new Promise((r) => setTimeout(r, 1500));
  rx.kill('SIGTERM');
  const [code] = (await once(rx, 'exit')) as [number];
  assert.is(code, 2, stderr);
  assert.match(stderr, /INCOMPLETE: stopped by SIGTERM/);
  const i = await run(BIN.inspect, [img('term'), '--json']);
  assert.is(i.code, 0, i.stderr);
  const d = JSON.parse(i.stdout);
  assert.is(d.status, 'incomplete');
  assert.is(d.reason, 'stopped by SIGTERM');
  assert.ok(d.blocks.some((b: { present: number }) => b.present > 0), 'the pages that arrived are described');
});

test('convert refuses an incomplete image unless --allow-incomplete', async () => {
  const r = await run(BIN.convert, [img('cut'), '--to', 'raw', '-o', img('cut.raw')]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /is incomplete \(.*\); pass --allow-incomplete/);
  const a = await run(BIN.convert, [img('cut'), '--to', 'raw', '-o', img('cut.raw'), '--allow-incomplete']);
  assert.is(a.code, 0, a.stderr);
  assert.ok(fs.existsSync(img('cut.raw')));
});

test('convert: a process-less image cannot become a QEMU stream; a missing image is named', async () => {
  const r = await run(BIN.convert, [img('ok'), '--to', 'qemu', '-o', img('x.qemu')]);
  assert.is(r.code, 1);
  assert.match(r.stderr, /has no qemu\.preamble state/);
  const m = await run(BIN.convert, [img('nope'), '--to', 'raw', '-o', img('x.raw')]);
  assert.is(m.code, 1);
  assert.match(m.stderr, /nope is not a bgsnap image/);
});

test('capture: no source, both sources, a missing QMP socket and a bad PID give clear errors', async () => {
  const none = await run(BIN.capture, ['-o', img('c1')]);
  assert.is(none.code, 1);
  assert.match(none.stderr, /say what to capture: --qmp SOCKET, --domain NAME or --pid PID/);
  const both = await run(BIN.capture, ['--qmp', '/nonexistent', '--pid', '1', '-o', img('c2')]);
  assert.match(both.stderr, /give one of --qmp, --domain and --pid, not --qmp and --pid/);
  const sock = await run(BIN.capture, ['--qmp', path.join(dir, 'no.sock'), '-o', img('c3')]);
  assert.is(sock.code, 1);
  assert.match(sock.stderr, /no\.sock/);
  const pid = await run(BIN.capture, ['--pid', 'abc', '-o', img('c4')]);
  assert.ok(pid.code !== 0);
  assert.match(pid.stderr, /--pid must be a non-negative number, got "abc"/);
  // Refused before any socket is tried: the path named does not exist.
  const disks = await run(BIN.capture, ['--qmp', path.join(dir, 'no.sock'), '--disk', 'd0', '--no-disks', '-o', img('c5')]);
  assert.is(disks.code, 1);
  assert.match(disks.stderr, /--disk ID and --no-disks contradict each other/);
  // zstd's fast levels go down to -7; 0 and anything past either end are refused
  // before the output is created.
  for (const bad of ['0', '-8', '20', 'fast']) {
    const lv = await run(BIN.capture, ['--pid', '2147483647', `--compress=${bad}`, '-o', img(`c6${bad}`)]);
    assert.is(lv.code, 1, lv.stderr);
    assert.match(lv.stderr, new RegExp(`--compress level must be -7\\.\\.-1 or 1\\.\\.19, got "${bad}"`));
    assert.not.ok(fs.existsSync(img(`c6${bad}`)), 'no output for a refused level');
  }
});

test('capture: progress on stderr when it is a terminal, none when it is not', async () => {
  const t = await startTarget('anon', 64, 1);
  try {
    // script(1) gives the capture a pseudo-terminal, as an interactive user has.
    const tty = await sh(`script -qec "${BIN.capture.replace(/'/g, '')} --pid ${t.pid} --rate-limit 100 -o ${img('tty.bgsnap')}" /dev/null`, 60_000);
    assert.is(tty.code, 0, tty.stdout + tty.stderr);
    assert.match(tty.stdout, /bgsnap-capture: \d+ of \d+ pages \(\d+%\), \d+ MiB out/);
    const plain = await run(BIN.capture, ['--pid', String(t.pid), '-o', img('plain.bgsnap')], 60_000);
    assert.is(plain.code, 0, plain.stderr);
    assert.is(plain.stderr, '', 'nothing on a non-terminal stderr');
  } finally {
    t.kill();
  }
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
