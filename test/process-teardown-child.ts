// A JavaScript side that stops cooperating, in its own process so a test can see
// whether that process exits: node process-teardown-child.js PID MODE
//   hold: take 8 MiB of zero-copy buffers, never release them, then close;
//   busy: as hold, and keep the JS thread busy 2 s (no callbacks run) first.
// Prints "closed" after close() returned, then lets the event loop end by itself.
import { captureProcess } from '../capture/process-source';

async function main(): Promise<void> {
  const [pid, mode] = process.argv.slice(2);
  const cap = captureProcess(Number(pid), { zeroCopy: true, bufferMb: 8, stallTimeoutMs: 600_000 });
  const it = cap.events[Symbol.asyncIterator]();
  for (let n = 0; n < 4; n++) await it.next();  // header, blocks, state, first pages: the snapshot point passed
  await new Promise((r) => setTimeout(r, 1000)); // every buffer now held by us: the saver waits
  if (mode === 'busy') for (const end = Date.now() + 2000; Date.now() < end;);
  await it.return!(undefined); // the generator's finally closes the capture
  process.stdout.write('closed\n');
}

main().catch((e: Error) => {
  process.stderr.write(`child failed: ${e.message}\n`);
  process.exit(1);
});
