// What Redis's clients feel during a snapshot: a real redis-server (Debian's)
// holding ~500 MB, loaded by bench/redisload.c (closed-loop SETs over the same
// key space, every request's latency recorded), snapshotted in turn by
//   bgsnap   bgsnap-capture --pid | bgsnap-receive -o IMAGE (on this disk)
//   bgsnap>file   the same stream to a file on this disk, received later
//   precopy, precopy>file   both with --precopy: passes no writer waits for,
//            then the snapshot (its stop saves what is left, or protects it
//            for a finish with write-protect faults: "finished with faults")
//   precopy+zstd>file   the same with --compress=LEVEL (--zstd-level, default
//            -3): its first pass compressed, the later ones raw
//   BGSAVE   Redis's own fork-based snapshot (dump.rdb on this disk)
//   gcore    gdb's core dump (the server is stopped for all of it)
//   none     no snapshot: the load alone, same length of window
// all in one invocation, interleaved per round. For each: the pause (bgsnap:
// its freeze; BGSAVE: latest_fork_usec; gcore: its wall time) and the clients'
// p50/p99/p99.9/max over the requests in flight during the snapshot.
//   node dist/bench/redis-clients.js [--runs 2] [--keys 500000] [--value 1000] [--conns 8]
//        [--buffer-mb 64] [--precopy-buffer-mb 128] [--base DIR]   (DIR: another built checkout, e.g. main,
//        as "bgsnap@base" and "precopy@base>file") [--only NAME,...]   (some contenders, by name, in that order)
//        [--zstd-level N]
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { arg, BIN, machine } from './process-common';
import { startRedis, type Redis } from '../test/helpers/servers';

const REPO = path.resolve(__dirname, '..', '..');
const now = () => process.hrtime.bigint(); // CLOCK_MONOTONIC, as redisload's stamps
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function loadBin(): string {
  const src = path.join(REPO, 'bench', 'redisload.c');
  const hash = crypto.createHash('sha256').update(fs.readFileSync(src)).digest('hex').slice(0, 12);
  const out = path.join(os.tmpdir(), 'bgsnap-bench', `redisload-${hash}`);
  if (!fs.existsSync(out)) {
    fs.mkdirSync(path.dirname(out), { recursive: true });
    execFileSync('gcc', ['-O2', '-Wall', '-o', `${out}.${process.pid}`, src], { stdio: 'inherit' });
    fs.renameSync(`${out}.${process.pid}`, out);
  }
  return out;
}

// A bgsnap window's phases, by the generations' instants: [name, from, to].
type Phase = [string, bigint, bigint];
interface Window { contender: string; pauseMs: number; t0: bigint; t1: bigint; note: string; phases?: Phase[] }
interface Row extends Window { n: number; p50: number; p99: number; p999: number; max: number; rps: number }

// Latencies (ms) of the requests in flight at any moment of [t0, t1], from
// redisload's records. Also when the slowest of them started, in ms after t0.
function latencies(buf: Buffer, t0: bigint, t1: bigint): { l: number[]; maxAt: number } {
  const l: number[] = [];
  let max = -1, maxAt = 0;
  for (let o = 0; o + 12 <= buf.length; o += 12) {
    const start = buf.readBigUInt64LE(o), lat = buf.readUInt32LE(o + 8);
    if (start > t1 || start + BigInt(lat) < t0) continue;
    l.push(lat / 1e6);
    if (lat > max) { max = lat; maxAt = Number(start - t0) / 1e6; }
  }
  return { l: l.sort((a, b) => a - b), maxAt };
}

const quantile = (l: number[], p: number) => l[Math.min(l.length - 1, Math.floor(l.length * p))] ?? NaN;

// Where the slow requests of a window fall: each phase's length, its
// requests, how many took over 1 ms, and its max (a request counts in every
// phase it was in flight during).
function byPhase(buf: Buffer, phases: Phase[]): string {
  return 'by phase (ms: requests, over 1 ms, max) ' + phases.map(([name, a, b]) => {
    const { l } = latencies(buf, a, b);
    const firstSlow = l.findIndex((x) => x > 1);
    return `${name} ${(Number(b - a) / 1e6).toFixed(0)}: ${l.length}, ${firstSlow < 0 ? 0 : l.length - firstSlow}, ${(l[l.length - 1] ?? NaN).toFixed(1)}`;
  }).join('; ');
}

