// Puts right what QEMU before 8.1 forgets when a background snapshot ends other
// than completed: it stops write-protecting guest RAM only on completion
// (ram_write_tracking_stop() is called from bg_migration_completion() alone;
// fixed upstream by 3a8b81f2e6, in 8.1). Otherwise its userfaultfd stays open
// with the RAM ranges registered and protected and no migration thread left to
// serve a fault, so the next vCPU (or QEMU's main thread, holding the big lock)
// to write an unsaved page sleeps for good. Seen on Debian's 7.2.22: a cut
// stream leaves the guest without a tick, and a later snapshot cannot register.
//
// We do what ram_write_tracking_stop() would have done, from outside, with a
// copy of QEMU's own userfaultfd (pidfd_getfd): unprotect and wake every range
// it registered for write protection (VmFlags "uw" in /proc/PID/smaps), and
// unregister them once the snapshot is over. Nothing else in QEMU is touched.
// What stays as 7.2 left it: the open fd, and the blocks' RAM_UF_WRITEPROTECT
// flag, which makes a later *precopy* migration fail (ENOTTY on a zeroed fd)
// until a background snapshot completes and clears it (seen, and said in README).
import * as fs from 'node:fs';
import { addon } from './addon';
import type { QmpTransport } from './qmp-transport';

// Only these QEMUs: 8.1 and later stop tracking on every ending themselves.
export function forgetsWriteProtection(qemuVersion: string): boolean {
  const [major, minor] = qemuVersion.split('.').map(Number);
  return major < 8 || (major === 8 && minor < 1);
}

// Ranges registered with a userfaultfd for write protection, [start, length].
export function protectedRanges(pid: number): [number, number][] {
  const out: [number, number][] = [];
  let range: [number, number] | null = null;
  for (const line of fs.readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (m) range = [parseInt(m[1], 16), parseInt(m[2], 16) - parseInt(m[1], 16)];
    else if (line.startsWith('VmFlags:') && / uw\b/.test(line) && range) out.push(range);
  }
  return out;
}

function userfaultfds(pid: number): number[] {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).map(Number).filter((fd) => {
    try {
      return fs.readlinkSync(`${dir}/${fd}`) === 'anon_inode:[userfaultfd]';
    } catch {
      return false; // closed meanwhile
    }
  });
}

export interface Released { ranges: number; bytes: number }

// Unprotects (and wakes) every write-protected range of `pid`, through whichever
// of its userfaultfds registered it; with `unregister`, also unregisters it and
// checks that none is left. A range another fd owns answers ENOENT: we try the next.
export function releaseWriteProtection(pid: number, unregister: boolean): Released {
  const ranges = protectedRanges(pid);
  const fds = userfaultfds(pid);
  let done = 0;
  let bytes = 0;
  for (const r of ranges) {
    for (const fd of fds) {
      try {
        addon.uffdRelease(pid, fd, [r], unregister);
        done++;
        bytes += r[1];
        break;
      } catch (e) {
        if ((e as { code?: string }).code !== 'ENOENT') throw e;
      }
    }
  }
  if (unregister) {
    const left = protectedRanges(pid);
    if (left.length) throw new Error(`QEMU (pid ${pid}) still has ${left.length} write-protected RAM range(s) at ${left.map(([s]) => '0x' + s.toString(16)).join(', ')}`);
  }
  return { ranges: done, bytes };
}

// QEMU's pid: the peer of its migration connection (the process that connected).
export function peerPidOf(fd: number): number {
  return addon.peerPid(fd);
}

// QEMU's pid, only where it is needed (QEMU < 8.1): the peer of its QMP socket
// when we speak to it directly; through libvirt, whose sockets are its own, the
// process of a vCPU thread (query-cpus-fast gives the thread's id).
export async function qemuPidOf(qmp: QmpTransport): Promise<number | null> {
  if (!forgetsWriteProtection(qmp.qemuVersion)) return null;
  if (qmp.fd !== undefined) return qmp.fd === null ? null : peerPidOf(qmp.fd);
  const cpus = await qmp.execute<{ 'thread-id'?: number }[]>('query-cpus-fast');
  const tid = cpus.find((c) => c['thread-id'])?.['thread-id'];
  const m = tid ? /^Tgid:\s+(\d+)$/m.exec(fs.readFileSync(`/proc/${tid}/status`, 'utf8')) : null;
  return m ? Number(m[1]) : null;
}

// Refuses, before anything in QEMU is touched, a capture whose failure we could
// not make safe: on QEMU < 8.1 releasing the forgotten protection needs
// pidfd_getfd on QEMU (ptrace attach rights). An fd number no process has
// answers EBADF when the kernel let us that far, EPERM when it would not.
export function refuseUnlessReleasable(qemuVersion: string, pid: number | null): void {
  if (!forgetsWriteProtection(qemuVersion) || pid === null) return;
  try {
    addon.uffdRelease(pid, 0x3fffffff, [], false);
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === 'EBADF') return;
    throw Object.assign(new Error(
      `QEMU ${qemuVersion} (pid ${pid}) leaves guest RAM write-protected if a snapshot fails, and bgsnap cannot take its ` +
        `userfaultfd to undo that (${code}: ${(e as Error).message}); run bgsnap-capture as root or as QEMU's user, or use QEMU 8.1 or later`,
    ), { code });
  }
}
