// One `bgsnap-receive --listen` receiving 1 stream, then 4 at once, then 3 next
// to a 4th that stalls mid-stream: aggregate MB/s of each, and the ratios the
// issue asks for (4 vs 1 >= 0.9; the 3 beside a stalled sender vs 3 alone).
// Senders send a generated stream file's bytes as they are (bench/raw-sender),
// each a separate process, over loopback.
//   node dist/bench/receive-concurrent.js [--gib-each 0.5] [--dir DIR]
import { spawn, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
}

const here = __dirname;
const node = process.execPath;

function exited(p: ChildProcess, what: string): Promise<void> {
  return new Promise((resolve, reject) => p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${what} exited ${code}`)))));
}

async function startReceiver(root: string, token: string): Promise<{ url: string; proc: ChildProcess }> {
  const proc = spawn(node, [arg('--receiver', path.join(here, '..', 'bin', 'bgsnap-receive.js')), '--listen', '127.0.0.1:0', '--dir', root, '--insecure', '--token-file', token, '-q'],
    { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => {
    let out = '';
    proc.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      const m = /listening [^\n]*:(\d+)\n/.exec(out);
      if (m) resolve(Number(m[1]));
    });
  });
  return { url: `tcp://127.0.0.1:${port}`, proc };
}

function send(file: string, url: string, token: string, name: string, pause?: [number, number]): Promise<void> {
  const extra = pause ? pause.map(String) : [];
  const p = spawn(node, [path.join(here, 'raw-sender.js'), file, url, token, name, ...extra], { stdio: ['ignore', 'inherit', 'inherit'] });
  return exited(p, `sender ${name}`);
}

// Wall seconds until n senders at once have finished.
async function round(root: string, file: string, url: string, token: string, n: number, tag: string): Promise<number> {
  const t = process.hrtime.bigint();
  await Promise.all(Array.from({ length: n }, (_, i) => send(file, url, token, `${tag}-${i}`)));
  const s = Number(process.hrtime.bigint() - t) / 1e9;
  fs.rmSync(root, { recursive: true, force: true });
  fs.mkdirSync(root);
  return s;
}

async function main(): Promise<void> {
  const gib = Number(arg('--gib-each', '0.5'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-conc-'));
  const file = path.join(dir, 'stream.bgsnap');
  const token = path.join(dir, 'token');
  fs.writeFileSync(token, crypto.randomBytes(24).toString('hex') + '\n', { mode: 0o600 });
  await exited(spawn(node, [path.join(here, 'receive-throughput.js'), '--gib', String(gib), '--generate', file], { stdio: 'inherit' }), 'generate');
  const root = path.join(dir, 'root');
  fs.mkdirSync(root);
  const rx = await startReceiver(root, token);
  const mb = fs.statSync(file).size / 1e6;
  try {
    const one = await round(root, file, rx.url, token, 1, 'one');
    const four = await round(root, file, rx.url, token, 4, 'four');
    const three = await round(root, file, rx.url, token, 3, 'three');
    report(mb, one, four, three, await stalledRound(root, file, rx.url, token));
  } finally {
    rx.proc.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// 3 senders while a 4th sends 64 MiB, then stalls until they are done.
async function stalledRound(root: string, file: string, url: string, token: string): Promise<number> {
  const ac = new AbortController();
  const stalled = spawn(node, [path.join(here, 'raw-sender.js'), file, url, token, 'stalled', String(64 << 20), '600000'], { stdio: 'ignore', signal: ac.signal });
  stalled.on('error', () => undefined);
  await new Promise((r) => setTimeout(r, 1000)); // let it reach its stall
  const t = process.hrtime.bigint();
  await Promise.all([0, 1, 2].map((i) => send(file, url, token, `beside-${i}`)));
  const s = Number(process.hrtime.bigint() - t) / 1e9;
  ac.abort();
  fs.rmSync(root, { recursive: true, force: true });
  fs.mkdirSync(root);
  return s;
}

function report(mb: number, one: number, four: number, three: number, beside: number): void {
  console.log(`load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}, ${os.cpus().length} cores, stream ${mb.toFixed(0)} MB each`);
  const rows: [string, number, number][] = [['1 stream', one, 1], ['4 streams at once', four, 4], ['3 streams at once', three, 3], ['3 beside a stalled 4th', beside, 3]];
  for (const [name, s, n] of rows) console.log(`${name.padEnd(24)} ${s.toFixed(2).padStart(7)} s ${((n * mb) / s).toFixed(0).padStart(6)} MB/s aggregate`);
  console.log(`4 vs 1 aggregate: ${((4 * mb) / four / (mb / one)).toFixed(2)}x (goal >= 0.90)`);
  console.log(`3 beside a stalled sender vs 3 alone: ${(three / beside).toFixed(2)}x (1.00 = not slowed)`);
}

void main();
