// Writes that userfaultfd write-protection cannot see, found where the kernel
// shows them: they change memory without a fault, so a page saved before such a
// write may not be the snapshot-point content (or the other way round).
//   - io_uring fixed buffers (IORING_REGISTER_BUFFERS): pinned; the kernel
//     writes them directly when a read completes. fdinfo lists them (UserBufs).
//   - VFIO / RDMA device fds: devices DMA into pinned memory.
//   - O_DIRECT files: a read in flight DMAs into the target's buffer.
//   - memfd / shmem files held open as fds and also mapped writable: a
//     write(2) to the fd changes the mapped pages through the page cache.
import * as fs from 'node:fs';
import type { NativeMap } from './addon';

export interface UnseenWrites {
  ioUringBuffers: number; // registered buffers over all io_uring instances
  ioUringBufferBytes: number;
  deviceFds: string[]; // "fd N: /dev/vfio/…"
  directIoFds: string[];
  mappedFds: string[]; // shared memory open as an fd and mapped writable
  warnings: string[]; // one sentence per finding, for stderr
}

const O_DIRECT = 0o40000;

function fdinfo(pid: number, fd: string): string {
  try {
    return fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
  } catch {
    return '';
  }
}

function ioUring(info: string): { n: number; bytes: number } {
  const lines = info.split('\n');
  const at = lines.findIndex((l) => l.startsWith('UserBufs:'));
  if (at < 0) return { n: 0, bytes: 0 };
  const n = Number(lines[at].split(/\s+/)[1]);
  let bytes = 0;
  for (const l of lines.slice(at + 1, at + 1 + n)) bytes += Number(/\/(\d+)\s*$/.exec(l)?.[1] ?? 0);
  return { n, bytes };
}

// (dev, inode) of every writable shared mapping, as maps prints the device (hex "MM:mm").
function sharedWritable(maps: NativeMap[]): Set<string> {
  return new Set(maps.filter((m) => m.perms.startsWith('rw') && m.perms[3] === 's' && m.inode !== 0).map((m) => `${m.dev}/${m.inode}`));
}

function devOf(st: fs.Stats): string {
  const major = Math.floor(st.dev / 256) & 0xfff, minor = (st.dev & 0xff) | ((st.dev >> 12) & 0xfff00);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}`;
}

export function findUnseenWrites(pid: number, maps: NativeMap[]): UnseenWrites {
  const r: UnseenWrites = { ioUringBuffers: 0, ioUringBufferBytes: 0, deviceFds: [], directIoFds: [], mappedFds: [], warnings: [] };
  let fds: string[] = [];
  try {
    fds = fs.readdirSync(`/proc/${pid}/fd`);
  } catch {
    return r;
  }
  const shared = sharedWritable(maps);
  for (const fd of fds) {
    let target = '';
    try {
      target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    const info = fdinfo(pid, fd);
    if (target === 'anon_inode:[io_uring]') {
      const u = ioUring(info);
      r.ioUringBuffers += u.n;
      r.ioUringBufferBytes += u.bytes;
    } else if (/^\/dev\/(vfio|infiniband)\//.test(target)) {
      r.deviceFds.push(`fd ${fd}: ${target}`);
    }
    const flags = parseInt(/^flags:\s*(\d+)/m.exec(info)?.[1] ?? '0', 8);
    if (flags & O_DIRECT) r.directIoFds.push(`fd ${fd}: ${target}`);
    try {
      const st = fs.statSync(`/proc/${pid}/fd/${fd}`);
      if (shared.has(`${devOf(st)}/${st.ino}`)) r.mappedFds.push(`fd ${fd}: ${target}`);
    } catch { /* closed meanwhile */ }
  }
  warn(r);
  return r;
}

function warn(r: UnseenWrites): void {
  if (r.ioUringBuffers) r.warnings.push(`${r.ioUringBuffers} io_uring fixed buffer(s) (${r.ioUringBufferBytes} bytes) are pinned: the kernel writes them without a fault, so they may hold data newer than the snapshot`);
  for (const d of r.deviceFds) r.warnings.push(`${d}: a device may write memory by DMA without a fault; such writes may be newer than the snapshot`);
  for (const d of r.directIoFds) r.warnings.push(`${d} is open with O_DIRECT: a read in flight writes its buffer without a fault`);
  for (const d of r.mappedFds) r.warnings.push(`${d} is also mapped shared and writable: write(2) to it changes the mapped pages without a fault`);
}
