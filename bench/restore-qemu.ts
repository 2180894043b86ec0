// Restore timed inside QEMU: how long QEMU 10.0 takes to load a 2 GiB guest
// (default) from each source, all in one invocation, rounds interleaved:
//   - QEMU's own migration file (`migrate file:` of the stopped guest), read
//     with -incoming exec:cat FILE and with file:FILE (the baselines);
//   - the bgsnap image of that same stream (bgsnap-receive < FILE), fed by
//     `exec:bgsnap-convert IMAGE --to qemu -o -` (pages spliced into the pipe),
//     and the same with BGSNAP_FEED=copy (pages read into records and written);
//   - the image as a mapped-ram file (`bgsnap-convert --to qemu-mapped-ram`),
//     loaded with the mapped-ram capability, alone and with multifd;
//   - QEMU's own mapped-ram file of the same guest, with multifd (the baseline
//     for the mapped-ram contenders).
// Each restore starts a fresh QEMU with -incoming defer and -S and is timed from
// `migrate-incoming` until QEMU's own MIGRATION event says "completed" (event
// timestamps are QEMU's clock); "from spawn" adds QEMU's start. Every run must
// end completed with the VM paused. Files are read from the page cache (each
// was just written or read), the same for every contender.
//   node dist/bench/restore-qemu.js [--mib 2048] [--guest-mb 1536] [--rounds 3] [--channels 2] [--dir DIR] [--before DIST/bin/bgsnap-convert.js]
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest, type Guest } from '../test/helpers/guest';
import { ensureQemu10, type QemuBinary } from '../test/helpers/qemu10';
import { sleep, startVm, type Vm } from '../test/helpers/vm';
import { arg, machine, range } from './args';

interface Contender {
  name: string;
  uri: string;
  caps: string[]; // capabilities turned on at the destination
  ms: number[]; // migrate-incoming -> completed
  fromSpawn: number[];
  cpu: number[]; // CPU seconds of QEMU and its exec: child (the feeder) over the load
}

// CPU seconds QEMU has used, with those of its children it reaped (an exec:
// URI's command, reaped when QEMU closes the channel): on a machine others
// load, what a restore costs varies much less than how long it takes.
function cpuSeconds(pid: number): number {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return [11, 12, 13, 14].reduce((s, i) => s + Number(fields[i]), 0) / 100; // utime stime cutime cstime, in USER_HZ
}

const bin = (n: string) => `${process.execPath} ${path.join(__dirname, '..', 'bin', `${n}.js`)}`;

async function migrateTo(vm: Vm, uri: string): Promise<void> {
  await vm.qmp.execute('migrate', { uri });
  for (;;) {
    const { status } = await vm.qmp.execute<{ status: string }>('query-migrate');
    if (status === 'completed') return;
    if (!['setup', 'active', 'device'].includes(status)) throw new Error(`migrate ${uri}: ${status}`);
    await sleep(100);
  }
}

// A guest with guestMb of its RAM written, saved by QEMU itself twice while
// stopped: a plain stream and a mapped-ram file.
async function saveGuest(g: Guest, q: QemuBinary, mib: number, guestMb: number, dir: string): Promise<void> {
  const vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: mib, guestMb, tickMs: 1000, qemu: q, startTimeoutMs: 60_000 });
  try {
    await vm.waitForLine(/^ready pages=/, 900_000);
    await vm.waitForTicks(1, 60_000);
    await vm.qmp.execute('stop');
    await migrateTo(vm, `file:${dir}/own.qemu`);
    await vm.qmp.execute('cont'); // a migrated VM must run before it may migrate again
    await vm.qmp.execute('stop');
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
    await migrateTo(vm, `file:${dir}/own.mr`);
  } finally {
    await vm.kill();
  }
}

