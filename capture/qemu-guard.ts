// The watchman of a QEMU background snapshot, run as a child of bgsnap-capture
// holding a copy of the migration socket (fd 3). QEMU 7.2 leaves a vCPU blocked
// for good when a background snapshot's stream is cut while that vCPU waits for
// a page, and a capture killed with SIGKILL cannot drain the stream itself. So:
// while the capture lives, the guard only waits on its stdin (a pipe from the
// capture) and never touches the socket; if that pipe closes without the word
// "done", the capture died: the guard reads QEMU's stream to its end and
// throws it away, then puts back the migration settings the capture changed.
// On QEMU < 8.1 the guard also releases the guest RAM protection QEMU forgets
// when its snapshot ends early (capture/qemu-uffd.ts): at once if the stream
// falls silent (a thread may sleep on a page nobody will save, even QEMU's main
// thread, which stops everything), and for good once QEMU says it stopped.
// A first guard (mode 'listen') holds the listening socket from `migrate` until
// the capture holds QEMU's connection, so no moment is left unguarded.
//   node qemu-guard.js '{"qmp":SOCKET}'|'{"domain":NAME,"connect":URI}' '{"capabilities":[["background-snapshot",false]],"maxBandwidth":null,"qemuVersion":"7.2.22","qemuPid":1234,"socketDir":DIR}' conn|listen [FDNAME]
import * as net from 'node:net';
import * as path from 'node:path';
import { connectTransport, type QmpTarget } from './qmp-transport';
import { ACTIVE_STATES, removeSocket, restore } from './qemu-source';
import { forgetsWriteProtection, releaseWriteProtection } from './qemu-uffd';

interface Restore {
  capabilities: [string, boolean][];
  maxBandwidth: number | null;
  qemuVersion: string;
  qemuPid: number | null; // QEMU's, found by the capture (QEMU < 8.1 only)
  socketDir?: string; // the capture's private folder holding migration.sock
}

const SILENT_MS = 2000; // QEMU writes its stream without pause while it is drained

// Resolves when QEMU closed the stream. `pid` (QEMU < 8.1): a stream silent for
// SILENT_MS gets QEMU's forgotten protection released (unregistering waits for
// QEMU's word in putBack: while its snapshot runs, it still needs them).
function drainSocket(s: net.Socket, pid: number | null): Promise<void> {
  let lastData = Date.now();
  const watch = setInterval(() => {
    if (pid !== null && Date.now() - lastData > SILENT_MS) release(pid, false);
  }, 1000);
  return new Promise<void>((resolve) => {
    s.on('data', () => (lastData = Date.now()));
    s.on('error', () => resolve());
    s.on('close', () => resolve());
    s.resume();
  }).finally(() => clearInterval(watch));
}

function release(pid: number, over: boolean): void {
  try {
    const r = releaseWriteProtection(pid, over);
    if (r.ranges) process.stderr.write(`bgsnap-capture guard: released ${r.ranges} guest RAM range(s) QEMU left write-protected${over ? ' and unregistered them' : ''}\n`);
  } catch (e) {
    process.stderr.write(`bgsnap-capture guard: releasing QEMU's write protection: ${(e as Error).message}\n`);
  }
}

// Mode 'listen': fd 3 is the listening socket. The capture died before it took
// QEMU's connection; QEMU may have queued one there (or be about to). Take it
// and drain it; if none comes in `waitMs`, QEMU never connected.
function acceptAndDrain(waitMs: number, pid: number | null): Promise<void> {
  return new Promise((resolve) => {
    const server = net.createServer((c) => {
      clearTimeout(timer);
      server.close();
      void drainSocket(c, pid).then(() => resolve());
    });
    const timer = setTimeout(() => (server.close(), resolve()), waitMs);
    server.on('error', () => (clearTimeout(timer), resolve()));
    server.listen({ fd: 3 });
  });
}

// QEMU refuses capability changes until the migration has fully stopped.
// `pid`: QEMU's, if it may have forgotten its protection (see release()).
async function putBack(target: QmpTarget, r: Restore, pid: number | null): Promise<void> {
  const qmp = await connectTransport(target, { timeoutMs: 10_000, events: false });
  try {
    let status = '';
    for (let i = 0; i < 600; i++) {
      status = (await qmp.execute<{ status?: string }>('query-migrate')).status ?? '';
      if (!ACTIVE_STATES.has(status)) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    if (pid !== null && !ACTIVE_STATES.has(status) && status !== 'completed') release(pid, true);
    await restore(qmp, { capabilities: new Map(r.capabilities), maxBandwidth: r.maxBandwidth });
  } finally {
    qmp.close();
  }
}

// A connection handed to QEMU by name (libvirt: getfd) that `migrate` never
// used stays open in QEMU's monitor, and draining it would never end. The
// capture is dead, so no `migrate` can come any more: close the name. An
// error means QEMU had taken it, and its stream ends as usual.
async function takeBackFd(target: QmpTarget, name: string): Promise<void> {
  const qmp = await connectTransport(target, { timeoutMs: 10_000, events: false });
  try {
    await qmp.execute('closefd', { fdname: name }).catch(() => undefined);
  } finally {
    qmp.close();
  }
}

async function main(): Promise<void> {
  const [target, json, mode, fdName] = process.argv.slice(2);
  // A signal meant for the capture's process group must not end the guard: the
  // capture handles it by draining, and then says "done".
  process.on('SIGINT', () => undefined).on('SIGTERM', () => undefined);
  let said = '';
  process.stdin.on('data', (c: Buffer) => (said += c.toString()));
  await new Promise((resolve) => process.stdin.on('close', resolve).on('end', resolve));
  if (said.includes('done')) return;
  process.stderr.write('bgsnap-capture died mid-snapshot: draining QEMU\'s stream so the guest is not left blocked\n');
  const r = JSON.parse(json) as Restore;
  const tgt = JSON.parse(target) as QmpTarget;
  const pid = forgetsWriteProtection(r.qemuVersion) ? r.qemuPid : null;
  if (mode === 'listen') await acceptAndDrain(10_000, pid);
  else {
    const drained = drainSocket(new net.Socket({ fd: 3, readable: true, writable: false }), pid);
    if (fdName) await takeBackFd(tgt, fdName);
    await drained;
  }
  if (r.socketDir) removeSocket(path.join(r.socketDir, 'migration.sock')); // the stream is over: nothing connects there
  if (pid !== null) release(pid, false); // the stream is over: nobody serves a fault now
  await putBack(tgt, r, pid);
  process.stderr.write('bgsnap-capture guard: QEMU\'s snapshot drained and its migration settings put back\n');
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    process.stderr.write(`bgsnap-capture guard: ${e.message}\n`);
    process.exit(1);
  },
);
