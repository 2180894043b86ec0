// QMP through libvirt, for `--domain NAME [--connect URI]`. libvirt holds the
// QMP monitor of the VMs it manages, so we go through its own interfaces:
// every command is one `virsh qemu-monitor-command` (libvirt passes it to QEMU
// and hands back QEMU's reply unchanged), file descriptors travel with
// `--pass-fds` and QMP `getfd` (libvirt's QEMU may run under another user or a
// security label that cannot see our sockets' paths), and events come from one
// `virsh qemu-monitor-event --loop` started at connect.
//
// libvirt follows what we do to its QEMU from the events it sees: our `stop`
// makes the domain "paused", QEMU's resume (the background snapshot's, or our
// `cont`) makes it "running" again. Migration and block-job events of jobs it
// did not start are ignored by libvirt (no migration job; no such block job).
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { QmpError, type QmpEvent } from './qmp';
import { QmpEventLog } from './qmp-event-log';
import type { QmpTarget, QmpTransport, SocketHandOver } from './qmp-transport';

interface VirshResult { code: number | null; stdout: string; stderr: string }

// Runs our own virsh children under a parent-death signal where util-linux's
// setpriv is there, so an event listener never outlives a killed capture.
const SETPRIV = '/usr/bin/setpriv';

export class LibvirtQmp implements QmpTransport {
  qemuVersion = '';
  private readonly log = new QmpEventLog(() => this.path);
  private listener: ChildProcess | null = null;
  private closedError: Error | null = null;

  private constructor(readonly domain: string, readonly uri: string | undefined) {}

  static async connect(domain: string, uri?: string, opts: { timeoutMs?: number; events?: boolean } = {}): Promise<LibvirtQmp> {
    const c = new LibvirtQmp(domain, uri);
    await c.refuseIfNotRunning(opts.timeoutMs ?? 30_000);
    if (opts.events !== false) c.listen();
    try {
      const v = await c.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
      c.qemuVersion = `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`;
    } catch (e) {
      c.close();
      throw e;
    }
    return c;
  }

  get target(): QmpTarget {
    return this.uri ? { domain: this.domain, connect: this.uri } : { domain: this.domain };
  }

