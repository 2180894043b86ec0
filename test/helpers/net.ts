// Helpers for the network tests: a throwaway PKI made with the openssl CLI, a
// real bgsnap-receive --listen process on 127.0.0.1, a relay of a generated
// stream through the real CLI, and a loopback TCP proxy that can cut the line.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { BIN, run, type RunResult } from './cli';

export const LOOP = '127.0.0.1';

// Every scratch directory goes when the test process exits (BGSNAP_KEEP_TMP=1
// keeps them to look at): a run's images and streams come to gigabytes, and
// the leftovers of many runs once filled /tmp here (a CI run failed ENOSPC).
const scratch: string[] = [];
process.on('exit', () => {
  if (process.env.BGSNAP_KEEP_TMP) return;
  for (const d of scratch) {
    try {
      fs.rmSync(d, { recursive: true, force: true });
    } catch {
      // a filesystem still mounted on it (EBUSY): left for the test that mounted it
    }
  }
});

export function tmpDir(prefix: string): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `bgsnap-${prefix}-`));
  scratch.push(d);
  return d;
}

export interface Pki {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  rogueCa: string; // a CA nobody trusts, with its own client and server certs
  rogueClientCert: string;
  rogueClientKey: string;
  rogueServerCert: string;
  rogueServerKey: string;
}

function ossl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function makeCa(dir: string, name: string): void {
  ossl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.pem`,
    '-days', '2', '-subj', `/CN=${name}`], dir);
}

function makeLeaf(dir: string, ca: string, name: string, server: boolean): void {
  ossl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`], dir);
  const ext = server ? 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' : 'extendedKeyUsage=clientAuth\n';
  fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
  ossl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`,
    '-days', '2', '-extfile', `${name}.ext`], dir);
}

export function makePki(dir: string): Pki {
  makeCa(dir, 'ca');
  makeCa(dir, 'rogue-ca');
  makeLeaf(dir, 'ca', 'server', true);
  makeLeaf(dir, 'ca', 'client', false);
  makeLeaf(dir, 'rogue-ca', 'rogue-client', false);
  makeLeaf(dir, 'rogue-ca', 'rogue-server', true);
  const f = (n: string) => path.join(dir, n);
  return {
    ca: f('ca.pem'), serverCert: f('server.pem'), serverKey: f('server.key'), clientCert: f('client.pem'), clientKey: f('client.key'),
    rogueCa: f('rogue-ca.pem'), rogueClientCert: f('rogue-client.pem'), rogueClientKey: f('rogue-client.key'),
    rogueServerCert: f('rogue-server.pem'), rogueServerKey: f('rogue-server.key'),
  };
}

export function writeToken(dir: string, name = 'token'): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, crypto.randomBytes(24).toString('hex') + '\n', { mode: 0o600 });
  return file;
}

export interface ReceiverProc {
  port: number;
  url: string;
  proc: ChildProcess;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(sig?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

// Starts bgsnap-receive --listen 127.0.0.1:0 and learns the port from its first line.
export function startReceiver(root: string, args: string[]): Promise<ReceiverProc> {
  const cmd = `${BIN.receive} --listen ${LOOP}:0 --dir '${root}' ${args.map((a) => `'${a}'`).join(' ')}`;
  const proc = spawn('/bin/sh', ['-c', `exec ${cmd}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  let out = '';
  proc.stderr!.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`receiver did not start: ${err}`)), 20_000);
    void exited.then(() => reject(new Error(`receiver exited: ${err}`)));
    proc.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      const m = /listening [^\n]*:(\d+)\n/.exec(out);
      if (!m) return;
      clearTimeout(timer);
      const port = Number(m[1]);
      resolve({
        port, url: `tcp://${LOOP}:${port}`, proc, stderr: () => err, exited,
        kill: (sig = 'SIGTERM') => (proc.kill(sig), exited),
      });
    });
  });
}

// Sends a stream (bytes) through the real CLI: bgsnap-receive --to URL < stream.
export function relay(stream: Buffer, url: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return run(BIN.receive, ['--to', url, ...args], timeoutMs, stream);
}

export function dirEntries(dir: string): string[] {
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

// A loopback proxy in front of the receiver. cut() closes both sides of every
// connection (the sender's with a reset), as a network failure would.
export interface Proxy {
  url: string;
  bytes(): number; // bytes forwarded towards the receiver
  cut(): void;
  close(): void;
}

export function startProxy(targetPort: number): Promise<Proxy> {
  const pairs: [net.Socket, net.Socket][] = [];
  let forwarded = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, LOOP);
    client.on('data', (c: Buffer) => (forwarded += c.length));
    client.pipe(upstream).pipe(client);
    client.on('error', () => undefined);
    upstream.on('error', () => undefined);
    pairs.push([client, upstream]);
  });
  return new Promise((resolve) => server.listen(0, LOOP, () => {
    const port = (server.address() as net.AddressInfo).port;
    resolve({
      url: `tcp://${LOOP}:${port}`,
      bytes: () => forwarded,
      cut: () => pairs.forEach(([a, b]) => { a.resetAndDestroy(); b.destroy(); }),
      close: () => server.close(),
    });
  }));
}

export async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
