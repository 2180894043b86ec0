// Files that keep secrets: everything the CLIs create that holds memory is
// private to its owner (0600 files, 0700 directories) under the usual umask 022,
// is never written through a symbolic link (not even with --force) and never
// clobbers an existing file without --force. Real CLIs on a real process (the
// invariant target) and on a generated QEMU stream; the network receiver too.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { genStream } from './helpers/qemu-gen';
import { relay, startReceiver, tmpDir, writeToken } from './helpers/net';
import { startTarget, type Target } from './process-target';

let target: Target;
let dir: string;
const qemuStream = genStream(7).bytes;
const f = (name: string) => path.join(dir, name);
const mode = (p: string) => (fs.lstatSync(p).mode & 0o7777).toString(8);

test.before(async () => {
  process.umask(0o022); // every command below inherits it
  try {
    await setup();
  } catch (e) {
    console.error(e); // uvu would report the suite as not run, without the reason
    throw e;
  }
});

async function setup(): Promise<void> {
  dir = tmpDir('private');
  target = await startTarget('anon', 8, 2);
  const cap = await sh(`${BIN.capture} --pid ${target.pid} -o ${f('stream')}`, 60_000);
  assert.is(cap.code, 0, cap.stderr);
  const rx = await sh(`${BIN.receive} -q -o ${f('img')} < ${f('stream')}`, 60_000);
  assert.is(rx.code, 0, rx.stderr);
  const q = await run(BIN.receive, ['-q', '-o', f('qimg')], 60_000, qemuStream);
  assert.is(q.code, 0, q.stderr);
}

test.after(() => {
  target?.kill();
  fs.rmSync(dir, { recursive: true, force: true });
});

// Every entry under an image directory: directories 0700, files 0600.
function imageModes(img: string): void {
  assert.is(mode(img), '700', img);
  assert.is(mode(path.join(img, 'data')), '600', 'data file');
  assert.is(mode(path.join(img, 'index')), '700', 'LevelDB index directory');
  for (const e of fs.readdirSync(path.join(img, 'index'))) assert.is(mode(path.join(img, 'index', e)), '600', `index/${e} (LevelDB's own file)`);
}

test('capture -o, receive -o, convert to elf-core, raw (+ map.json) and qemu: 0600 files, 0700 image dirs', async () => {
  assert.is(mode(f('stream')), '600', 'capture -o stream');
  imageModes(f('img'));
  imageModes(f('qimg'));
  for (const [to, out] of [['elf-core', 'core'], ['raw', 'raw']] as const) {
    const r = await run(BIN.convert, [f('img'), '--to', to, '-o', f(out)]);
    assert.is(r.code, 0, r.stderr);
    assert.is(mode(f(out)), '600', out);
  }
  assert.is(mode(f('raw.map.json')), '600', 'raw map.json');
  const q = await run(BIN.convert, [f('qimg'), '--to', 'qemu', '-o', f('vmstate')]);
  assert.is(q.code, 0, q.stderr);
  assert.is(mode(f('vmstate')), '600', 'vmstate');
});

test('network receiver: each image directory 0700, its files 0600', async () => {
  const root = f('root');
  fs.mkdirSync(root);
  const rx = await startReceiver(root, ['--insecure', '--token-file', writeToken(dir)]);
  try {
    const r = await relay(qemuStream, rx.url, ['--insecure', '--token-file', path.join(dir, 'token'), '--name', 'vm1']);
    assert.is(r.code, 0, r.stderr);
    imageModes(path.join(root, 'vm1'));
  } finally {
    await rx.kill();
  }
});

// A victim the link points at: its bytes and mode must not change.
function victim(name: string): { file: string; check: () => void } {
  const file = f(name);
  fs.writeFileSync(file, 'victim\n', { mode: 0o644 });
  fs.chmodSync(file, 0o644);
  return { file, check: () => { assert.is(fs.readFileSync(file, 'utf8'), 'victim\n', `${name} untouched`); assert.is(mode(file), '644'); } };
}

test('a symbolic link at the output path is refused, even with --force; its target is untouched', async () => {
  const v = victim('victim');
  const link = (name: string) => { fs.symlinkSync(v.file, f(name)); return f(name); };
  const cases: [string, string[]][] = [
    ['capture -o', [BIN.capture, '--pid', String(target.pid), '--force', '-o', link('l-stream')]],
    ['convert elf-core', [BIN.convert, f('img'), '--to', 'elf-core', '--force', '-o', link('l-core')]],
    ['convert raw', [BIN.convert, f('img'), '--to', 'raw', '--force', '-o', link('l-raw')]],
    ['convert qemu', [BIN.convert, f('qimg'), '--to', 'qemu', '--force', '-o', link('l-vm')]],
  ];
  for (const [what, [cmd, ...args]] of cases) {
    const r = await run(cmd, args);
    assert.is.not(r.code, 0, `${what} refused`);
    assert.match(r.stderr, /symbolic link/, `${what}: ${r.stderr}`);
    v.check();
  }
  // The raw output's map.json beside it, too.
  link('raw2.map.json');
  const raw = await run(BIN.convert, [f('img'), '--to', 'raw', '-o', f('raw2')]);
  assert.is.not(raw.code, 0, 'raw with a linked map.json refused');
  v.check();
  // An image directory that is a link to a directory: neither replaced nor entered.
  const victimDir = f('victim-dir');
  fs.mkdirSync(victimDir);
  fs.writeFileSync(path.join(victimDir, 'keep'), 'keep');
  fs.symlinkSync(victimDir, f('l-img'));
  const rx = await run(BIN.receive, ['-o', f('l-img'), '--force'], 60_000, qemuStream);
  assert.is.not(rx.code, 0, 'receive -o through a link refused');
  assert.match(rx.stderr, /symbolic link/);
  assert.equal(fs.readdirSync(victimDir), ['keep'], 'linked directory untouched');
});

test('an existing output is not clobbered without --force; --force replaces it with a new 0600 file', async () => {
  for (const [what, args] of [
    ['capture -o', [BIN.capture, '--pid', String(target.pid), '-o', f('old-stream')]],
    ['convert elf-core', [BIN.convert, f('img'), '--to', 'elf-core', '-o', f('old-core')]],
  ] as const) {
    const [cmd, ...rest] = args;
    const out = rest[rest.length - 1];
    fs.writeFileSync(out, 'old\n', { mode: 0o644 });
    const r = await run(cmd, [...rest]);
    assert.is.not(r.code, 0, `${what} refused`);
    assert.match(r.stderr, /already exists \(use --force/, r.stderr);
    assert.is(fs.readFileSync(out, 'utf8'), 'old\n', `${what}: old file kept`);
    const forced = await run(cmd, ['--force', ...rest]);
    assert.is(forced.code, 0, forced.stderr);
    assert.ok(fs.statSync(out).size > 4, `${what} --force replaced it`);
    assert.is(mode(out), '600', `${what} --force: 0600`);
  }
});

test.run();
