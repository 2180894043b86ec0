// The QEMU binaries the VM tests run: Debian 12's system QEMU 7.2, and Debian
// 13's QEMU 10.0 installed once into $BGSNAP_CACHE/qemu10 with debootstrap. The
// latter runs without a chroot through the folder's own dynamic loader, so it
// shares the host's file namespace: exec: URIs and Unix socket paths work as
// with the system QEMU.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { REPO_ROOT } from './guest';

export interface QemuBinary {
  version: string; // "7.2" / "10.0": which machine types it has
  cmd: string; // what to exec
  prefix: string[]; // arguments before QEMU's own
  env: Record<string, string>;
  machine: string; // the i440fx machine type the tests pin
  q35: string; // the q35 one
}

export const SYSTEM_QEMU: QemuBinary = {
  version: '7.2', cmd: 'qemu-system-x86_64', prefix: [], env: {}, machine: 'pc-i440fx-7.2', q35: 'pc-q35-7.2',
};

export function qemu10Dir(): string {
  return path.join(process.env.BGSNAP_CACHE || path.join(REPO_ROOT, '.cache'), 'qemu10');
}

export function qemu10Binary(dir = qemu10Dir()): QemuBinary {
  const libs = [`${dir}/lib/x86_64-linux-gnu`, `${dir}/usr/lib/x86_64-linux-gnu`].join(':');
  return {
    version: '10.0',
    cmd: `${dir}/lib64/ld-linux-x86-64.so.2`,
    prefix: ['--library-path', libs, `${dir}/usr/bin/qemu-system-x86_64`, '-L', `${dir}/usr/share/qemu`, '-L', `${dir}/usr/share/seabios`],
    env: { QEMU_MODULE_DIR: `${dir}/usr/lib/x86_64-linux-gnu/qemu` },
    machine: 'pc-i440fx-10.0',
    q35: 'pc-q35-10.0',
  };
}

// The shell command line that runs this QEMU with `args`, for exec: URIs and sh.
export function qemuCommandLine(q: QemuBinary, args: string[]): string {
  const env = Object.entries(q.env).map(([k, v]) => `${k}=${quote(v)}`);
  return [...env, q.cmd, ...q.prefix, ...args].map((a, i) => (i < env.length ? a : quote(a))).join(' ');
}

function quote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

// Debian's mirror as this machine's apt sources name it (deb822 or one-line
// format), so the install goes where apt already goes; security mirrors do not
// carry trixie's main suite.
export function aptMirror(): string {
  const dir = '/etc/apt/sources.list.d';
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => /\.(sources|list)$/.test(f)).map((f) => path.join(dir, f)) : [];
  if (fs.existsSync('/etc/apt/sources.list')) files.push('/etc/apt/sources.list');
  for (const f of files) {
    for (const line of fs.readFileSync(f, 'utf8').split('\n')) {
      const m = /^\s*URIs:\s*(\S+)/i.exec(line) ?? /^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)/.exec(line);
      if (m && /debian\/?$/.test(m[1]) && !/security/.test(m[1])) return m[1];
    }
  }
  throw new Error(`no Debian mirror (a URIs: or deb line ending in /debian) in ${files.join(', ') || '/etc/apt'}`);
}

let inProcess: Promise<QemuBinary> | null = null;

// Installs QEMU 10 on first use (about a minute and 380 MB). Built in a private
// directory and renamed into place, so a concurrent test process never sees a
// half-installed tree; the loser of a rename race uses the winner's copy.
export function ensureQemu10(): Promise<QemuBinary> {
  inProcess ??= install(qemu10Dir());
  return inProcess;
}

function installed(dir: string): boolean {
  return fs.existsSync(`${dir}/usr/bin/qemu-system-x86_64`) && fs.existsSync(`${dir}/lib64/ld-linux-x86-64.so.2`);
}

async function install(dir: string): Promise<QemuBinary> {
  if (installed(dir)) return qemu10Binary(dir);
  const debootstrap = ['/usr/sbin/debootstrap', '/usr/bin/debootstrap'].find((p) => fs.existsSync(p));
  if (!debootstrap) throw new Error('QEMU 10 tests need debootstrap (apt-get install debootstrap) to install Debian 13\'s QEMU into the test cache');
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    await run(debootstrap, ['--variant=minbase', '--include=qemu-system-x86', 'trixie', tmp, aptMirror()]);
    try {
      fs.renameSync(tmp, dir);
    } catch (err) {
      if (!installed(dir)) throw err;
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  if (!installed(dir)) throw new Error(`debootstrap into ${dir} left no usr/bin/qemu-system-x86_64`);
  return qemu10Binary(dir);
}

function run(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 << 20, timeout: 15 * 60_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')} failed: ${err.message}\n${String(stdout).slice(-2000)}${String(stderr).slice(-2000)}`));
      else resolve();
    });
  });
}
