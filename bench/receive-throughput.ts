// Receiver throughput on a generated bgsnap stream (default 2 GiB of pages, 10%
// of them sent twice and 20% zero), next to baselines run in the same
// invocation on the same file: reading it (cat > /dev/null), cp to the same
// directory, and dd to a file with conv=fsync (the receiver fsyncs its image too).
// The receiver runs twice: with the stream file on stdin mapped (its default,
// receiver/mapped-input.ts) and read (BGSNAP_INPUT=read, the path before).
// --rounds N repeats all contenders, in reverse order every other round; each
// round prints its own ratios and load average, wall and CPU seconds.
//   node dist/bench/receive-throughput.js [--gib N] [--dir DIR] [--rounds N] [--before OTHER/bin/bgsnap-receive.js]
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

interface Timing {
  wall: number;
  cpu: number; // user + system seconds of the contender, NaN without /usr/bin/time
}

// Under other load, wall time mostly measures waiting for a core; CPU time
// (GNU time's user + system) says what the contender itself cost.
const GNU_TIME = fs.existsSync('/usr/bin/time') ? '/usr/bin/time' : '';

function timed(cmd: string, args: string[], opts: { stdin?: string; env?: NodeJS.ProcessEnv } = {}): Timing {
  const cpuFile = path.join(os.tmpdir(), `bgsnap-bench-cpu-${process.pid}`);
  const [c, a] = GNU_TIME ? [GNU_TIME, ['-f', '%U %S', '-o', cpuFile, cmd, ...args]] : [cmd, args];
  const t = process.hrtime.bigint();
  const stdin = opts.stdin ? fs.openSync(opts.stdin, 'r') : 'ignore';
  const r = spawnSync(c, a, { stdio: [stdin, 'ignore', 'inherit'], env: { ...process.env, ...opts.env } });
  const wall = Number(process.hrtime.bigint() - t) / 1e9;
  if (typeof stdin === 'number') fs.closeSync(stdin);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed with ${r.status}`);
  if (!GNU_TIME) return { wall, cpu: NaN };
  const [user, sys] = fs.readFileSync(cpuFile, 'utf8').trim().split(/\s+/).slice(-2).map(Number);
  fs.rmSync(cpuFile, { force: true });
  return { wall, cpu: user + sys };
}

function dropCaches(file: string): void {
  // Warm the page cache the same way for every contender so none pays for disk reads.
  execFileSync('cat', [file], { stdio: ['ignore', 'ignore', 'inherit'] });
}

type Contender = [string, () => Timing];

function contenders(dir: string, stream: string): Contender[] {
  const bin = path.join(__dirname, '..', 'bin', 'bgsnap-receive.js');
  const out = (name: string) => path.join(dir, name);
  const receive = (name: string, img: string, js: string, env: NodeJS.ProcessEnv = {}): Contender => [name, () => {
    const t = timed(process.execPath, [js, '-q', '-o', out(img)], { stdin: stream, env });
    fs.rmSync(out(img), { recursive: true, force: true });
    return t;
  }];
  const list: Contender[] = [
    ['cp to the same dir', () => {
      const t = timed('cp', [stream, out('cp.out')]);
      fs.rmSync(out('cp.out'));
      return t;
    }],
    ['dd to file, fsync', () => {
      const t = timed('dd', [`if=${stream}`, `of=${out('dd.out')}`, 'bs=1M', 'conv=fsync', 'status=none']);
      fs.rmSync(out('dd.out'));
      return t;
    }],
    receive('bgsnap-receive', 'img', bin),
    receive('receive, input read', 'img-read', bin, { BGSNAP_INPUT: 'read' }),
  ];
  // --before DIST/bin/bgsnap-receive.js: another build (e.g. main's) on the same stream.
  const before = arg('--before', '');
  if (before) list.push(receive('receive (--before)', 'img-before', before));
  return list;
}

// --generate FILE: only write the stream (for timing contenders by hand).
function main(): void {
  if (arg('--generate', '')) return void generate(arg('--generate', ''), Number(arg('--gib', '2')) * 1024 ** 3);
  const gib = Number(arg('--gib', '2'));
  const rounds = Number(arg('--rounds', '1'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-bench-'));
  const stream = path.join(dir, 'stream.bgsnap');
  const { records } = generate(stream, gib * 1024 ** 3);
  const size = fs.statSync(stream).size;
  console.log(`stream: ${(size / 1024 ** 3).toFixed(2)} GiB in ${dir}, ${records} page records, ${os.cpus().length} cores`);
  try {
    dropCaches(stream);
    const cat = timed('sh', ['-c', `cat '${stream}' > /dev/null`]);
    const list = contenders(dir, stream);
    for (let r = 1; r <= rounds; r++) {
      const order = r % 2 ? list : [...list].reverse();
      const rows = new Map<string, Timing>([['cat > /dev/null', cat]]);
      for (const [name, run] of order) rows.set(name, run());
      report(`round ${r}/${rounds}`, size, records, rows);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function report(title: string, size: number, records: number, rows: Map<string, Timing>): void {
  const mb = size / 1e6;
  console.log(`${title}: load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  console.log('contender              seconds     MB/s   pages/s   CPU s');
  for (const [name, t] of rows) {
    console.log(`${name.padEnd(20)} ${t.wall.toFixed(2).padStart(9)} ${(mb / t.wall).toFixed(0).padStart(8)} ${(records / t.wall).toExponential(2).padStart(9)} ${t.cpu.toFixed(2).padStart(7)}`);
  }
  // Speed ratios (time of the baseline / time of the receiver), the goals.
  const t = (name: string) => rows.get(name)?.wall;
  const ratio = (base: string, who: string) => (t(base)! / t(who)!).toFixed(2);
  for (const who of ['bgsnap-receive', 'receive, input read', 'receive (--before)']) {
    if (!rows.has(who)) continue;
    console.log(`  ${who}: vs cp ${ratio('cp to the same dir', who)}x (goal >= 0.80 on tmpfs), vs dd conv=fsync ${ratio('dd to file, fsync', who)}x (goal >= 0.95 on disk)`);
  }
}

main();