function row(w: Window, file: string): Row {
  const buf = fs.readFileSync(file);
  const { l, maxAt } = latencies(buf, w.t0, w.t1);
  const q = (p: number) => quantile(l, p);
  const phases = w.phases ? `; ${byPhase(buf, w.phases)}` : '';
  const note = `max at +${maxAt.toFixed(0)} ms${phases}${w.note ? `; ${w.note}` : ''}`;
  return { ...w, note, n: l.length, p50: q(0.5), p99: q(0.99), p999: q(0.999), max: l[l.length - 1] ?? NaN, rps: l.length / (Number(w.t1 - w.t0) / 1e9) };
}

interface Run { root?: string; precopy?: boolean; toFile?: boolean; zstd?: boolean }

// `root` another build of bgsnap (--base DIR): the same capture by an older
// engine, side by side with this one. `toFile`: the stream to a file on this
// disk (as BGSAVE's dump.rdb), received later, outside the window. `zstd`: the
// stream compressed (BGSAVE's RDB is LZF-compressed by default), at level
// --zstd-level.
const ZSTD_LEVEL = arg('--zstd-level', '-3');
function bgsnap(r: Redis, dir: string, bufferMb: string, run: Run = {}): Window {
  const { root, precopy, toFile, zstd } = run;
  const capture = root ? path.join(root, 'dist', 'bin', 'bgsnap-capture.js') : BIN.capture;
  const receive = root ? path.join(root, 'dist', 'bin', 'bgsnap-receive.js') : BIN.receive;
  const stats = path.join(dir, 'cap.json'), img = path.join(dir, 'img'), file = path.join(dir, 'stream.bgsnap');
  for (const f of [img, stats, file]) fs.rmSync(f, { recursive: true, force: true });
  const name = `${precopy ? 'precopy' : 'bgsnap'}${root ? '@base' : ''}${zstd ? '+zstd' : ''}${toFile ? '>file' : ''}`;
  const t0 = now(), wall0 = Date.now();
  const out = toFile ? `-o ${file}` : `| node ${receive} -q -o ${img}`;
  const p = spawnSync('sh', ['-c', `node ${capture} --pid ${r.pid}${precopy ? ' --precopy' : ''}${zstd ? ` --compress=${ZSTD_LEVEL}` : ''} --buffer-mb ${bufferMb} --stats ${stats} ${out}`], { encoding: 'utf8' });
  const t1 = now();
  for (const f of [img, file]) fs.rmSync(f, { recursive: true, force: true });
  // An older build's pre-copy (--base) could give up; this one finishes with faults.
  const gaveUp = precopy && /pre-copy did not converge[^\n]*/.exec(p.stderr);
  if (gaveUp) {  // no --stats then: its passes' stops are on stderr
    const pauses = [...p.stderr.matchAll(/generation \d+ \(pass\): pause ([\d.]+) ms, (\d+) pages/g)];
    const pages = pauses.map((m) => m[2]).join(', ');
    return { contender: name, pauseMs: Math.max(...pauses.map((m) => Number(m[1]))), t0, t1, note: `${pauses.length} passes (${pages} pages), no snapshot: ${gaveUp[0].slice(0, 100)}...` };
  }
  if (p.status !== 0) throw new Error(`bgsnap pipe failed: ${p.stderr}`);
  if (process.env.BGSNAP_BENCH_DEBUG) process.stderr.write(p.stderr);
  const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
  const at = s.snapshotTime ? `snapshot at +${(s.snapshotTime - wall0).toFixed(0)} ms, ` : '';
  const gens = (s.generations ?? []) as { instant: number; seconds: number; faults: number; pass?: boolean; pages: number; pauseMs: number; syncFinish?: boolean; moveStops?: number; moveMaxMs?: number; stopPages?: number; heldPages?: number }[];
  const last = gens[gens.length - 1];
  // Older builds (--base) move memory inside the snapshot's stop: no moveStops.
  const moved = last?.moveStops ? `: memory moved in ${last.moveStops} stops of at most ${last.moveMaxMs!.toFixed(1)} ms, ${last.stopPages} pages saved in the snapshot's stop, ${last.heldPages ?? 0} read during the move` : '';
  const finish = last?.syncFinish ? `, finished with faults${moved}` : '';
  const passes = precopy ? `${gens.length - 1} passes then the snapshot${finish} (pages ${gens.map((g) => g.pages).join(', ')}; faults ${gens.map((g) => g.faults).join(', ')}; stops ${gens.map((g) => g.pauseMs.toFixed(1)).join(', ')} ms), ` : '';
  const note = `${passes}${at}faults ${s.faults} (${s.pagesByFault} pages), fault wait p99 ${s.faultWaitP99Ms.toFixed(2)} max ${s.faultWaitMaxMs.toFixed(1)} ms, buffer waits ${s.bufferWaits}, layout events ${s.layoutEvents.remove + s.layoutEvents.unmap + s.layoutEvents.remap} (EAGAIN ${s.layoutEvents.eagain}), capture RSS ${(s.maxRssKiB / 1024).toFixed(0)} MiB`;
  return { contender: name, pauseMs: s.pauseMs, t0, t1, note, phases: phasesOf(gens, t0, wall0, t1) };
}

