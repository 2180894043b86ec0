// Real programs from Debian's packages, each snapshotted with the real CLIs
// (`bgsnap-capture --pid | bgsnap-receive`) while its own client loads it:
// Redis under redis-benchmark, a PostgreSQL backend under pgbench, a Python
// interpreter and the Node.js runtime running self-checking workloads. The
// clients see no error, the servers stay healthy (PING, SELECT 1, pgbench's
// balances still agree), the workloads' own checks pass after the capture, and
// the core (`bgsnap-convert --to elf-core`) opens in gdb with every thread the
// capture froze. Each load lasts until just after its capture (pgbench: 15 s).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BIN, run, sh } from './helpers/cli';
import { have, startPostgres, startRedis } from './helpers/servers';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function skip(what: string, cmds: string[]): boolean {
  const missing = cmds.filter((c) => !have(c));
  if (missing.length) console.log(`  SKIP ${what}: ${missing.join(', ')} not installed (apt-get install redis-server redis-tools postgresql)`);
  return missing.length > 0;
}

// Capture through the real pipe, convert to a core, count gdb's threads.
// `extra`: more capture flags (--precopy: the core is its snapshot generation).
async function snapshot(pid: number, dir: string, extra = ''): Promise<{ threads: number; gdbThreads: number; stats: Record<string, number> }> {
  const exe = fs.readlinkSync(`/proc/${pid}/exe`);
  const img = path.join(dir, 'img'), core = path.join(dir, 'core'), statsFile = path.join(dir, 'cap.json');
  const cap = await sh(`${BIN.capture} --pid ${pid} ${extra} --stats ${statsFile} | ${BIN.receive} -q -o ${img}`, 120_000);
  assert.is(cap.code, 0, `capture | receive: ${cap.stderr}`);
  const stats = JSON.parse(fs.readFileSync(statsFile, 'utf8'));
  const conv = await run(BIN.convert, [img, '--to', 'elf-core', '-o', core], 60_000);
  assert.is(conv.code, 0, `convert: ${conv.stderr}`);
  const g = await run('gdb', ['-batch', '-nx', '-ex', 'info threads', exe, core], 120_000);
  assert.is(g.code, 0, `gdb: ${g.stderr}`);
  const gdbThreads = g.stdout.split('\n').filter((l) => /^\*?\s+\d+\s+(Thread 0x|LWP )/.test(l)).length;
  console.log(`  ${path.basename(exe)} ${pid}: ${stats.threads} threads, pause ${stats.pauseMs.toFixed(2)} ms, ` +
    `${(stats.capturedBytes / 2 ** 20).toFixed(0)} MiB in ${stats.seconds.toFixed(2)} s, faults ${stats.faults} ` +
    `(wait max ${stats.faultWaitMaxMs.toFixed(1)} ms); gdb lists ${gdbThreads} threads` +
    (stats.generations ? `; generations (pages, pause ms): ${(stats.generations as unknown as { pages: number; pauseMs: number; pass: boolean }[])
      .map((g) => `${g.pass ? 'pass' : 'snapshot'} ${g.pages} ${g.pauseMs.toFixed(1)}`).join(', ')}` : ''));
  fs.rmSync(img, { recursive: true, force: true });
  fs.rmSync(core, { force: true });
  return { threads: stats.threads, gdbThreads, stats };
}

// Runs `cmd` back to back until stop() (at least once); every run must exit 0
// with no error in its output.
function loadLoop(cmd: string): { stop: () => Promise<number> } {
  let stopped = false;
  const done = (async () => {
    let runs = 0;
    do {
      const r = await sh(cmd, 60_000);
      assert.is(r.code, 0, `${cmd}: exit ${r.code}\n${r.stdout}\n${r.stderr}`);
      assert.not.match(r.stdout + r.stderr, /error/i, `${cmd}: ${r.stdout}${r.stderr}`);
      runs++;
    } while (!stopped);
    return runs;
  })();
  return { stop: () => { stopped = true; return done; } };
}

function tmp(name: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `bgsnap-${name}-`));
}

