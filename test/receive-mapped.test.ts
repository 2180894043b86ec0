// bgsnap-receive maps a stream file given on stdin (receiver/mapped-input.ts)
// instead of reading it: the same image as from a pipe, and a file truncated
// while mapped ends the stream with its reason instead of killing the receiver
// with SIGBUS (io/native/mapped_input.cc). Real files on tmpfs, real truncation.
import { spawn, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BgsnapEncoder } from '../format/bgsnap';
import { fileops } from '../io/fileops';
import { BIN, run, sh } from './helpers/cli';
import { generateChain } from './helpers/chain-gen';
import { generate, makeHeader } from './helpers/streams';

const RECEIVE_JS = path.resolve(__dirname, '..', 'bin', 'bgsnap-receive.js');
// tmpfs: what the receiver maps is the page cache itself, as in production on /dev/shm.
const root = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'bgsnap-mapped-'));
const at = (name: string) => path.join(root, name);

function dataFiles(img: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const f of fs.readdirSync(img).filter((f) => f.startsWith('data')).sort()) out.set(f, fs.readFileSync(path.join(img, f)));
  return out;
}

async function receiveBoth(name: string, stream: Buffer, skip = 0): Promise<[Map<string, Buffer>, Map<string, Buffer>]> {
  const file = at(`${name}.bgsnap`);
  fs.writeFileSync(file, Buffer.concat([crypto.randomBytes(skip), stream]));
  const piped = await run(BIN.receive, ['-o', at(`${name}.pipe`), '-q'], 60_000, stream);
  assert.is(piped.code, 0, piped.stderr);
  // A file on stdin, its position moved past `skip` bytes by someone before us.
  const pre = skip ? `dd bs=${skip} count=1 of=/dev/null status=none; ` : '';
  const mapped = await sh(`{ ${pre}${BIN.receive} -o '${at(`${name}.file`)}' -q; } < '${file}'`, 60_000);
  assert.is(mapped.code, 0, mapped.stderr);
  const v = await run(BIN.inspect, [at(`${name}.file`), '--verify']);
  assert.is(v.code, 0, v.stdout + v.stderr);
  return [dataFiles(at(`${name}.pipe`)), dataFiles(at(`${name}.file`))];
}

test('a stream file on stdin gives the same image as the same stream through a pipe', async () => {
  const cases: [string, Buffer, number][] = [
    ['plain', generate(51, { blocks: 3 }).stream, 0],
    ['zstd', generate(52, { compressLevel: 1 }).stream, 0], // compressed frames are read, not mapped
    ['offset', generate(53).stream, 4097], // stdin already read up to an unaligned offset
    ['chain', generateChain(54, 4).stream, 0],
  ];
  for (const [name, stream, skip] of cases) {
    const [piped, mapped] = await receiveBoth(name, stream, skip);
    assert.equal([...mapped.keys()], [...piped.keys()], name);
    for (const [f, bytes] of piped) assert.ok(bytes.equals(mapped.get(f)!), `${name}: ${f} differs`);
  }
});

// Pages of a big stream: 256-page frames of data from a random pool (a tenth zero).
function bigStream(file: string, mib: number): void {
  const enc = new BgsnapEncoder();
  const pool = crypto.randomBytes(8 << 20);
  const pages = (mib << 20) / 4096;
  const fd = fs.openSync(file, 'w');
  const put = (parts: Buffer[]) => parts.forEach((p) => fs.writeSync(fd, p));
  put([enc.magic()]);
  put(enc.header(makeHeader()));
  put(enc.blocks([{ name: 'ram', length: pages * 4096, address: 0 }]));
  for (let p = 0; p < pages; p += 256) {
    const index = Uint32Array.from({ length: 256 }, (_, i) => p + i);
    const zero = Uint8Array.from(index, (i) => (i % 10 === 0 ? 1 : 0));
    const data = Buffer.concat([...index].filter((i) => i % 10 !== 0).map((i) => pool.subarray((i * 4096) % pool.length, ((i * 4096) % pool.length) + 4096)));
    put(enc.pages({ block: 0, index, zero, data }));
  }
  put(enc.end());
  fs.closeSync(fd);
}

function mappings(pid: number, file: string): { off: number; len: number }[] {
  let maps = '';
  try {
    maps = fs.readFileSync(`/proc/${pid}/maps`, 'utf8');
  } catch {
    return [];
  }
  return maps.split('\n').filter((l) => l.endsWith(file)).map((l) => {
    const [range, , off] = l.split(/\s+/);
    const [lo, hi] = range.split('-').map((h) => parseInt(h, 16));
    return { off: parseInt(off, 16), len: hi - lo };
  });
}

// The first page boundary at or after `near` that lies among a PAGES frame's
// data pages (a cut in a frame header or its metadata is met by a short pread).
function dataCut(file: string, near: number): number {
  const fd = fs.openSync(file, 'r');
  const h = Buffer.alloc(24);
  try {
    for (let pos = 8; fs.readSync(fd, h, 0, 24, pos) === 24; pos += 16 + h.readUInt32LE(4)) {
      const n = h.readUInt32LE(20);
      const dataStart = pos + 16 + 8 + n * 5 + ((4 - (n % 4)) % 4);
      const cut = Math.ceil(Math.max(near, dataStart + 1) / 4096) * 4096;
      if (h.readUInt8(0) === 3 && cut < pos + 16 + h.readUInt32LE(4)) return cut;
    }
  } finally {
    fs.closeSync(fd);
  }
  throw new Error(`no data pages after byte ${near} of ${file}`);
}

