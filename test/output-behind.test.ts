// io/output.ts writes a regular file behind: what write(2) took goes to the
// disk window by window and, 32 MiB later, leaves the page cache, so a capture
// stream of any size holds little memory where the disk keeps up, and a write
// back that fails is this output's error, not a later fsync's that nobody
// calls. Real files on a real
// ext4 (the page cache seen with util-linux's fincore), and a real write back
// failure: ext4 on a loop device whose backing file lives on a tmpfs too small
// for it (thin storage that ran out), so ext4 takes the writes and the disk
// write fails later with EIO.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Output } from '../io/output';

const MiB = 1 << 20;
let dir = '';

// Bytes of the file in the page cache.
function cached(file: string): number {
  return Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim());
}

// 1 MiB chunks of distinct bytes; every third is written without waiting for it.
async function writeChunks(out: Output, n: number, each?: (i: number) => Promise<void>): Promise<string> {
  const hash = crypto.createHash('sha256');
  for (let i = 0; i < n; i++) {
    const buf = crypto.randomBytes(MiB);
    hash.update(buf);
    await (i % 3 === 2 ? out.write(buf) : out.writeSettled(buf));
    await each?.(i);
  }
  return hash.digest('hex');
}

test.before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-behind-'));
  const fsType = execFileSync('stat', ['-f', '-c', '%T', dir], { encoding: 'utf8' }).trim();
  // tmpfs has no disk to write behind to: the page cache is the file.
  assert.not.equal(fsType, 'tmpfs', `${dir} is on tmpfs; this test needs a disk file system`);
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

// Paced at 8 MiB per 50 ms (160 MB/s) so that the disk keeps up.
test('a 128 MiB file keeps at most 56 MiB in the page cache, none after close, and its bytes', async () => {
  const file = path.join(dir, 'stream.bgsnap');
  const out = Output.open(file);
  let most = 0;
  const sum = await writeChunks(out, 128, async (i) => {
    if (i % 8 !== 7) return;
    most = Math.max(most, cached(file));
    await new Promise((r) => setTimeout(r, 50));
  });
  await out.close();
  const after = cached(file);
  const read = crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
  console.log(`  page cache: at most ${(most / MiB).toFixed(1)} MiB while written, ${(after / MiB).toFixed(1)} MiB after close`);
  assert.ok(most <= 56 * MiB, `${most} bytes cached while written: not written behind`);
  assert.ok(after <= MiB, `${after} bytes cached after close`);
  assert.is(read, sum, 'the file holds what was written');
  assert.is((fs.statSync(file).mode & 0o777).toString(8), '600');
});

test('a write back that fails (EIO from thin storage) fails the output, naming the file', async () => {
  const mnt = path.join(dir, 'mnt'), thin = path.join(dir, 'thin');
  fs.mkdirSync(mnt), fs.mkdirSync(thin);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', thin]);
  let loop = '';
  try {
    const backing = path.join(thin, 'disk.img');
    fs.writeFileSync(backing, ''), fs.truncateSync(backing, 256 * MiB); // sparse: 256 MiB promised, 24 held
    loop = execFileSync('losetup', ['--find', '--show', backing], { encoding: 'utf8' }).trim();
    execFileSync('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', loop]);
    execFileSync('mount', ['-o', 'errors=continue', loop, mnt]);
    const file = path.join(mnt, 'stream.bgsnap');
    const out = Output.open(file);
    const err = await writeChunks(out, 128).then(() => out.close()).then(() => undefined, (e: NodeJS.ErrnoException) => e);
    assert.ok(err, 'the output closed without an error: the bytes past 24 MiB are nowhere');
    assert.ok(err!.message.startsWith(`writing ${file}: `), err!.message);
    assert.ok(['EIO', 'ENOSPC'].includes(err!.code ?? ''), `${err!.message} (code ${err!.code})`);
    console.log(`  ${err!.message} (code ${err!.code})`);
    await out.abandon(); // as StreamSink.finish does after a close that failed: resolves, file closed
    const open = fs.readdirSync('/proc/self/fd').filter((fd) => {
      try { return fs.readlinkSync(`/proc/self/fd/${fd}`) === file; } catch { return false; }
    });
    assert.equal(open, [], 'the file is closed after the failure');
  } finally {
    execFileSync('sh', ['-c', `umount -l ${mnt}; ${loop ? `losetup -d ${loop};` : ''} umount -l ${thin}`]);
  }
});

test.run();
