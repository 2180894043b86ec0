// Runs one process capture in its own process so a test can SIGKILL it at a
// chosen moment: node process-capture-child.js PID HOLD_AT HOLD_MS RATE_MBPS.
// Events are consumed and dropped; "started" is printed at the snapshot point.
import type { CaptureOptions } from '../capture/addon';
import { captureProcess } from '../capture/process-source';

async function main(): Promise<void> {
  const [pid, holdAt, holdMs, rate] = process.argv.slice(2);
  const cap = captureProcess(Number(pid), {
    testHoldAt: holdAt === '-' ? undefined : (holdAt as CaptureOptions['testHoldAt']),
    testHoldMs: Number(holdMs), rateLimitMBps: Number(rate), bufferMb: 16,
  });
  for await (const ev of cap.events) {
    if (ev.type === 'header') process.stdout.write('started\n');
  }
  process.stdout.write(`done ${JSON.stringify(cap.stats())}\n`);
}

main().catch((e: Error & { code?: string }) => {
  process.stderr.write(`capture failed: ${e.code ?? ''} ${e.message}\n`);
  process.exit(1);
});