// Starts the receiver on the file, stops it once it has mapped a window of the
// file, truncates the file among data pages halfway into that window (ahead of
// the page writer, which trails the reader), and lets it go on.
async function receiveTruncated(file: string, img: string): Promise<{ code: number | null; signal: string | null; stderr: string; cut: number }> {
  const rx = spawn('nice', ['-n', '19', process.execPath, RECEIVE_JS, '-o', img], { stdio: [fs.openSync(file, 'r'), 'ignore', 'pipe'] });
  let stderr = '';
  rx.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<[number | null, string | null]>((resolve) => rx.on('exit', (code, sig) => resolve([code, sig])));
  let done = false;
  void exited.then(() => (done = true));
  let cut = -1;
  for (const deadline = Date.now() + 60_000; !done && cut < 0 && Date.now() < deadline; await new Promise((r) => setImmediate(r))) {
    if (mappings(rx.pid!, file).length === 0) continue;
    rx.kill('SIGSTOP');
    const w = mappings(rx.pid!, file).sort((a, b) => b.off - a.off)[0];
    if (w) {
      cut = dataCut(file, w.off + w.len / 2);
      fs.truncateSync(file, cut);
    }
    rx.kill('SIGCONT');
  }
  const [code, signal] = await exited;
  return { code, signal, stderr, cut };
}

test('a stream file truncated while mapped: exit 2 naming the truncation, image incomplete and within its bounds, no SIGBUS', async () => {
  const master = at('big.bgsnap');
  bigStream(master, 256);
  let guarded = 0;
  // The reader may pass the cut before it lands (then a short pread ends the
  // stream instead of a vanished mapped page): try until the mapped case was seen.
  for (let attempt = 1; attempt <= 8 && guarded === 0; attempt++) {
    const file = at('cut.bgsnap');
    const img = at(`cut${attempt}`);
    fs.copyFileSync(master, file);
    const r = await receiveTruncated(file, img);
    assert.is(r.signal, null, `killed by ${r.signal}: ${r.stderr}`);
    assert.is(r.code, 2, r.stderr);
    assert.ok(r.cut > 0, `attempt ${attempt}: the receiver never mapped the file: ${r.stderr}`);
    assert.match(r.stderr, /INCOMPLETE: bgsnap stream: (the input file was truncated while being read: byte \d+ is gone|input ended before)/);
    if (/truncated while being read/.test(r.stderr)) guarded++;
    const i = await run(BIN.inspect, [img, '--json']);
    assert.is(i.code, 0, i.stderr);
    const d = JSON.parse(i.stdout);
    assert.is(d.status, 'incomplete');
    assert.match(d.reason, /truncated|input ended/);
    assert.is(fs.statSync(path.join(img, 'data')).size, 256 << 20, 'nothing written past the image');
    const v = await run(BIN.inspect, [img, '--verify']);
    assert.match(v.stdout, / 0 without checksum, 0 bad \(image is incomplete\)/, 'every page stored has its checksum and matches it');
    fs.rmSync(img, { recursive: true });
    fs.rmSync(file);
  }
  assert.ok(guarded > 0, 'the truncation never landed in a mapped window ahead of the writer');
});

test('a mapped view whose file shrank: crc32 and writePages report the truncation and write nothing', async () => {
  const file = at('shrink.bin');
  fs.writeFileSync(file, crypto.randomBytes(2 << 20));
  const fd = fs.openSync(file, 'r');
  const view = fileops.mapInput(fd, 0, 2 << 20);
  fs.truncateSync(file, 1 << 20);
  assert.is(fileops.crc32(view.subarray(0, 1 << 20)), fileops.crc32(fs.readFileSync(file)));
  const err = (() => {
    try {
      fileops.crc32(view);
    } catch (e) {
      return e as Error & { code?: string };
    }
  })();
  assert.is(err?.code, 'INPUT_TRUNCATED');
  assert.match(String(err?.message), /truncated while being read: byte 1048576 is gone \(the file now has 1048576 bytes\)/);
  const out = fs.openSync(at('shrink.out'), 'w+');
  const n = 512;
  const bits = () => new Uint8Array(n / 8);
  const job = {
    fd: out, pageSize: 4096, base: 0, pages: n, index: Uint32Array.from({ length: n }, (_, i) => i), zero: new Uint8Array(n), data: view,
    present: bits(), dataBits: bits(), discarded: bits(), crcs: new Uint32Array(n), isData: new Uint8Array(n),
  };
  const r = await fileops.writePages([job]);
  assert.is(r.truncatedAt, 0);
  assert.match(String(r.truncated), /truncated while being read: byte 1048576 is gone/);
  assert.is(fs.fstatSync(out).size, 0, 'no page of the batch was written');
  assert.ok(job.present.every((b) => b === 0), 'no page marked present');
  fs.closeSync(out);
  fs.closeSync(fd);
});

test('a SIGBUS outside the guard still kills as before (the handler passes it on)', () => {
  const file = at('foreign.bin');
  fs.writeFileSync(file, Buffer.alloc(2 << 20, 1));
  // JavaScript reading a mapped view is not guarded: the default action must stand.
  const code = `const {fileops}=require(${JSON.stringify(path.resolve(__dirname, '..', 'io', 'fileops.js'))});
    const fs=require('fs'); const fd=fs.openSync(${JSON.stringify(file)},'r');
    const v=fileops.mapInput(fd,0,2<<20); fs.truncateSync(${JSON.stringify(file)},0);
    console.log(v[1<<20]);`;
  const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
  assert.is(r.signal, 'SIGBUS', `status ${r.status}: ${r.stderr}`);
});

test.after(() => fs.rmSync(root, { recursive: true, force: true }));
test.run();