// --precopy: these servers' bounded loads leave fewer than 4096 written pages
// after a pass, so the snapshot's stop saves them and no write of theirs waits
// on us (a finish with faults is test/precopy's).
for (const extra of ['', '--precopy --precopy-final-pages 4096 --buffer-mb 256']) test(`Redis under redis-benchmark${extra && ` (${extra})`}: no client error, PING after, core with every thread in gdb`, async () => {
  if (skip('Redis', ['redis-server', 'redis-benchmark', 'redis-cli'])) return;
  const dir = tmp('redis');
  const r = await startRedis(dir);
  try {
    const fill = await sh(`redis-benchmark -s ${r.sock} -t set -n 100000 -r 50000 -d 512 -P 16 -q`, 60_000);
    assert.is(fill.code, 0, fill.stderr);
    const keys = Number(r.cli('DBSIZE'));
    const load = loadLoop(`redis-benchmark -s ${r.sock} -t set,get,incr,lpush,lpop -n 20000 -r 50000 -d 512 -c 20 -q`);
    await sleep(300);
    const s = await snapshot(r.pid, dir, extra);
    const runs = await load.stop();
    if (extra) assert.is(s.stats.faults, 0, 'pre-copy: no write of the server waited on us');
    assert.is(r.cli('PING'), 'PONG', 'redis answers after the capture');
    assert.ok(Number(r.cli('DBSIZE')) >= keys, 'no key lost');
    assert.ok(s.threads >= 2, `redis-server runs its bio threads too: ${s.threads}`);
    assert.is(s.gdbThreads, s.threads, 'gdb lists every captured thread');
    console.log(`  redis-benchmark: ${runs} runs, all exit 0 without error`);
  } finally {
    r.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

for (const extra of ['', '--precopy --precopy-final-pages 4096 --buffer-mb 256']) test(`PostgreSQL backend under pgbench${extra && ` (${extra})`}: no failed transaction, balances agree, SELECT 1, core in gdb`, async () => {
  if (skip('PostgreSQL', ['pgbench', 'psql', 'runuser'])) return;
  const dir = tmp('pg');
  const port = 20000 + (process.pid % 20000);
  const pg = await startPostgres(dir, port);
  const conn = `-h ${dir} -p ${port} -U postgres`;
  try {
    const init = await sh(`pgbench ${conn} -i -s 2 -q postgres`, 120_000);
    assert.is(init.code, 0, init.stderr);
    // Its backends end with the run: it must outlast the capture (2-4 s here on a
    // loaded machine), so the test's length is this -T.
    const bench = sh(`pgbench ${conn} -c 4 -j 2 -T 15 postgres`, 60_000);
    await sleep(1000);
    const backend = Number(pg.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench' LIMIT 1"));
    assert.ok(backend > 0, 'a pgbench backend is running');
    const s = await snapshot(backend, dir, extra);
    if (extra) assert.is(s.stats.faults, 0, 'pre-copy: no write of the backend waited on us');
    const b = await bench;
    assert.is(b.code, 0, `pgbench: ${b.stdout}${b.stderr}`);
    assert.match(b.stdout, /number of failed transactions: 0 /, b.stdout);
    assert.not.match(b.stderr, /error/i, b.stderr);
    assert.is(pg.psql('SELECT 1'), '1', 'the server answers after the capture');
    const sums = pg.psql('SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers)');
    const [a, br, te] = sums.split('|');
    assert.ok(a === br && br === te, `every transaction moved the same delta through accounts, branches, tellers: ${sums}`);
    assert.ok(Number(pg.psql('SELECT count(*) FROM pgbench_history')) > 0, 'transactions ran');
    assert.is(s.gdbThreads, s.threads, 'gdb lists every captured thread');
    console.log(`  pgbench: ${/tps = [\d.]+/.exec(b.stdout)?.[0]}, balances ${a}`);
  } finally {
    pg.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// A workload that keeps a conserved total while threads move value between
// slots of a large structure, then checks it: exit 0 only if it still holds.
const PYTHON = `
import threading, random, time, sys
N = 400000
vals = [100] * N
blobs = {i: bytes([i % 251]) * 200 for i in range(60000)}
lock = threading.Lock()
deadline = time.time() + float(sys.argv[1])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
def mover(seed):
    r = random.Random(seed)
    while not done.is_set() and time.time() < deadline:
        i, j, d = r.randrange(N), r.randrange(N), r.randrange(10)
        with lock:
            vals[i] -= d; vals[j] += d
        k = r.randrange(60000); blobs[k] = bytes([k % 251]) * 200
ts = [threading.Thread(target=mover, args=(s,)) for s in range(3)]
[t.start() for t in ts]
print("ready", flush=True)
[t.join() for t in ts]
ok = sum(vals) == 100 * N and all(b == bytes([k % 251]) * 200 for k, b in blobs.items())
print("ok" if ok else "bad", flush=True)
sys.exit(0 if ok else 1)
`;

const NODE = `
const { Worker, isMainThread, workerData, parentPort } = require('node:worker_threads');
const N = 300000;
function churn(seed, flag, deadline) {
  const vals = new Float64Array(N).fill(100);
  const objs = Array.from({ length: 50000 }, (_, i) => ({ i, s: 'x'.repeat(100) + i }));
  let x = seed;
  while (Atomics.load(flag, 0) === 0 && Date.now() < deadline) {
    for (let k = 0; k < 1000; k++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      const i = x % N, j = (x >> 7) % N, d = x % 10;
      vals[i] -= d; vals[j] += d;
      const o = x % 50000; objs[o] = { i: o, s: 'x'.repeat(100) + o };
    }
  }
  return vals.reduce((a, b) => a + b, 0) === 100 * N && objs.every((o, i) => o.i === i && o.s === 'x'.repeat(100) + i);
}
if (isMainThread) {
  const flag = new Int32Array(new SharedArrayBuffer(4));
  const deadline = Date.now() + Number(process.argv[2]) * 1000;
  const workers = [1, 2, 3].map((seed) => new Worker(__filename, { workerData: { seed, flag, deadline } }));
  let ok = true, left = workers.length;
  for (const w of workers) w.on('message', (m) => { ok = ok && m; if (--left === 0) { console.log(ok ? 'ok' : 'bad'); process.exit(ok ? 0 : 1); } });
  process.stdin.on('end', () => Atomics.store(flag, 0, 1)).resume();
  console.log('ready');
} else {
  parentPort.postMessage(churn(workerData.seed, workerData.flag, workerData.deadline));
}
`;

// Start an interpreter on a script; resolves once it printed "ready".
// Closing its stdin (stop) ends the workload; args carry a deadline as well.
async function interpreter(cmd: string, args: string[]): Promise<{ pid: number; stop: () => void; result: Promise<{ code: number | null; out: string }> }> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  const result = new Promise<{ code: number | null; out: string }>((res) => child.on('close', (code) => res({ code, out })));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((res, rej) => {
    child.stdout.on('data', (d: Buffer) => { out += d.toString(); if (out.includes('ready')) res(); });
    child.on('close', () => rej(new Error(`${cmd} exited early: ${out}`)));
  });
  return { pid: child.pid!, stop: () => child.stdin.end(), result };
}

test('Python interpreter running threads: its own check passes after the capture, core in gdb', async () => {
  const dir = tmp('py');
  const script = path.join(dir, 'work.py');
  fs.writeFileSync(script, PYTHON);
  try {
    const py = await interpreter('/usr/bin/python3', [script, '60']);
    await sleep(500);
    const s = await snapshot(py.pid, dir);
    await sleep(300);
    py.stop();
    const r = await py.result;
    assert.is(r.code, 0, `python: ${r.out}`);
    assert.match(r.out, /^ok$/m);
    assert.is(s.threads, 5, 'main, 3 movers, the stdin reader');
    assert.is(s.gdbThreads, s.threads, 'gdb lists every captured thread');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('Node.js runtime with worker threads: its own check passes after the capture, core in gdb', async () => {
  const dir = tmp('node');
  const script = path.join(dir, 'work.js');
  fs.writeFileSync(script, NODE);
  try {
    const n = await interpreter(process.execPath, [script, '60']);
    await sleep(500);
    const s = await snapshot(n.pid, dir);
    await sleep(300);
    n.stop();
    const r = await n.result;
    assert.is(r.code, 0, `node: ${r.out}`);
    assert.match(r.out, /^ok$/m);
    assert.ok(s.threads >= 4, `main, 3 workers and V8/libuv threads: ${s.threads}`);
    assert.is(s.gdbThreads, s.threads, 'gdb lists every captured thread');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