// Pre-copy's phases on the load's clock: before the first pass, the passes,
// from the last pass's end to the snapshot's instant ("move": the finish's
// move, or only the wait for the output), the snapshot until its last page is
// out, and the rest of the window.
function phasesOf(gens: { instant: number; seconds: number; pass?: boolean }[], t0: bigint, wall0: number, t1: bigint): Phase[] | undefined {
  const snap = gens[gens.length - 1], passes = gens.filter((g) => g.pass);
  if (!snap || !passes.length || typeof snap.instant !== 'number') return undefined;
  const at = (wallMs: number) => t0 + BigInt(Math.round((wallMs - wall0) * 1e6));
  const last = passes[passes.length - 1]!;
  const marks = [t0, at(gens[0]!.instant), at(last.instant + last.seconds * 1000), at(snap.instant), at(snap.instant + snap.seconds * 1000), t1];
  const names = ['start', 'passes', 'move', 'snapshot', 'end'];
  return names.map((n, i): Phase => [n, marks[i]!, marks[i + 1]!]).filter(([, a, b]) => b > a);
}

async function bgsave(r: Redis): Promise<Window> {
  const t0 = now();
  if (!/started/.test(r.cli('BGSAVE'))) throw new Error('BGSAVE did not start');
  while (/rdb_bgsave_in_progress:1/.test(r.cli('INFO', 'persistence'))) await sleep(20);
  const t1 = now();
  if (!/rdb_last_bgsave_status:ok/.test(r.cli('INFO', 'persistence'))) throw new Error('BGSAVE failed');
  const fork = Number(/latest_fork_usec:(\d+)/.exec(r.cli('INFO', 'stats'))![1]) / 1000;
  return { contender: 'BGSAVE', pauseMs: fork, t0, t1, note: '' };
}

function gcore(r: Redis, dir: string): Window {
  const t0 = now();
  const p = spawnSync('gcore', ['-o', path.join(dir, 'core'), String(r.pid)], { encoding: 'utf8' });
  const t1 = now();
  if (p.status !== 0) throw new Error(`gcore failed: ${p.stderr}`);
  for (const f of fs.readdirSync(dir)) if (f.startsWith('core')) fs.rmSync(path.join(dir, f));
  return { contender: 'gcore', pauseMs: Number(t1 - t0) / 1e6, t0, t1, note: '' };
}

// One contender under load: the load runs 1 s before and 0.5 s after it.
async function underLoad(r: Redis, dir: string, conns: string, keys: string, value: string, snap: () => Promise<Window>): Promise<Row> {
  const file = path.join(dir, 'samples.bin');
  const out = fs.openSync(file, 'w');
  const load = spawn(loadBin(), [r.sock, conns, '600', keys, value], { stdio: ['ignore', out, 'inherit'] });
  const exited = new Promise<number | null>((res) => load.on('exit', (c) => res(c)));
  await sleep(1000);
  const w = await snap();
  await sleep(500);
  load.kill('SIGTERM');
  const code = await exited;
  fs.closeSync(out);
  if (code !== 0) throw new Error(`redisload exited ${code}: the clients saw an error`);
  return row(w, file);
}

