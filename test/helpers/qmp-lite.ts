// Just enough QMP for the real-QEMU tests: connect, negotiate, run commands one
// at a time. Asynchronous events are ignored. The project's real client lives in
// capture/qmp.ts; this stays test-only so the tests do not depend on it.

import * as net from 'node:net';
import * as fs from 'node:fs';

type Json = Record<string, unknown>;

export class QmpLite {
  private buf = '';
  private waiting: { ok: (msg: Json) => void; bad: (e: Error) => void }[] = [];
  private queued: Json[] = [];
  private closedErr: Error | null = null;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('close', () => this.onClose(new Error('QMP socket closed')));
    sock.on('error', (e) => this.onClose(e));
  }

  // QEMU creates the socket shortly after start; poll for it rather than sleep.
  static async connect(path: string, timeoutMs = 5000): Promise<QmpLite> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        if (fs.existsSync(path)) {
          const sock = await new Promise<net.Socket>((ok, bad) => {
            const s = net.createConnection(path, () => ok(s));
            s.once('error', bad);
          });
          const q = new QmpLite(sock);
          await q.next(); // greeting
          await q.cmd('qmp_capabilities');
          return q;
        }
      } catch (e) {
        if (Date.now() > deadline) throw e;
      }
      if (Date.now() > deadline) throw new Error(`QMP socket ${path} did not appear`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async cmd(execute: string, args?: Json): Promise<any> {
    this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    for (;;) {
      const msg = await this.next();
      if ('event' in msg) continue;
      if ('error' in msg) throw new Error(`QMP ${execute}: ${JSON.stringify(msg.error)}`);
      return msg.return;
    }
  }

  close(): void {
    this.sock.destroy();
  }

  private next(): Promise<Json> {
    const m = this.queued.shift();
    if (m) return Promise.resolve(m);
    if (this.closedErr) return Promise.reject(this.closedErr);
    return new Promise((ok, bad) => this.waiting.push({ ok, bad }));
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      const msg = JSON.parse(line) as Json;
      const w = this.waiting.shift();
      if (w) w.ok(msg);
      else this.queued.push(msg);
    }
  }

  private onClose(e: Error): void {
    this.closedErr ??= e;
    for (const w of this.waiting.splice(0)) w.bad(this.closedErr);
  }
}
