// A QEMU capture that gives up waiting for QEMU's snapshot to stop, then exits
// at once, as bgsnap-capture does after an error:
//   node qemu-giveup-child.js QMP_SOCKET
// The snapshot is slowed to 8 MB/s and aborted after its first MiB with no
// time allowed to wait (abortWaitMs 0), so QEMU is surely still writing when
// this process ends: only the guard can keep its stream drained then.
import { openQemuSnapshot } from '../capture/qemu-source';

async function main(): Promise<void> {
  const snap = await openQemuSnapshot(process.argv[2], { maxBandwidth: 8e6, abortWaitMs: 0 });
  let got = 0;
  for await (const chunk of snap.stream) {
    got += (chunk as Buffer).length;
    if (got > 1 << 20) break;
  }
  await snap.abort('test gives up');
  const err = await snap.done.then(() => null, (e: Error) => e);
  process.stdout.write(`${err ? err.message : 'completed'}\n`);
  process.exit(1);
}

main().catch((e: Error) => {
  process.stderr.write(`child failed: ${e.message}\n`);
  process.exit(2);
});