function table(rows: Row[]): string {
  const f = (x: number) => x.toFixed(2);
  const lines = ['contender            pause ms   window s   requests   req/s    p50 ms   p99 ms  p99.9 ms    max ms'];
  for (const r of rows) {
    lines.push(`${r.contender.padEnd(18)} ${f(r.pauseMs).padStart(10)} ${(Number(r.t1 - r.t0) / 1e9).toFixed(2).padStart(10)} ${String(r.n).padStart(10)} ${r.rps.toFixed(0).padStart(7)} ` +
      `${f(r.p50).padStart(8)} ${f(r.p99).padStart(8)} ${f(r.p999).padStart(9)} ${f(r.max).padStart(9)}${r.note ? `   ${r.note}` : ''}`);
  }
  return lines.join('\n');
}

async function main() {
  const runs = Number(arg('--runs', '2')), keys = arg('--keys', '500000'), value = arg('--value', '1000');
  const conns = arg('--conns', '8'), bufferMb = arg('--buffer-mb', '64'), base = arg('--base', '');
  const precopyMb = arg('--precopy-buffer-mb', '128'); // its snapshot's stop may save half of it
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-redis-bench-'));
  console.log(`machine: ${machine()}`);
  const r = await startRedis(dir);
  try {
    const fill = spawnSync('redis-benchmark', ['-s', r.sock, '-t', 'set', '-n', String(Number(keys) * 2), '-r', keys, '-d', value, '-P', '32', '-q'], { encoding: 'utf8' });
    if (fill.status !== 0) throw new Error(`redis-benchmark fill failed: ${fill.stderr}`);
    const mem = /used_memory:(\d+)/.exec(r.cli('INFO', 'memory'))![1];
    console.log(`redis-server ${r.pid}: ${r.cli('DBSIZE')} keys, used_memory ${(Number(mem) / 2 ** 20).toFixed(0)} MiB; load: ${conns} connections, SET of ${value}-byte values over ${keys} keys; --buffer-mb ${bufferMb}, pre-copy ${precopyMb}`);
    // Contenders by the names the table shows; --only picks some (comma-separated),
    // run in its order.
    const all: [string, () => Promise<Window>][] = [
      ['none', async () => { const t0 = now(); await sleep(3000); return { contender: 'none', pauseMs: 0, t0, t1: now(), note: '' }; }],
      ['bgsnap', async () => bgsnap(r, dir, bufferMb)],
      ['bgsnap@base', async () => bgsnap(r, dir, bufferMb, { root: base })],
      ['bgsnap>file', async () => bgsnap(r, dir, bufferMb, { toFile: true })],
      ['precopy', async () => bgsnap(r, dir, precopyMb, { precopy: true })],
      ['precopy>file', async () => bgsnap(r, dir, precopyMb, { precopy: true, toFile: true })],
      ['precopy+zstd>file', async () => bgsnap(r, dir, precopyMb, { precopy: true, toFile: true, zstd: true })],
      ['precopy@base>file', async () => bgsnap(r, dir, precopyMb, { precopy: true, toFile: true, root: base })],
      ['BGSAVE', () => bgsave(r)],
      ['gcore', async () => gcore(r, dir)],
    ];
    const only = arg('--only', '').split(',').filter(Boolean);
    const unknown = only.filter((n) => !all.some(([name]) => name === n));
    if (unknown.length) throw new Error(`--only: no contender named ${unknown.join(', ')} (${all.map(([n]) => n).join(', ')})`);
    const picked = (only.length ? only.map((n) => all.find(([name]) => name === n)!) : all).filter(([name]) => base || !name.includes('@base'));
    const rows: Row[] = [];
    for (let i = 0; i < runs; i++) {
      for (const [, run] of picked) rows.push(await underLoad(r, dir, conns, keys, value, run));
      console.log(table(rows.slice(-picked.length)));
    }
    if (r.cli('PING') !== 'PONG') throw new Error('redis unhealthy after the runs');
    console.log(`\nall runs (load average now ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}):\n${table(rows)}`);
  } finally {
    r.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
