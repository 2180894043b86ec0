// Receiver throughput on a generated bgsnap stream (default 2 GiB of pages, 10%
// of them sent twice and 20% zero), next to baselines run in the same
// invocation on the same file: reading it (cat > /dev/null), cp to the same
// directory, and dd to a file with conv=fsync (the receiver fsyncs its image too).
//   node dist/bench/receive-throughput.js [--gib N] [--dir DIR] [--before OTHER/bin/bgsnap-receive.js]
import { execFileSync, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BgsnapEncoder } from '../format/bgsnap';

const PAGE = 4096;
const BATCH = 256;

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
}

function writeBatch(fd: number, enc: BgsnapEncoder, first: number, n: number, pool: Buffer): number {
  const index = Uint32Array.from({ length: n }, (_, i) => first + i);
  const zero = Uint8Array.from({ length: n }, (_, i) => ((first + i) % 5 === 0 ? 1 : 0));
  const pages: Buffer[] = [];
  for (let i = 0; i < n; i++) if (!zero[i]) pages.push(pool.subarray(((first + i) * PAGE) % (pool.length - PAGE), ((first + i) * PAGE) % (pool.length - PAGE) + PAGE));
  const parts = enc.pages({ block: 0, index, zero, data: Buffer.concat(pages) });
  for (const p of parts) fs.writeSync(fd, p);
  return n;
}

function generate(file: string, bytes: number): { records: number } {
  const pages = bytes / PAGE;
  const pool = crypto.randomBytes(64 << 20);
  const enc = new BgsnapEncoder();
  const fd = fs.openSync(file, 'w');
  const w = (parts: Buffer[]) => parts.forEach((p) => fs.writeSync(fd, p));
  w([enc.magic()]);
  w(enc.header({ snapshotId: crypto.randomBytes(16).toString('hex'), source: 'process', pageSize: PAGE, created: Date.now(), label: 'bench' }));
  w(enc.blocks([{ name: 'ram', length: bytes, address: 0 }]));
  let records = 0;
  for (let p = 0; p < pages; p += BATCH) records += writeBatch(fd, enc, p, Math.min(BATCH, pages - p), pool);
  for (let p = 0; p < pages / 10; p += BATCH) records += writeBatch(fd, enc, p * 7 % pages, Math.min(BATCH, pages - (p * 7 % pages)), pool);
  w(enc.end());
  fs.closeSync(fd);
  return { records };
}

function timed(cmd: string, args: string[], opts: { stdin?: string } = {}): number {
  const t = process.hrtime.bigint();
  const stdin = opts.stdin ? fs.openSync(opts.stdin, 'r') : 'ignore';
  const r = spawnSync(cmd, args, { stdio: [stdin, 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed with ${r.status}`);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

function dropCaches(file: string): void {
  // Warm the page cache the same way for every contender so none pays for disk reads.
  execFileSync('cat', [file], { stdio: ['ignore', 'ignore', 'inherit'] });
}

// --generate FILE: only write the stream (for timing contenders by hand).
function main(): void {
  if (arg('--generate', '')) return void generate(arg('--generate', ''), Number(arg('--gib', '2')) * 1024 ** 3);
  const gib = Number(arg('--gib', '2'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-bench-'));
  const stream = path.join(dir, 'stream.bgsnap');
  const { records } = generate(stream, gib * 1024 ** 3);
  const size = fs.statSync(stream).size;
  const bin = path.join(__dirname, '..', 'bin', 'bgsnap-receive.js');
  const rows: [string, number][] = [];
  try {
    dropCaches(stream);
    rows.push(['cat > /dev/null', timed('sh', ['-c', `cat '${stream}' > /dev/null`])]);
    rows.push(['cp to the same dir', timed('cp', [stream, path.join(dir, 'cp.out')])]);
    fs.rmSync(path.join(dir, 'cp.out'));
    rows.push(['dd to file, fsync', timed('dd', [`if=${stream}`, `of=${path.join(dir, 'dd.out')}`, 'bs=1M', 'conv=fsync', 'status=none'])]);
    fs.rmSync(path.join(dir, 'dd.out'));
    rows.push(['bgsnap-receive', timed(process.execPath, [bin, '-q', '-o', path.join(dir, 'img')], { stdin: stream })]);
    // --before DIST/bin/bgsnap-receive.js: another build (e.g. main's) on the same stream.
    const before = arg('--before', '');
    if (before) rows.push(['receive (--before)', timed(process.execPath, [before, '-q', '-o', path.join(dir, 'img-before')], { stdin: stream })]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  report(size, records, rows);
}

function report(size: number, records: number, rows: [string, number][]): void {
  const mb = size / 1e6;
  const base = rows[0][1];
  console.log(`stream: ${(size / 1024 ** 3).toFixed(2)} GiB, ${records} page records, ${os.cpus().length} cores`);
  console.log('contender              seconds     MB/s   pages/s   time vs cat');
  for (const [name, s] of rows) {
    console.log(`${name.padEnd(20)} ${s.toFixed(2).padStart(9)} ${(mb / s).toFixed(0).padStart(8)} ${(records / s).toExponential(2).padStart(9)} ${(s / base).toFixed(2).padStart(10)}x`);
  }
  // Speed ratios (time of the baseline / time of the receiver), the goals.
  const t = (name: string) => rows.find((r) => r[0] === name)?.[1];
  const rx = t('bgsnap-receive')!;
  console.log(`receive vs cp: ${(t('cp to the same dir')! / rx).toFixed(2)}x (goal >= 0.80 on tmpfs); receive vs dd conv=fsync: ${(t('dd to file, fsync')! / rx).toFixed(2)}x (goal >= 0.95 on disk)`);
  const before = t('receive (--before)');
  if (before) console.log(`receive vs --before: ${(before / rx).toFixed(2)}x faster`);
  console.log(`load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
}

main();
