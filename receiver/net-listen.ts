// `bgsnap-receive --listen HOST:PORT --dir ROOT`: runs the network receiver
// until SIGTERM or SIGINT, then stops accepting, marks what is in flight
// incomplete (durably) and returns.
import { loadAuth, type AuthFlags } from '../net/auth';
import { Receiver } from './server';

export interface ListenFlags extends AuthFlags {
  listen: string;
  dir: string;
  maxStreams: number;
  maxImageGb: number;
  idleTimeout: number; // seconds
  quiet?: boolean;
}

export function parseHostPort(s: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(s);
  if (!m || Number(m[2]) > 65535) throw new Error(`--listen must be HOST:PORT, got "${s}"`);
  return { host: m[1].replace(/^\[|\]$/g, ''), port: Number(m[2]) };
}

export async function listen(f: ListenFlags): Promise<number> {
  const { host, port } = parseHostPort(f.listen);
  const log = (m: string) => process.stderr.write(`bgsnap-receive: ${m}\n`);
  const rx = new Receiver({
    root: f.dir, auth: loadAuth(f), maxStreams: f.maxStreams, maxImageBytes: f.maxImageGb * 1024 ** 3, idleMs: f.idleTimeout * 1000,
    log: f.quiet ? () => undefined : log,
  });
  const addr = await rx.listen(host, port);
  // The first line on stdout is the bound address, so a caller that asked for port 0 learns the port.
  process.stdout.write(`listening ${addr.address}:${addr.port}\n`);
  const sig = await new Promise<string>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  log(`${sig}: no longer accepting; ${rx.activeStreams} stream(s) in flight will be marked incomplete`);
  await rx.stop(`the receiver is shutting down (${sig})`);
  return 0;
}
