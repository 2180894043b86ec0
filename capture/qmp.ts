// A small QMP (QEMU Machine Protocol) client over a Unix socket.
//
// QMP is newline-delimited JSON: QEMU greets first, the client must negotiate
// with `qmp_capabilities`, then sends commands; replies carry the command's
// `id`, and asynchronous events arrive interleaved at any time. Commands get an
// id each so replies are matched even when several are in flight.
import * as net from 'node:net';
import { QmpEventLog } from './qmp-event-log';
import type { QmpTarget, QmpTransport, SocketHandOver } from './qmp-transport';

export interface QmpGreeting {
  QMP: { version: { qemu: { major: number; minor: number; micro: number }; package: string }; capabilities: string[] };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpConnectOptions {
  // How long to wait for the greeting. QEMU serves one client per QMP monitor at
  // a time, so a monitor that is busy with another client also ends up here.
  timeoutMs?: number;
}

// A command QEMU rejected. `desc` is QEMU's own error text.
export class QmpError extends Error {
  readonly command: string;
  readonly errorClass: string;
  readonly desc: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP command '${command}' failed: ${desc} (${errorClass})`);
    this.name = 'QmpError';
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
}

type Message = Record<string, unknown>;

export class QmpClient implements QmpTransport {
  readonly path: string;
  readonly greeting: QmpGreeting;
  private readonly log = new QmpEventLog(() => this.path);
  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffer = '';
  private closedError: Error | null = null;

  private constructor(path: string, socket: net.Socket, greeting: QmpGreeting, rest: string) {
    this.path = path;
    this.socket = socket;
    this.greeting = greeting;
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', (err) => this.onClose(err));
    socket.on('close', () => this.onClose(new Error(`QMP connection to ${path} closed`)));
    if (rest) this.onData(rest);
    socket.resume(); // paused by openAndGreet so nothing arrives before these handlers
  }

  // Connects, reads the greeting and negotiates capabilities.
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const { socket, greeting, rest } = await openAndGreet(path, opts.timeoutMs ?? 5000);
    const client = new QmpClient(path, socket, greeting, rest);
    try {
      await client.execute('qmp_capabilities');
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  // The connected socket's fd (for SO_PEERCRED: who serves this monitor), if Node shows it.
  get fd(): number | null {
    const fd = (this.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? fd : null;
  }

  get target(): QmpTarget {
    return { qmp: this.path };
  }

  // QEMU on its own QMP socket runs beside us and reaches our sockets by path.
  async reachSocket(sockPath: string): Promise<SocketHandOver> {
    return { address: { type: 'unix', path: sockPath }, release: async () => undefined };
  }

  get qemuVersion(): string {
    const v = this.greeting.QMP.version.qemu;
    return `${v.major}.${v.minor}.${v.micro}`;
  }

  // Runs a command and returns its `return` value; throws QmpError on QEMU's
  // refusal. QEMU's main loop can be blocked for long (see qemu-source.ts), so
  // callers that must not hang pass a timeout; a late reply is then dropped.
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedError) {
      return Promise.reject(new Error(`QMP command '${command}' not sent: ${this.closedError.message}`));
    }
    const id = this.nextId++;
    const msg: Message = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise<T>((resolve, reject) => {
      const timer = opts.timeoutMs === undefined ? undefined : setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP command '${command}' got no reply within ${opts.timeoutMs} ms`));
      }, opts.timeoutMs);
      const settle = <A>(f: (a: A) => void) => (a: A) => (clearTimeout(timer), f(a));
      this.pending.set(id, { command, resolve: settle(resolve as (v: unknown) => void), reject: settle(reject) });
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  // Every event received, oldest first, so callers can look back as well as wait.
  get events(): QmpEvent[] {
    return this.log.events;
  }

  waitForEvent(name: string, timeoutMs: number, pred?: (ev: QmpEvent) => boolean, sinceIndex?: number): Promise<QmpEvent> {
    return this.log.wait(name, timeoutMs, pred, sinceIndex);
  }

  get closed(): boolean {
    return this.closedError !== null;
  }

  close(): void {
    this.onClose(new Error(`QMP connection to ${this.path} closed by us`));
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(parseMessage(line));
    }
  }

  private onMessage(msg: Message): void {
    if (typeof msg.event === 'string') {
      this.log.add(msg as unknown as QmpEvent);
      return;
    }
    const p = typeof msg.id === 'number' ? this.pending.get(msg.id) : undefined;
    if (!p) return; // a reply to nothing we sent: ignore rather than guess
    this.pending.delete(msg.id as number);
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? 'unknown error'));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const [, p] of this.pending) p.reject(new Error(`QMP command '${p.command}' got no reply: ${err.message}`));
    this.pending.clear();
  }
}

// Connects and waits for the greeting line; returns any bytes that came after it.
function openAndGreet(path: string, timeoutMs: number): Promise<{ socket: net.Socket; greeting: QmpGreeting; rest: string }> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    socket.setEncoding('utf8');
    let buf = '';
    const fail = (err: Error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () => fail(new Error(`${path}: no QMP greeting within ${timeoutMs} ms (not a QMP socket, or its monitor is busy with another client)`)),
      timeoutMs,
    );
    socket.on('error', (err: NodeJS.ErrnoException) => fail(connectError(path, err)));
    socket.on('close', () => fail(new Error(`${path}: connection closed before a QMP greeting (not a QMP socket?)`)));
    socket.on('data', (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > 65536) fail(new Error(`${path}: not a QMP socket (no greeting line)`));
        return;
      }
      const greeting = parseGreeting(buf.slice(0, nl));
      if (!greeting) return fail(new Error(`${path}: not a QMP socket (unexpected greeting ${JSON.stringify(buf.slice(0, 80))})`));
      clearTimeout(timer);
      socket.pause();
      socket.removeAllListeners();
      resolve({ socket, greeting, rest: buf.slice(nl + 1) });
    });
  });
}

// A line that is not JSON cannot come from QEMU; surface it as an event rather
// than throwing inside a socket callback.
function parseMessage(line: string): Message {
  try {
    return JSON.parse(line) as Message;
  } catch {
    return { event: 'BGSNAP_UNPARSABLE_LINE', data: { line } };
  }
}

function parseGreeting(line: string): QmpGreeting | null {
  try {
    const msg = JSON.parse(line) as Partial<QmpGreeting>;
    return msg && typeof msg.QMP === 'object' && msg.QMP !== null ? (msg as QmpGreeting) : null;
  } catch {
    return null;
  }
}

function connectError(path: string, err: NodeJS.ErrnoException): Error {
  switch (err.code) {
    case 'ENOENT':
      return new Error(`QMP socket ${path} not found (start QEMU with -qmp unix:${path},server=on,wait=off)`);
    case 'ECONNREFUSED':
      return new Error(`QMP socket ${path}: connection refused (nothing listening, or not a socket; is QEMU still running?)`);
    case 'ENOTSOCK':
      return new Error(`${path} is not a socket`);
    case 'EACCES':
      return new Error(`QMP socket ${path}: permission denied`);
    default:
      return new Error(`QMP socket ${path}: ${err.message}`);
  }
}
