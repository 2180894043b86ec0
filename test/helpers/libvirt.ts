// A private, real libvirtd for tests, started by the test itself (no systemd
// here): Debian's libvirtd as root, in its own mount namespace where its config,
// state, run and log directories (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
// ...) are bind-mounted from a temp dir, so it shares nothing with any system
// libvirtd. Its Unix socket lives in that temp dir; clients reach it with
// qemu+unix:///system?socket=DIR/sock/libvirt-sock.
//
// Its qemu.conf runs QEMU as root with no security driver and no cgroups (a
// container without systemd has neither), logging to files (no virtlogd).
// libvirt resolves its built-in QEMU user ("libvirt-qemu", which Debian's
// libvirt-daemon-system creates) before reading qemu.conf, so that namespace
// also sees an /etc/passwd and /etc/group with that user added; the host's
// files are not touched.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { sleep } from './vm';
import { tmpDir } from './net';

export interface Libvirtd {
  dir: string;
  uri: string;
  virsh(args: string[]): string; // throws with virsh's stderr on failure
  qemuPid(domain: string): number;
  stop(): Promise<void>;
}

const MOUNTS: [string, string][] = [
  ['etc', '/etc/libvirt'], ['run', '/run/libvirt'], ['lib', '/var/lib/libvirt'],
  ['log', '/var/log/libvirt'], ['cache', '/var/cache/libvirt'],
];
const live = new Set<{ dir: string; daemon: ChildProcess }>();

// Last resort on a crashed test: QEMU processes libvirtd started do not die with it.
process.on('exit', () => {
  for (const l of live) {
    for (const f of listPidFiles(l.dir)) killPid(Number(fs.readFileSync(f, 'utf8')));
    l.daemon.kill('SIGKILL');
  }
});

function listPidFiles(dir: string): string[] {
  const q = path.join(dir, 'run', 'qemu');
  return fs.existsSync(q) ? fs.readdirSync(q).filter((n) => n.endsWith('.pid')).map((n) => path.join(q, n)) : [];
}

function killPid(pid: number): void {
  try {
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch { /* already gone */ }
}

function writeConfig(dir: string): void {
  fs.writeFileSync(path.join(dir, 'etc', 'libvirtd.conf'), [
    `unix_sock_dir = "${dir}/sock"`, 'unix_sock_rw_perms = "0700"', 'auth_unix_rw = "none"', 'auth_unix_ro = "none"',
    `log_outputs = "3:file:${dir}/libvirtd.log"`, '',
  ].join('\n'));
  fs.writeFileSync(path.join(dir, 'etc', 'qemu.conf'), [
    'user = "root"', 'group = "root"', 'dynamic_ownership = 0', 'remember_owner = 0', 'security_driver = "none"',
    'namespaces = [ ]', 'cgroup_controllers = [ ]', 'stdio_handler = "file"', '',
  ].join('\n'));
  fs.writeFileSync(path.join(dir, 'passwd'), fs.readFileSync('/etc/passwd', 'utf8') + 'libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n');
  fs.writeFileSync(path.join(dir, 'group'), fs.readFileSync('/etc/group', 'utf8') + 'libvirt-qemu:x:64055:\n');
}

export async function startLibvirtd(): Promise<Libvirtd> {
  const dir = tmpDir('libvirtd');
  for (const d of ['etc', 'run', 'lib', 'log', 'cache', 'sock']) fs.mkdirSync(path.join(dir, d));
  writeConfig(dir);
  const binds = MOUNTS.map(([from, to]) => `mkdir -p ${to} && mount --bind ${dir}/${from} ${to}`);
  binds.push(`mount --bind ${dir}/passwd /etc/passwd`, `mount --bind ${dir}/group /etc/group`);
  const script = `set -e; ${binds.join('; ')}; exec libvirtd --config ${dir}/etc/libvirtd.conf --pid-file ${dir}/libvirtd.pid`;
  const daemon = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  daemon.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const entry = { dir, daemon };
  live.add(entry);
  const uri = `qemu+unix:///system?socket=${dir}/sock/libvirt-sock`;
  const virsh = (args: string[]) => execFileSync('virsh', ['-c', uri, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
  for (let i = 0; ; i++) {
    if (daemon.exitCode !== null) throw new Error(`libvirtd exited (${daemon.exitCode}): ${stderr}${tailLog(dir)}`);
    try {
      virsh(['version']);
      break;
    } catch (e) {
      if (i > 300) throw new Error(`libvirtd did not answer within 30 s: ${(e as Error).message}${tailLog(dir)}`);
      await sleep(100);
    }
  }
  return {
    dir, uri, virsh,
    qemuPid: (domain) => Number(fs.readFileSync(path.join(dir, 'run', 'qemu', `${domain}.pid`), 'utf8')),
    async stop() {
      for (const name of virsh(['list', '--name']).split('\n').filter(Boolean)) virsh(['destroy', name]);
      daemon.kill('SIGTERM');
      for (let i = 0; i < 100 && daemon.exitCode === null && daemon.signalCode === null; i++) await sleep(100);
      for (const f of listPidFiles(dir)) killPid(Number(fs.readFileSync(f, 'utf8')));
      daemon.kill('SIGKILL');
      live.delete(entry);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function tailLog(dir: string): string {
  const f = path.join(dir, 'libvirtd.log');
  return fs.existsSync(f) ? `\nlibvirtd.log:\n${fs.readFileSync(f, 'utf8').split('\n').slice(-15).join('\n')}` : '';
}

export interface DomainSpec {
  name: string;
  kernel: string;
  initrd: string;
  cmdline: string;
  memMb: number;
  disk: string; // the domain's vda at PCI slot 4
  format?: 'raw' | 'qcow2'; // the disk's; raw unless said
  serialLog: string; // the guest's console, as a file
}

// A TCG domain as close to test/helpers/vm.ts's QEMU command line as libvirt
// makes it (no USB, no balloon, ACPI on), so a plain QEMU with the same devices
// restores its snapshot: see restoreArgs.
export function domainXml(s: DomainSpec): string {
  return `<domain type='qemu'>
  <name>${s.name}</name>
  <memory unit='MiB'>${s.memMb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>${s.kernel}</kernel>
    <initrd>${s.initrd}</initrd>
    <cmdline>${s.cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='${s.format ?? 'raw'}'/>
      <source file='${s.disk}'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='${s.serialLog}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

// The devices libvirt gave that domain, for test/helpers/vm.ts's startVm.
export function restoreArgs(disk: string): string[] {
  return ['-drive', `file=${disk},format=raw,if=none,id=vda`, '-device', 'virtio-blk-pci,bus=pci.0,addr=0x4,drive=vda,id=virtio-disk0'];
}

// Lines of a console log file, for a guest whose serial port libvirt writes.
export function logLines(file: string): string[] {
  return fs.existsSync(file) ? fs.readFileSync(file, 'latin1').split('\n').map((l) => l.replace(/\r$/, '')) : [];
}