  get path(): string {
    return `libvirt domain "${this.domain}"${this.uri ? ` on ${this.uri}` : ''}`;
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  close(): void {
    this.closedError ??= new Error(`${this.path}: closed by us`);
    this.listener?.kill('SIGTERM');
    this.listener = null;
  }

  async execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number; fd?: net.Socket } = {}): Promise<T> {
    if (this.closedError) throw new Error(`QMP command '${command}' not sent: ${this.closedError.message}`);
    const msg = JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args });
    const argv = ['qemu-monitor-command', '--domain', this.domain, ...(opts.fd ? ['--pass-fds', '3'] : []), '--cmd', msg];
    const r = await this.virsh(argv, opts.timeoutMs, opts.fd);
    if (r.code === null) throw new Error(`QMP command '${command}' got no reply within ${opts.timeoutMs} ms from ${this.path}`);
    const reply = parseReply(r.stdout);
    if (r.code !== 0 || !reply) {
      throw new Error(`QMP command '${command}' through ${this.path} failed: ${virshError(r)}`);
    }
    if (reply.error) throw new QmpError(command, reply.error.class ?? 'GenericError', reply.error.desc ?? 'unknown error');
    return reply.return as T;
  }

  // Connects to our own socket and hands that connection to QEMU's monitor
  // under `name`; QEMU's NBD client or migration then uses it as theirs.
  async reachSocket(sockPath: string, name: string): Promise<SocketHandOver> {
    const sock = await connectPaused(sockPath);
    try {
      await this.execute('getfd', { fdname: name }, { fd: sock });
    } finally {
      sock.destroy(); // QEMU holds its own copy; ours would keep the stream from ever ending
    }
    // QEMU takes a named fd out of its monitor when it uses it; one it never
    // used is closed here (an error then only means it was used).
    return { address: { type: 'fd', str: name }, release: () => this.execute('closefd', { fdname: name }).then(() => undefined, () => undefined) };
  }

  get events(): QmpEvent[] {
    return this.log.events;
  }

  waitForEvent(name: string, timeoutMs: number, pred?: (ev: QmpEvent) => boolean, sinceIndex?: number): Promise<QmpEvent> {
    return this.log.wait(name, timeoutMs, pred, sinceIndex);
  }

  // libvirt names drives by their target ("vda") and QEMU's devices by alias
  // ("virtio-disk0"); query-block shows only the alias (in its qdev path).
  async driveNames(): Promise<Map<string, string>> {
    const r = await this.virsh(['dumpxml', '--domain', this.domain], 30_000);
    if (r.code !== 0) throw new Error(`virsh dumpxml ${this.domain}: ${virshError(r)}`);
    const names = new Map<string, string>();
    for (const disk of r.stdout.match(/<disk\b[\s\S]*?<\/disk>/g) ?? []) {
      const dev = /<target\b[^>]*\bdev=['"]([^'"]+)['"]/.exec(disk)?.[1];
      const alias = /<alias\b[^>]*\bname=['"]([^'"]+)['"]/.exec(disk)?.[1];
      if (dev && alias) names.set(alias, dev);
    }
    return names;
  }

  private async refuseIfNotRunning(timeoutMs: number): Promise<void> {
    const r = await this.virsh(['domstate', '--domain', this.domain], timeoutMs);
    if (r.code === null) throw new Error(`${this.path}: virsh domstate got no answer within ${timeoutMs} ms`);
    if (r.code !== 0) {
      const why = virshError(r);
      if (/failed to get domain|domain not found/i.test(why)) throw new Error(`no libvirt domain "${this.domain}"${this.uri ? ` on ${this.uri}` : ''} (${why}); see virsh list --all`);
      throw new Error(`${this.path}: ${why}`);
    }
    const state = r.stdout.trim();
    if (state !== 'running' && state !== 'paused') throw new Error(`${this.path} is ${state}; only a running or paused domain can be captured`);
  }

  private listen(): void {
    const argv = ['qemu-monitor-event', '--domain', this.domain, '--loop'];
    const child = this.spawnVirsh(argv, ['ignore', 'pipe', 'pipe']);
    this.listener = child;
    let buf = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (c: string) => {
      buf += c;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const ev = parseEventLine(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (ev) this.onEvent(ev);
      }
    });
    child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr += c));
    child.on('error', (e) => (this.closedError ??= new Error(`${this.path}: virsh qemu-monitor-event: ${e.message}`)));
    // Without events, finished block jobs would go unseen: say the link is gone.
    child.on('exit', (code, sig) => {
      this.closedError ??= new Error(`${this.path}: virsh qemu-monitor-event ended (${sig ?? `exit ${code}`})${stderr ? `: ${stderr.trim()}` : ''}`);
    });
    child.unref();
    (child.stdout as net.Socket).unref?.();
    (child.stderr as net.Socket).unref?.();
  }

  private onEvent(ev: QmpEvent): void {
    this.log.add(ev);
  }

  private spawnVirsh(argv: string[], stdio: (string | net.Socket)[]): ChildProcess {
    const full = [...(this.uri ? ['-c', this.uri] : []), ...argv];
    // virsh's messages are matched above; keep them in English.
    const env = { ...process.env, LC_ALL: 'C' };
    const opts = { stdio: stdio as ('pipe' | 'ignore')[], env };
    return fs.existsSync(SETPRIV) ? spawn(SETPRIV, ['--pdeathsig', 'KILL', 'virsh', ...full], opts) : spawn('virsh', full, opts);
  }

  // code null: killed after timeoutMs.
  private virsh(argv: string[], timeoutMs?: number, fd?: net.Socket): Promise<VirshResult> {
    return new Promise((resolve, reject) => {
      const child = this.spawnVirsh(argv, fd ? ['ignore', 'pipe', 'pipe', fd] : ['ignore', 'pipe', 'pipe']);
      let stdout = '';
      let stderr = '';
      child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
      child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
      const timer = timeoutMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.on('error', (e: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(e.code === 'ENOENT' ? new Error('virsh not found: --domain needs libvirt\'s client (Debian: libvirt-clients)') : e);
      });
      child.on('close', (code, sig) => {
        clearTimeout(timer);
        resolve({ code: sig === 'SIGKILL' ? null : code, stdout, stderr });
      });
    });
  }
}

function parseReply(out: string): { return?: unknown; error?: { class?: string; desc?: string } } | null {
  const line = out.split('\n').find((l) => l.trim().startsWith('{'));
  if (!line) return null;
  try {
    return JSON.parse(line) as { return?: unknown; error?: { class?: string; desc?: string } };
  } catch {
    return null;
  }
}

function virshError(r: VirshResult): string {
  const text = (r.stderr.trim() || r.stdout.trim() || `virsh exited with ${r.code}`).replace(/^error: /gm, '');
  return text.split('\n').filter(Boolean).join('; ');
}

// virsh prints "event NAME at SECONDS.MICROS for domain 'DOM': DATA", DATA
// being the event's JSON data or <null>.
export function parseEventLine(line: string): QmpEvent | null {
  const m = /^event (\S+) at (\d+)\.(\d+) for domain .*?': (.*)$/.exec(line.trim());
  if (!m) return null;
  let data: Record<string, unknown> | undefined;
  if (m[4] !== '<null>') {
    try {
      data = JSON.parse(m[4]) as Record<string, unknown>;
    } catch {
      data = { unparsed: m[4] };
    }
  }
  return { event: m[1], data, timestamp: { seconds: Number(m[2]), microseconds: Number(m[3]) } };
}

// Our own connection to our own listening socket, not read from: its bytes are
// for QEMU, which gets this socket.
function connectPaused(sockPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path: sockPath });
    s.pause();
    s.once('error', reject);
    s.once('connect', () => (s.off('error', reject), resolve(s)));
  });
}
