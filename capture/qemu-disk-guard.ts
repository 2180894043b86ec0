// The watchman of a whole-VM capture's disk side, run as a child of
// bgsnap-capture from before it touches QEMU's block layer until its disk work
// is over. The capture tells it on stdin, one JSON line each, what it adds
// ({"node":N}, {"job":J}) and when it stops the VM ({"stopped":true}), then
// "done" at the end. If stdin closes without "done", the capture died (SIGKILL
// even): the guard cancels the jobs, deletes the nodes and, if the capture had
// stopped the VM, makes sure it runs again, so a dead capture never leaves a VM
// stopped or block nodes behind. (The migration itself has its own guard,
// capture/qemu-guard.ts.)
//   node qemu-disk-guard.js '{"qmp":SOCKET}'|'{"domain":NAME,"connect":URI}'
import { connectTransport, type QmpTarget, type QmpTransport } from './qmp-transport';
import { ACTIVE_STATES } from './qemu-source';
import { cancelJobs, deleteNode, resumeIfPaused } from './qemu-disks';

interface Undo { nodes: string[]; jobs: string[]; stopped: boolean }

function parse(said: string): { undo: Undo; done: boolean } {
  const undo: Undo = { nodes: [], jobs: [], stopped: false };
  let done = false;
  for (const line of said.split('\n')) {
    if (line.trim() === 'done') done = true;
    if (!line.startsWith('{')) continue;
    const m = JSON.parse(line) as { node?: string; job?: string; stopped?: boolean };
    if (m.node) undo.nodes.push(m.node);
    if (m.job) undo.jobs.push(m.job);
    if (m.stopped) undo.stopped = true;
  }
  return { undo, done };
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

async function undoAll(target: QmpTarget, u: Undo): Promise<void> {
  const qmp = await connect(target);
  try {
    step = `cancelling backup job(s) ${u.jobs.join(', ')}`;
    await cancelJobs(qmp, u.jobs);
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

async function main(): Promise<void> {
  const target = JSON.parse(process.argv[2]) as QmpTarget;
  process.on('SIGINT', () => undefined).on('SIGTERM', () => undefined);
  let said = '';
  process.stdin.on('data', (c: Buffer) => (said += c.toString()));
  await new Promise((resolve) => process.stdin.on('close', resolve).on('end', resolve));
  const { undo, done } = parse(said);
  if (done) return;
  process.stderr.write('bgsnap-capture died with disks in flight: taking its block jobs and nodes away\n');
  const timer = sayWhileStuck();
  await undoAll(target, undo).finally(() => clearInterval(timer));
  process.stderr.write(`bgsnap-capture disk guard: ${undo.jobs.length} job(s) and ${undo.nodes.length} node(s) gone${undo.stopped ? ', VM running' : ''}\n`);
}

main().then(
  () => process.exit(0),
  (e: Error) => {
    process.stderr.write(`bgsnap-capture disk guard: ${e.message}\n`);
    process.exit(1);
  },
);
