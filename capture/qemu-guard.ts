// The watchman of a QEMU background snapshot, run as a child of bgsnap-capture
// holding a copy of the migration socket (fd 3). QEMU 7.2 leaves a vCPU blocked
// for good when a background snapshot's stream is cut while that vCPU waits for
// a page, and a capture killed with SIGKILL cannot drain the stream itself. So:
// while the capture lives, the guard only waits on its stdin (a pipe from the
// capture) and never touches the socket; if that pipe closes without the word
// "done", the capture died: the guard reads QEMU's stream to its end and
// throws it away, then puts back the migration settings the capture changed.
// A first guard (mode 'listen') holds the listening socket from `migrate` until
// the capture holds QEMU's connection, so no moment is left unguarded.
//   node qemu-guard.js QMP_SOCKET '{"capabilities":[["background-snapshot",false]],"maxBandwidth":null}' conn|listen
import * as net from 'node:net';
import { QmpClient } from './qmp';
import { ACTIVE_STATES, restore } from './qemu-source';

interface Restore {
  capabilities: [string, boolean][];
  maxBandwidth: number | null;
}

function drainSocket(s: net.Socket): Promise<void> {
  return new Promise((resolve) => {
    s.on('data', () => undefined);
    s.on('error', () => resolve());
    s.on('close', () => resolve());
    s.resume();
  });
}

// Mode 'listen': fd 3 is the listening socket. The capture died before it took
// QEMU's connection; QEMU may have queued one there (or be about to). Take it
// and drain it; if none comes in `waitMs`, QEMU never connected.
function acceptAndDrain(waitMs: number): Promise<void> {
  return new Promise((resolve) => {
    const server = net.createServer((c) => {
      clearTimeout(timer);
      server.close();
      void drainSocket(c).then(resolve);
    });
    const timer = setTimeout(() => (server.close(), resolve()), waitMs);
    server.on('error', () => (clearTimeout(timer), resolve()));
    server.listen({ fd: 3 });
  });
}

// QEMU refuses capability changes until the migration has fully stopped.
async function putBack(qmpPath: string, r: Restore): Promise<void> {
  const qmp = await QmpClient.connect(qmpPath, { timeoutMs: 10_000 });
  try {
    for (let i = 0; i < 600; i++) {
      const { status } = await qmp.execute<{ status?: string }>('query-migrate');
      if (!ACTIVE_STATES.has(status ?? '')) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    await restore(qmp, { capabilities: new Map(r.capabilities), maxBandwidth: r.maxBandwidth });
  } finally {
    qmp.close();
  }
}

async function main(): Promise<void> {
  const [qmpPath, json, mode] = process.argv.slice(2);
  // A signal meant for the capture's process group must not end the guard: the
  // capture handles it by draining, and then says "done".
  process.on('SIGINT', () => undefined).on('SIGTERM', () => undefined);
  let said = '';
  process.stdin.on('data', (c: Buffer) => (said += c.toString()));
  await new Promise((resolve) => process.stdin.on('close', resolve).on('end', resolve));
  if (said.includes('done')) return;
  process.stderr.write('bgsnap-capture died mid-snapshot: draining QEMU\'s stream so the guest is not left blocked\n');
  if (mode === 'listen') await acceptAndDrain(10_000);
  else await drainSocket(new net.Socket({ fd: 3, readable: true, writable: false }));
  await putBack(qmpPath, JSON.parse(json) as Restore);
  process.stderr.write('bgsnap-capture guard: QEMU\'s snapshot drained and its migration settings put back\n');
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    process.stderr.write(`bgsnap-capture guard: ${e.message}\n`);
    process.exit(1);
  },
);
