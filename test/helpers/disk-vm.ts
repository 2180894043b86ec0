// Whole-VM tests with a virtio disk (vm-disks*.test.ts): booting the test guest
// with its disk workload (test/guest/disk.h, fs.h), capturing it while it
// writes (with --qmp the disks are in by default), and restoring vmstate plus
// a disk in a fresh QEMU. Shared by the QEMU 7.2 and 10.0 tests, so both run
// the same scenario.
import { execFileSync } from 'node:child_process';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Guest } from './guest';
import type { QemuBinary } from './qemu10';
import { sleep, startVm, type Vm, type VmOptions } from './vm';
import { BIN, sh } from './cli';

export const DISK_RE = /^disk=(ok|FAIL) last=(\d+) ondisk=(\d+)/;

export interface DiskCheck { ok: boolean; last: number; onDisk: number; text: string }

export function parseDiskCheck(text: string, re = DISK_RE): DiskCheck | undefined {
  const m = re.exec(text);
  return m ? { ok: m[1] === 'ok', last: Number(m[2]), onDisk: Number(m[3]), text } : undefined;
}

export function diskChecks(vm: Vm, since = 0, re = DISK_RE): DiskCheck[] {
  return vm.lines(since).flatMap((l) => parseDiskCheck(l.text, re) ?? []);
}

// A later disk must fail one of the restored guest's first two checks, not
// necessarily the first. The first may predate the restore, its disk read
// made before the snapshot's instant and its line printed after: CI got
// "disk=ok last=2168 ondisk=2168" from a disk the source had written on to
// 12248 (vm-disks), and once "last=1118 ondisk=1118" (vm-disks-qemu10). The
// second may come after the guest rewrote every slot that was newer: CI got
// "disk=FAIL last=5021 ondisk=8618 newer=525", then "disk=ok last=5771"
// (vm-libvirt).
export function laterDiskCaught(checks: DiskCheck[]): DiskCheck | undefined {
  assert.ok(checks.length >= 2, `two checks after the restore, not ${checks.length}`);
  return checks.slice(0, 2).find((c) => !c.ok && c.onDisk > c.last);
}

export class DiskVms {
  readonly vms: Vm[] = [];
  constructor(readonly guest: Guest, readonly dir: string, readonly qemu?: QemuBinary, readonly re = DISK_RE) {}

  async boot(drive: string, extra: Partial<VmOptions> = {}): Promise<Vm> {
    const vm = await startVm({
      kernel: this.guest.kernel, initrd: this.guest.initrd, memMb: 256, guestMb: 16, append: 'bgsnap.disk=1',
      extraArgs: ['-drive', drive], startTimeoutMs: 60_000, qemu: this.qemu, ...extra,
    });
    this.vms.push(vm);
    return vm;
  }

  async waitChecks(vm: Vm, n: number, since = 0): Promise<DiskCheck[]> {
    const first = new RegExp(this.re.source.split('=')[0] + '=');
    await vm.waitForLine(first, 180_000, since);
    for (let i = 0; i < 600 && diskChecks(vm, since, this.re).length < n; i++) await sleep(200);
    const c = diskChecks(vm, since, this.re);
    assert.ok(c.length >= n, `only ${c.length} disk checks`);
    return c;
  }

  // Captures (disks by default) while the guest writes; the guest must write on during
  // and after it, and nothing of ours may be left in QEMU.
  async capture(vm: Vm, tag: string): Promise<{ image: string; stats: Record<string, unknown>; during: number }> {
    await this.waitChecks(vm, 2);
    const image = path.join(this.dir, `${tag}.img`);
    const stats = path.join(this.dir, `${tag}.json`);
    const from = vm.lines().length;
    const r = await sh(`${BIN.capture} --qmp '${vm.qmpPath}' --stats '${stats}' | ${BIN.receive} -o '${image}'`, 240_000);
    assert.is(r.code, 0, r.stderr);
    const during = diskChecks(vm, from, this.re).length; // checks printed while the capture ran
    const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
    assert.is(s.runStateAfter, 'running');
    await this.wroteOn(vm, from);
    assert.equal(await ourLeftovers(vm), []);
    return { image, stats: s, during };
  }

  // The guest must be writing again after the capture, not merely said to be
  // running: a check newer than every one printed so far. If none comes, what
  // QEMU's threads wait on goes into the failure.
  async wroteOn(vm: Vm, from: number, timeoutMs = 30_000): Promise<void> {
    const lastOf = (since: number) => Math.max(0, ...diskChecks(vm, since, this.re).map((c) => c.last));
    const before = lastOf(from);
    const end = vm.lines().length;
    for (let t = 0; t < timeoutMs && lastOf(end) <= before; t += 200) await sleep(200);
    if (lastOf(end) > before) return;
    const status = await vm.qmp.execute<{ status: string }>('query-status').then((r) => r.status, (e: Error) => e.message);
    const tail = vm.lines(from).slice(-8).map((l) => l.text).join(' | ');
    assert.unreachable(`the guest wrote nothing newer than ${before} for ${timeoutMs / 1000} s after the capture (status ${status}); serial: ${tail}; virtqueues: ${await virtqueues(vm)}; QEMU's threads: ${threadsOf(vm.pid)}`);
  }

