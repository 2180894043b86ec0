// The watchman of a whole-VM capture's disk side, run as a child of
// bgsnap-capture from before it touches QEMU's block layer until its disk work
// is over. The capture tells it on stdin, one JSON line each, its own NBD
// socket ({"socket":P}, removed with its private folder once the guard is
// done), what it adds ({"node":N}, {"job":J,"export":ID}), where QEMU's NBD nodes reconnect
// ({"standIn":{"path":P,"export":{"name":ID,"size":S}}}) and when it stops the
// VM ({"stopped":true}), then "done" at the end. If stdin closes without
// "done", the capture died (SIGKILL even): the guard at once serves the NBD
// socket path itself as a stand-in that accepts every write and discards it
// (so copy-before-write never fails a guest write on a dead target: see
// RECONNECT_DELAY_S in qemu-disks.ts), waits until QEMU's running backups
// reconnected to it, then cancels the jobs, deletes the nodes and, if the
// capture had stopped the VM, makes sure it runs again, so a dead capture
// never leaves a VM stopped, failing writes, or block nodes behind. (The
// migration itself has its own guard, capture/qemu-guard.ts.)
// Through libvirt, QEMU's NBD connection is a passed fd it cannot reopen, so
// there is nothing to reconnect to a stand-in: instead the capture asks the
// guard at once ({"relay":{"path":P,"upstream":U,"exports":[...]}}, answered
// "relaying" on stdout) to be the NBD server QEMU holds, relaying to the
// capture's (capture/nbd-relay.ts); if the capture dies, the relay answers for
// it as the stand-in would, on the connection QEMU already has.
//   node qemu-disk-guard.js '{"qmp":SOCKET}'|'{"domain":NAME,"connect":URI}'
import * as fs from 'node:fs';
import { NbdRelay } from './nbd-relay';
import { NbdTargetServer, type NbdExport } from './nbd-target';
import { connectTransport, type QmpTarget, type QmpTransport } from './qmp-transport';
import { ACTIVE_STATES, removeSocket } from './qemu-source';
import { cancelJobs, deleteNode, resumeIfPaused, RECONNECT_DELAY_S } from './qemu-disks';

interface Undo {
  nodes: string[];
  jobs: { job: string; export: string }[];
  stopped: boolean;
  standIn: { path: string; exports: NbdExport[] } | null;
  socket: string | null; // the capture's own NBD socket, in its private folder
}

function parse(said: string): { undo: Undo; done: boolean } {
  const undo: Undo = { nodes: [], jobs: [], stopped: false, standIn: null, socket: null };
  let done = false;
  for (const line of said.split('\n')) {
    if (line.trim() === 'done') done = true;
    if (!line.startsWith('{')) continue;
    const m = JSON.parse(line) as { node?: string; job?: string; export?: string; stopped?: boolean; standIn?: { path: string; export: NbdExport }; socket?: string };
    if (m.node) undo.nodes.push(m.node);
    if (m.socket) undo.socket = m.socket;
    if (m.job) undo.jobs.push({ job: m.job, export: m.export ?? '' });
    if (m.stopped) undo.stopped = true;
    if (m.standIn) {
      undo.standIn ??= { path: m.standIn.path, exports: [] };
      undo.standIn.exports.push(m.standIn.export);
    }
  }
  return { undo, done };
}

// Listens where the dead capture's NBD server did (its socket file is left
// behind: bind needs it gone) and says yes to every write.
async function serveStandIn(s: { path: string; exports: NbdExport[] }): Promise<NbdTargetServer> {
  const server = new NbdTargetServer(s.exports, async () => undefined);
  server.discard();
  fs.rmSync(s.path, { force: true });
  await server.listen(s.path);
  return server;
}