function timedSh(cmd: string): number {
  const t = Date.now();
  const r = spawnSync('sh', ['-c', cmd], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} failed with ${r.status}`);
  return (Date.now() - t) / 1000;
}

async function restore(g: Guest, q: QemuBinary, mib: number, c: Contender, channels: number): Promise<void> {
  const spawned = Date.now();
  const vm = await startVm({ kernel: g.kernel, initrd: g.initrd, memMb: mib, qemu: q, incoming: 'defer', extraArgs: ['-S'], startTimeoutMs: 60_000 });
  try {
    // 'events': QEMU sends MIGRATION status events only with it on.
    const caps = ['events', ...c.caps].map((capability) => ({ capability, state: true }));
    await vm.qmp.execute('migrate-set-capabilities', { capabilities: caps });
    if (c.caps.includes('multifd')) await vm.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels });
    const done = vm.qmp.waitForEvent('MIGRATION', 300_000, (e) => ['completed', 'failed'].includes(String(e.data?.status)));
    const cpu0 = cpuSeconds(vm.pid);
    const t0 = Date.now();
    await vm.qmp.execute('migrate-incoming', { uri: c.uri });
    const ev = await done;
    if (ev.data?.status !== 'completed') throw new Error(`${c.name}: incoming migration ${String(ev.data?.status)}: ${vm.stderr()}`);
    const at = ev.timestamp!.seconds * 1000 + ev.timestamp!.microseconds / 1000;
    const { status } = await vm.qmp.execute<{ status: string }>('query-status');
    if (status !== 'paused') throw new Error(`${c.name}: VM is '${status}' after the load, not paused`);
    await sleep(300); // QEMU reaps the exec: child after the channel closes
    c.cpu.push(cpuSeconds(vm.pid) - cpu0);
    c.ms.push(at - t0);
    c.fromSpawn.push(at - spawned);
  } finally {
    await vm.kill();
  }
}

async function main(): Promise<void> {
  const mib = Number(arg('--mib', '2048'));
  const guestMb = Number(arg('--guest-mb', String(Math.floor(mib * 0.75))));
  const rounds = Number(arg('--rounds', '3'));
  const channels = Number(arg('--channels', '2'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-restore-'));
  console.log(`machine: ${machine()}`);
  try {
    const [g, q] = await Promise.all([ensureGuest(), ensureQemu10()]);
    await saveGuest(g, q, mib, guestMb, dir);
    const receiveS = timedSh(`${bin('bgsnap-receive')} -q -o ${dir}/img < ${dir}/own.qemu`);
    const convertS = timedSh(`${bin('bgsnap-convert')} ${dir}/img --to qemu-mapped-ram -o ${dir}/ours.mr`);
    const mk = (name: string, uri: string, caps: string[] = []): Contender => ({ name, uri, caps, ms: [], fromSpawn: [], cpu: [] });
    const cs = [
      mk('QEMU file, exec:cat', `exec:cat ${dir}/own.qemu`),
      mk('QEMU file, file:', `file:${dir}/own.qemu`),
      mk('bgsnap convert --to qemu, exec:', `exec:${bin('bgsnap-convert')} ${dir}/img --to qemu -o -`),
      mk('the same, BGSNAP_FEED=copy', `exec:env BGSNAP_FEED=copy ${bin('bgsnap-convert')} ${dir}/img --to qemu -o -`),
      mk('bgsnap mapped-ram, file:', `file:${dir}/ours.mr`, ['mapped-ram']),
      mk(`bgsnap mapped-ram, multifd ${channels}`, `file:${dir}/ours.mr`, ['mapped-ram', 'multifd']),
      mk(`QEMU mapped-ram, multifd ${channels}`, `file:${dir}/own.mr`, ['mapped-ram', 'multifd']),
    ];
    const before = arg('--before', ''); // another build's bgsnap-convert.js, e.g. main's
    if (before) cs.splice(4, 0, mk('convert --to qemu, --before', `exec:${process.execPath} ${before} ${dir}/img --to qemu -o -`));
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < cs.length; k++) await restore(g, q, mib, cs[(k + r) % cs.length], channels); // rotate the order
    }
    report(cs, { mib, guestMb, receiveS, convertS, dir });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`after the runs: load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
}

const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

function report(cs: Contender[], o: { mib: number; guestMb: number; receiveS: number; convertS: number; dir: string }): void {
  const size = (f: string) => `${(fs.statSync(f).size / 1e6).toFixed(0)} MB (${(fs.statSync(f).blocks * 512 / 1e6).toFixed(0)} MB on disk)`;
  console.log(`QEMU 10.0, ${o.mib} MiB guest, ${o.guestMb} MiB written by its workload; QEMU's stream ${size(`${o.dir}/own.qemu`)}, ` +
    `its mapped-ram file ${size(`${o.dir}/own.mr`)}, ours ${size(`${o.dir}/ours.mr`)}`);
  console.log(`bgsnap-receive of QEMU's stream ${o.receiveS.toFixed(2)} s; bgsnap-convert --to qemu-mapped-ram ${o.convertS.toFixed(2)} s`);
  const base = med(cs[0].ms);
  const fileBase = med(cs[1].ms);
  for (const c of cs) {
    console.log(`  ${c.name.padEnd(34)} ${range(c.ms.map((x) => x / 1000), 2).padStart(14)} s  (from spawn ${range(c.fromSpawn.map((x) => x / 1000), 2)} s)  ` +
      `${(base / med(c.ms)).toFixed(2)}x exec:cat's speed, ${(fileBase / med(c.ms)).toFixed(2)}x file:'s; CPU ${range(c.cpu, 2)} s`);
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