  // Restores vmstate + disk in a fresh QEMU and returns the restored VM once it
  // printed `n` checks. The snapshot's run state is "paused" (bgsnap stopped the
  // VM for the instant), so the restored VM waits for `cont`.
  // `mark` (fs.h guests): only checks after the guest answered a console
  // "mark", so none the snapshot caught on its way out of the serial port.
  async restoreVm(image: string, drive: string, append = 'bgsnap.disk=1', n = 2, mark = false): Promise<{ vm: Vm; checks: DiskCheck[] }> {
    const incoming = `exec:${BIN.convert} '${image}' --to qemu -o -`;
    const vm = await this.boot(drive, { incoming, append });
    for (let i = 0; i < 600; i++) {
      const { status } = await vm.qmp.execute<{ status: string }>('query-status');
      if (status === 'paused') await vm.qmp.execute('cont');
      if (status === 'running' || status === 'paused') break;
      await sleep(200);
    }
    let since = 0;
    if (mark) {
      vm.console('mark\n');
      const m = await vm.waitForLine(/^fs mark/, 120_000);
      since = m.index + 1;
    }
    return { vm, checks: await this.waitChecks(vm, n, since) };
  }

  async restore(image: string, disk: string, append = 'bgsnap.disk=1'): Promise<DiskCheck[]> {
    const { vm, checks } = await this.restoreVm(image, `file=${disk},format=raw,if=virtio,id=d0`, append);
    await vm.kill();
    return checks;
  }

  async killAll(): Promise<void> {
    for (const vm of this.vms) await vm.kill();
  }
}

export function chain(file: string): unknown {
  const out = execFileSync('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
  // Sizes on disk change as the guest writes; the chain itself must not.
  return (JSON.parse(out) as Record<string, unknown>[]).map((i) => ({ f: i.filename, fmt: i.format, b: i['backing-filename'], v: i['virtual-size'] }));
}

// Each virtio device's first queue as QEMU sees it: a request the guest made
// available that QEMU never took (avail ahead of last-avail) is a lost kick.
async function virtqueues(vm: Vm): Promise<string> {
  try {
    const devs = await vm.qmp.execute<{ path: string; name: string }[]>('x-query-virtio');
    const out: string[] = [];
    for (const d of devs) {
      const q = await vm.qmp.execute<Record<string, unknown>>('x-query-virtio-queue-status', { path: d.path, queue: 0 });
      out.push(`${d.name} ${JSON.stringify(q)}`);
    }
    return out.join('; ') || 'none';
  } catch (e) {
    return `x-query-virtio: ${(e as Error).message}`;
  }
}

// Where each of QEMU's threads waits, for a failure message: its name, state
// and kernel stack (a vCPU blocked on write-protected RAM shows handle_userfault).
function threadsOf(pid: number): string {
  const read = (f: string) => {
    try {
      return fs.readFileSync(f, 'utf8').trim();
    } catch (e) {
      return (e as NodeJS.ErrnoException).code ?? 'unreadable';
    }
  };
  const tasks = (() => { try { return fs.readdirSync(`/proc/${pid}/task`); } catch { return []; } })();
  return tasks.map((t) => {
    const d = `/proc/${pid}/task/${t}`;
    const state = read(`${d}/stat`).replace(/^.*\) /, '').split(' ')[0];
    const stack = read(`${d}/stack`).split('\n').slice(0, 6).map((l) => l.replace(/^\[<[0-9a-f]+>\] /, '')).join(' < ');
    return `${read(`${d}/comm`)} ${state}: ${stack}`;
  }).join('; ') || `no /proc/${pid}`;
}

export async function ourLeftovers(vm: Vm): Promise<string[]> {
  const jobs = await vm.qmp.execute<{ device: string }[]>('query-block-jobs');
  const nodes = await vm.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes');
  return [...jobs.map((j) => `job ${j.device}`), ...nodes.filter((n) => n['node-name'].startsWith('bgsnap')).map((n) => `node ${n['node-name']}`)];
}

// The disk a few seconds on: stop the source, copy its disk, kill it. Returns
// the source's last disk lines, so a failing check shows what the source did.
export async function copyLater(vm: Vm, disk: string, to: string, ms = 3000): Promise<string> {
  await sleep(ms);
  await vm.qmp.execute('stop');
  fs.copyFileSync(disk, to);
  await vm.kill();
  return vm.lines().filter((l) => /disk/.test(l.text)).slice(-6).map((l) => l.text).join(' | ');
}
