// What the disk guard's relay (capture/nbd-relay.ts, `--domain` disks) costs:
// QEMU's own NBD client (`qemu-img bench -w`: 1 MiB writes of 0x5a bytes, 64 in flight, as
// a backup job sends them) into the capture's NBD server (capture/nbd-target.ts,
// its write handler doing nothing, so the relay's share is at its largest, or
// with --batches the capture's own work on each write: writeToBatches, pages
// and zero checks), straight and through the relay, each server in its own
// process as in a capture. Rounds alternate which goes first.
//   node dist/bench/nbd-relay.js [--gib N] [--rounds N] [--batches]
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdRelay } from '../capture/nbd-relay';
import { NbdTargetServer } from '../capture/nbd-target';
import { writeToBatches } from '../capture/qemu-disks';

const MIB = 1 << 20;

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : def;
}

// Child modes: serve the export (`--serve SOCK SIZE [--batches]`) or relay to it (`--relay SOCK UP SIZE`).
async function child(): Promise<boolean> {
  const [mode, sock, a, b] = process.argv.slice(2);
  if (mode !== '--serve' && mode !== '--relay') return false;
  const size = Number(mode === '--serve' ? a : b);
  const exports = [{ name: 'd0', size }];
  const work = process.argv.includes('--batches')
    ? async (_n: string, off: number, len: number, data: Buffer | null) => void writeToBatches(0, off, len, data, 4096, size)
    : async () => undefined;
  const server = mode === '--serve' ? new NbdTargetServer(exports, work) : new NbdRelay(exports, a);
  await server.listen(sock);
  process.stdout.write('ready\n');
  return true;
}

function start(args: string[]): Promise<ChildProcess> {
  const c = spawn(process.execPath, [__filename, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    c.stdout!.once('data', () => resolve(c));
    c.once('exit', (code) => reject(new Error(`bench server exited (${code})`)));
  });
}

function writeAll(sock: string, count: number): number {
  const t = process.hrtime.bigint();
  const r = spawnSync('qemu-img', ['bench', '-w', '-q', '--pattern=90', '-f', 'raw', '-s', '1M', '-d', '64', '-c', String(count), `nbd+unix:///d0?socket=${sock}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-img bench: ${r.stderr}`);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

async function main(): Promise<void> {
  if (await child()) return;
  const gib = arg('--gib', 2);
  const rounds = arg('--rounds', 3);
  const size = gib * 1024 * MIB;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-relay-bench-'));
  const up = path.join(dir, 'capture.sock');
  const via = path.join(dir, 'relay.sock');
  const batches = process.argv.includes('--batches');
  const kids = [await start(['--serve', up, String(size), ...(batches ? ['--batches'] : [])])];
  kids.push(await start(['--relay', via, up, String(size)]));
  try {
    console.log(`${gib} GiB of 1 MiB writes, 64 in flight, qemu-img bench into bgsnap's NBD server (${batches ? 'writeToBatches on each' : 'doing nothing'}); load average ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
    for (let r = 1; r <= rounds; r++) {
      const order: ['straight' | 'relay', string][] = [['straight', up], ['relay', via]];
      if (r % 2 === 0) order.reverse();
      const s: Record<string, number> = {};
      for (const [name, sock] of order) s[name] = writeAll(sock, size / MIB);
      const mbs = (x: number) => ((gib * 1024) / x).toFixed(0);
      console.log(`round ${r} (${order[0][0]} first): straight ${s.straight.toFixed(2)} s (${mbs(s.straight)} MiB/s), relay ${s.relay.toFixed(2)} s (${mbs(s.relay)} MiB/s), relay/straight time ${(s.relay / s.straight).toFixed(2)}x`);
    }
    console.log(`load average after: ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  } finally {
    for (const k of kids) k.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: Error) => {
  console.error(e.message);
  process.exit(1);
});