// Our backups still running must be on the stand-in before they are cancelled:
// a cancel while QEMU still waits to reconnect ends that wait at once
// (nbd_cancel_in_flight), failing the guest writes copy-before-write holds.
// Lifting the throttle makes each job write now, so QEMU finds its dead
// connection and reconnects without delay.
async function untilReconnected(qmp: QmpTransport, jobs: Undo['jobs'], standIn: NbdTargetServer): Promise<void> {
  const deadline = Date.now() + 2 * RECONNECT_DELAY_S * 1000;
  for (let first = true; Date.now() < deadline; first = false) {
    const live = (await qmp.execute<{ device: string }[]>('query-block-jobs')).map((j) => j.device);
    const waiting = jobs.filter((j) => live.includes(j.job) && !standIn.opened.has(j.export));
    if (!waiting.length) return;
    if (first) for (const j of waiting) await qmp.execute('block-job-set-speed', { device: j.job, speed: 0 }).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// The monitor serves one client at a time: retry while the migration guard holds it.
async function connect(target: QmpTarget): Promise<QmpTransport> {
  for (let i = 0; ; i++) {
    try {
      return await connectTransport(target, { timeoutMs: 10_000, events: false });
    } catch (e) {
      if (i >= 30) throw e;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

// What the guard is waiting for, said on stderr while QEMU does not answer
// (seen once on QEMU 10: its main loop stuck in the block layer after the
// capture's NBD server died with it), so a hang names its step.
let step = 'connecting to QMP';
function sayWhileStuck(everyMs = 30_000): NodeJS.Timeout {
  let last = '';
  let since = Date.now();
  return setInterval(() => {
    if (step !== last) return void ((last = step), (since = Date.now()));
    process.stderr.write(`bgsnap-capture disk guard: QEMU has not finished ${step} for ${Math.round((Date.now() - since) / 1000)} s\n`);
  }, everyMs);
}

async function undoAll(target: QmpTarget, u: Undo, standIn: NbdTargetServer | null): Promise<void> {
  const qmp = await connect(target);
  try {
    const jobs = u.jobs.map((j) => j.job);
    if (standIn) {
      step = 'waiting for QEMU to reconnect its backup(s) to the stand-in';
      await untilReconnected(qmp, u.jobs, standIn);
    }
    step = `cancelling backup job(s) ${jobs.join(', ')}`;
    await cancelJobs(qmp, jobs);
    for (const n of u.nodes) {
      step = `deleting node ${n}`;
      await deleteNode(qmp, n);
    }
    // A node's NBD connection is handed to a libvirt domain's QEMU under the
    // node's name just before blockdev-add; if that never came, close it.
    for (const n of u.nodes) await qmp.execute('closefd', { fdname: n }).catch(() => undefined);
    if (!u.stopped) return;
    step = 'waiting for the migration to end, then resuming the VM';
    // A snapshot that was started resumes the VM itself (QEMU 7.2) and is
    // being drained by the migration guard; wait for it, then resume the VM
    // if it is still stopped.
    for (let i = 0; i < 3000; i++) {
      const { status } = await qmp.execute<{ status?: string }>('query-migrate');
      if (!ACTIVE_STATES.has(status ?? '')) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await resumeIfPaused(qmp);
  } finally {
    qmp.close();
  }
}

interface RelayAsk { path: string; upstream: string; exports: NbdExport[] }

// Started while the capture waits for our "relaying": it hands QEMU a
// connection to this socket next.
function startRelay(ask: RelayAsk): NbdRelay {
  const relay = new NbdRelay(ask.exports, ask.upstream);
  relay.onError = (e) => process.stderr.write(`bgsnap-capture disk guard: ${e.message}\n`);
  relay.listen(ask.path).then(
    () => process.stdout.write('relaying\n'),
    (e: Error) => process.stdout.write(`relay failed: listening on ${ask.path}: ${e.message}\n`),
  );
  return relay;
}

// Reads stdin to its end, starting the relay as soon as it is asked for.
async function listenToCapture(): Promise<{ said: string; relay: { path: string; server: NbdRelay } | null }> {
  let said = '';
  let relay: { path: string; server: NbdRelay } | null = null;
  process.stdin.on('data', (c: Buffer) => {
    const from = said.length;
    said += c.toString();
    for (const line of said.slice(said.lastIndexOf('\n', from - 1) + 1).split('\n').slice(0, -1)) {
      if (!line.startsWith('{"relay"') || relay) continue;
      const ask = (JSON.parse(line) as { relay: RelayAsk }).relay;
      relay = { path: ask.path, server: startRelay(ask) };
    }
  });
  await new Promise((resolve) => process.stdin.on('close', resolve).on('end', resolve));
  return { said, relay };
}

async function main(): Promise<void> {
  const target = JSON.parse(process.argv[2]) as QmpTarget;
  process.on('SIGINT', () => undefined).on('SIGTERM', () => undefined);
  const { said, relay } = await listenToCapture();
  const { undo, done } = parse(said);
  if (done) return void (relay?.server.close(), relay && removeSocket(relay.path));
  process.stderr.write('bgsnap-capture died with disks in flight: taking its block jobs and nodes away\n');
  relay?.server.standIn();
  const standIn = undo.standIn ? await serveStandIn(undo.standIn).catch((e: Error) => {
    process.stderr.write(`bgsnap-capture disk guard: no stand-in NBD server at ${undo.standIn!.path}: ${e.message}\n`);
    return null;
  }) : null;
  const timer = sayWhileStuck();
  await undoAll(target, undo, standIn).finally(() => {
    clearInterval(timer);
    standIn?.close();
    relay?.server.close();
    if (standIn) removeSocket(undo.standIn!.path);
    if (relay) removeSocket(relay.path);
    if (undo.socket) removeSocket(undo.socket); // last: its folder goes once empty
  });
  process.stderr.write(`bgsnap-capture disk guard: ${undo.jobs.length} job(s) and ${undo.nodes.length} node(s) gone${undo.stopped ? ', VM running' : ''}\n`);
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    process.stderr.write(`bgsnap-capture disk guard: ${e.message}\n`);
    process.exit(1);
  },
);
