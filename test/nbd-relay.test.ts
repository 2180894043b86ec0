// The disk guard's NBD relay (capture/nbd-relay.ts) between QEMU's own NBD
// client (qemu-io, QEMU 7.2's block layer) and the capture's NBD server
// (capture/nbd-target.ts), all real, no VM. What QEMU writes reaches the
// server byte for byte, pipelined requests included; and when the server's
// side dies with a write in flight (a capture killed with SIGKILL), that write
// and later ones still succeed, answered by the relay, where the same death
// without the relay fails the write with EIO (the case the relay exists for).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdRelay } from '../capture/nbd-relay';
import { NbdTargetServer, type NbdWriteHandler } from '../capture/nbd-target';
import { tmpDir } from './helpers/net';

const SIZE = 64 << 20;
const EXPORTS = [{ name: 'd0', size: SIZE }];
const dirs: string[] = [];

function tmp(): string {
  const d = tmpDir('relay');
  dirs.push(d);
  return d;
}

test.after(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

// qemu-io on the export behind `sock`; resolves with its output once it exits.
function qemuIo(sock: string, cmds: string[]): { done: Promise<{ code: number | null; out: string }> } {
  const args = ['-f', 'raw', `nbd+unix:///d0?socket=${sock}`, ...cmds.flatMap((c) => ['-c', c])];
  const child = spawn('qemu-io', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const done = new Promise<{ code: number | null; out: string }>((resolve) => child.on('close', (code) => (clearTimeout(timer), resolve({ code, out }))));
  return { done };
}

async function upstream(dir: string, onWrite: NbdWriteHandler): Promise<{ server: NbdTargetServer; sock: string }> {
  const server = new NbdTargetServer(EXPORTS, onWrite);
  const sock = path.join(dir, 'capture.sock');
  await server.listen(sock);
  return { server, sock };
}

async function relayTo(dir: string, upstreamSock: string): Promise<{ relay: NbdRelay; sock: string; errors: Error[] }> {
  const relay = new NbdRelay(EXPORTS, upstreamSock);
  const errors: Error[] = [];
  relay.onError = (e) => errors.push(e);
  const sock = path.join(dir, 'relay.sock');
  await relay.listen(sock);
  return { relay, sock, errors };
}

const wroteLines = (out: string) => out.split('\n').filter((l) => /^(wrote|write failed)/.test(l)).map((l) => l.replace(/ at offset.*/, ''));

test('what QEMU writes through the relay reaches the capture\'s server unchanged, pipelined requests too', async () => {
  const dir = tmp();
  const image = Buffer.alloc(SIZE, 0xee);
  const { server, sock: up } = await upstream(dir, async (_n, off, len, data) => void (data ? data.copy(image, off) : image.fill(0, off, off + len)));
  const { relay, sock, errors } = await relayTo(dir, up);
  const aio = Array.from({ length: 12 }, (_, i) => `aio_write -P ${0x10 + i} ${20 + i}M 1M`);
  const r = await qemuIo(sock, ['write -P 0x5a 0 4M', 'write -P 0xa5 5M 3M', 'write -z 10M 1M', 'write -P 0x77 12M 7M', ...aio, 'aio_flush']).done;
  relay.close();
  server.close();
  assert.is(r.code, 0, r.out);
  assert.equal(errors, []);
  const filled = (off: number, len: number, byte: number) => image.subarray(off, off + len).every((b) => b === byte);
  const M = 1 << 20;
  assert.ok(filled(0, 4 * M, 0x5a) && filled(5 * M, 3 * M, 0xa5) && filled(10 * M, M, 0) && filled(12 * M, 7 * M, 0x77));
  for (let i = 0; i < 12; i++) assert.ok(filled((20 + i) * M, M, 0x10 + i), `aio write ${i}`);
  assert.ok(filled(4 * M, M, 0xee) && filled(8 * M, 2 * M, 0xee) && filled(32 * M, 32 * M, 0xee), 'nothing else was written');
});

// The capture's server takes the first write and never answers it, then dies.
async function deathInFlight(viaRelay: boolean, kill: (ctx: { server: NbdTargetServer; relay?: NbdRelay }) => void): Promise<{ code: number | null; out: string; seen: number }> {
  const dir = tmp();
  let seen = 0;
  let took: () => void = () => undefined;
  const taken = new Promise<void>((r) => (took = r));
  const { server, sock: up } = await upstream(dir, () => (seen++, took(), new Promise<void>(() => undefined)));
  const relayed = viaRelay ? await relayTo(dir, up) : undefined;
  const io = qemuIo(relayed?.sock ?? up, ['write -P 0x5a 0 1M', 'write -P 0x5b 1M 1M']);
  await taken;
  kill({ server, relay: relayed?.relay });
  const r = await io.done;
  relayed?.relay.close();
  server.close();
  return { ...r, seen };
}

test('the capture\'s server dies with a write in flight: without the relay QEMU\'s write fails (EIO)', async () => {
  const r = await deathInFlight(false, ({ server }) => server.close());
  assert.equal(wroteLines(r.out)[0], 'write failed: Input/output error', r.out);
});

test('the capture\'s server dies with a write in flight: through the relay that write and the next succeed', async () => {
  const r = await deathInFlight(true, ({ server }) => server.close());
  assert.is(r.code, 0, r.out);
  assert.equal(wroteLines(r.out), ['wrote 1048576/1048576 bytes', 'wrote 1048576/1048576 bytes'], r.out);
  assert.is(r.seen, 1, 'the next write was answered by the relay, not sent to the dead capture');
});

test('the guard learns first that the capture died (standIn): the write in flight and the next succeed', async () => {
  const r = await deathInFlight(true, ({ relay }) => relay!.standIn());
  assert.is(r.code, 0, r.out);
  assert.equal(wroteLines(r.out), ['wrote 1048576/1048576 bytes', 'wrote 1048576/1048576 bytes'], r.out);
  assert.is(r.seen, 1);
});

test.run();
