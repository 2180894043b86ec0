// Builds (once) and locates the test guest: Debian's cloud kernel plus an
// initramfs whose /init is test/guest/init.c. The result is cached under
// $BGSNAP_CACHE/guest/<hash> (default <repo>/.cache), keyed by the contents of
// init.c and build.sh, so editing either rebuilds and nothing else does.
import { execFile } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface Guest {
  kernel: string;
  initrd: string;
  kernelVersion: string; // e.g. "linux-image-6.1.0-56-cloud-amd64 6.1.192-2"
  built: boolean; // false when it came from the cache
  buildMs: number;
}

// Compiled to dist/test/helpers, so the repository root is three levels up.
export const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const GUEST_SRC = path.join(REPO_ROOT, 'test', 'guest');

export function guestCacheDir(): string {
  const base = process.env.BGSNAP_CACHE || path.join(REPO_ROOT, '.cache');
  const hash = crypto.createHash('sha256');
  for (const f of ['init.c', 'disk.h', 'fs.h', 'build.sh']) hash.update(f).update(fs.readFileSync(path.join(GUEST_SRC, f)));
  return path.join(base, 'guest', hash.digest('hex').slice(0, 16));
}

function cached(dir: string, buildMs: number, built: boolean): Guest | null {
  const kernel = path.join(dir, 'vmlinuz');
  const initrd = path.join(dir, 'initrd.img');
  const version = path.join(dir, 'kernel-version');
  if (!fs.existsSync(kernel) || !fs.existsSync(initrd) || !fs.existsSync(version)) return null;
  return { kernel, initrd, kernelVersion: fs.readFileSync(version, 'utf8').trim(), built, buildMs };
}

let inProcess: Promise<Guest> | null = null;

export function ensureGuest(): Promise<Guest> {
  inProcess ??= buildGuest();
  return inProcess;
}

// Builds into a private directory and renames it into place, so concurrent
// test processes never see a half-built guest; the loser of a rename race
// just uses the winner's copy.
async function buildGuest(): Promise<Guest> {
  const dir = guestCacheDir();
  const hit = cached(dir, 0, false);
  if (hit) return hit;
  const start = Date.now();
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    await run('sh', [path.join(GUEST_SRC, 'build.sh'), tmp]);
    try {
      fs.renameSync(tmp, dir);
    } catch (err) {
      if (!cached(dir, 0, false)) throw err;
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  const guest = cached(dir, Date.now() - start, true);
  if (!guest) throw new Error(`guest build in ${dir} produced no vmlinuz/initrd.img`);
  return guest;
}

function run(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 16 << 20, timeout: 10 * 60_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\n${stdout}${stderr}`));
      else resolve();
    });
  });
}
