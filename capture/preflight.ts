// Checks made before a process is touched (no ptrace, only /proc): targets
// bgsnap cannot capture safely are refused by name, with the target untouched.
// The engine re-checks natively while frozen where a race matters (the seccomp
// filter of the thread it injects into, dumpability, mapping sizes).
import * as fs from 'node:fs';

const PAGE = 4096;
export const MAX_BLOCK_PAGES = 2 ** 31; // capture.h kMaxBlockPages: 8 TiB
const HUGE_OK_KB = 2048; // hugetlb pages up to 2 MiB; a 1 GiB one would stall its writer

function refuse(code: string, message: string): never {
  throw Object.assign(new Error(message), { code });
}

function read(path: string): string | undefined {
  try {
    return fs.readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

function field(status: string, key: string): string {
  return new RegExp(`^${key}:\\s*(.*)$`, 'm').exec(status)?.[1] ?? '';
}

// PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN, a tracer not itself under
// seccomp, and CONFIG_CHECKPOINT_RESTORE (which also provides ns_last_pid).
export function canSuspendSeccomp(testDisable = false): boolean {
  const self = read('/proc/self/status') ?? '';
  const capEff = BigInt(`0x${field(self, 'CapEff') || '0'}`);
  return !testDisable && (capEff & (1n << 21n)) !== 0n && field(self, 'Seccomp') === '0' && fs.existsSync('/proc/sys/kernel/ns_last_pid');
}

function tasks(pid: number): string[] {
  try {
    return fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return [];
  }
}

function checkThreads(pid: number, status: string, suspend: boolean): void {
  const threads = Number(field(status, 'Threads') || '1');
  if (field(status, 'State').startsWith('Z')) {
    refuse('ESRCH', threads > 1
      ? `process ${pid}'s main thread has exited (zombie) while ${threads - 1} other threads run: the kernel shows no mappings for it and lets no tracer attach to it, so it cannot be captured`
      : `process ${pid} is a zombie (exited, not yet reaped by its parent): nothing to capture`);
  }
  for (const tid of tasks(pid)) {
    const ts = read(`/proc/${pid}/task/${tid}/status`) ?? '';
    // A vfork parent sleeps in kernel_clone (wait_for_vfork_done, inlined): its
    // stack says so to root; wchan to others.
    const waits = field(ts, 'State').startsWith('D') ? read(`/proc/${pid}/task/${tid}/stack`) ?? read(`/proc/${pid}/task/${tid}/wchan`) ?? '' : '';
    if (/vfork|wait_for_vfork_done|kernel_clone/.test(waits)) {
      refuse('EBUSY', `thread ${tid} of process ${pid} is a parent waiting in vfork() for its child to exec or exit: the child runs on the same memory and the parent cannot be stopped; capture it after the child has exec'd`);
    }
    const mode = field(ts, 'Seccomp');
    if (mode !== '' && mode !== '0' && !suspend) {
      refuse('EPERM', `thread ${tid} of process ${pid} runs under seccomp (Seccomp: ${mode}): its filter could kill it, send it SIGSYS, fail or report the syscalls bgsnap injects, and suspending the filter for them (PTRACE_O_SUSPEND_SECCOMP) needs root (CAP_SYS_ADMIN) and a kernel with CONFIG_CHECKPOINT_RESTORE; refused before touching it`);
    }
  }
}

interface MapLine { start: bigint; end: bigint; perms: string; path: string; name: string }

function parseMaps(text: string): MapLine[] {
  const out: MapLine[] = [];
  for (const line of text.split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \d+\s*(.*)$/.exec(line);
    if (m) out.push({ start: BigInt(`0x${m[1]}`), end: BigInt(`0x${m[2]}`), perms: m[3], path: m[4], name: `${m[1]}-${m[2]} ${m[3]}${m[4] ? ` ${m[4]}` : ''}` });
  }
  return out;
}

function hugetlbMounts(): string[] {
  return (read('/proc/mounts') ?? '').split('\n').filter((l) => l.split(' ')[2] === 'hugetlbfs').map((l) => l.split(' ')[1]);
}

// Writable hugetlb mappings with pages over 2 MiB: a write fault saves the whole
// page before its writer may go on, so 1 GiB pages are refused by name.
function checkHugetlb(pid: number, maps: MapLine[]): void {
  const mounts = hugetlbMounts();
  const hugetlb = (p: string) => p.startsWith('/anon_hugepage') || p.startsWith('SYSV') || mounts.some((d) => p.startsWith(`${d}/`));
  if (!maps.some((m) => m.perms[1] === 'w' && hugetlb(m.path))) return;
  const smaps = read(`/proc/${pid}/smaps`) ?? '';
  for (const part of smaps.split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    const head = parseMaps(part.split('\n')[0])[0];
    const kb = Number(/^KernelPageSize:\s*(\d+) kB/m.exec(part)?.[1] ?? 4);
    if (head && head.perms[1] === 'w' && kb > HUGE_OK_KB) {
      refuse('EOPNOTSUPP', `mapping ${head.name} is backed by ${kb >> 10} MiB hugetlb pages: a write to it would wait while bgsnap saves a whole ${kb >> 10} MiB page, more than its buffers hold; pages over 2 MiB cannot be captured`);
    }
  }
}

function checkMaps(pid: number): void {
  const maps = parseMaps(read(`/proc/${pid}/maps`) ?? '');
  for (const m of maps) {
    if (m.perms.startsWith('rw') && (m.end - m.start) / BigInt(PAGE) > BigInt(MAX_BLOCK_PAGES)) {
      refuse('EFBIG', `mapping ${m.name} is ${(m.end - m.start) >> 30n} GiB: writable mappings over 8 TiB (e.g. a sanitizer's shadow) cannot be captured`);
    }
  }
  checkHugetlb(pid, maps);
}

export interface PreflightOptions { testNoSuspendSeccomp?: boolean }

// Throws an error with a code when the target must not be touched.
export function preflight(pid: number, opts: PreflightOptions = {}): void {
  const status = read(`/proc/${pid}/status`);
  if (status === undefined) return; // the engine reports a missing process by name
  checkThreads(pid, status, canSuspendSeccomp(opts.testNoSuspendSeccomp));
  checkMaps(pid);
}
