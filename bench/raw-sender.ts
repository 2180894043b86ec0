// A sender for bench/receive-concurrent: sends a bgsnap stream file's bytes as
// they are (no decode, no re-encode) to a bgsnap-receive --listen, so the bench
// measures the receiver, not a relay. Optionally stops for --pause-ms after
// --pause-after bytes (a sender that stalls mid-stream).
//   node dist/bench/raw-sender.js FILE tcp://H:P TOKENFILE NAME [PAUSE_AFTER PAUSE_MS]
import * as fs from 'node:fs';
import { NetOutput } from '../net/client';

async function main(): Promise<void> {
  const [file, to, tokenFile, name, pauseAfter, pauseMs] = process.argv.slice(2);
  const out = await NetOutput.connect({ to, tokenFile, name, insecure: true });
  const fd = fs.openSync(file, 'r');
  let sent = 0;
  let paused = pauseAfter === undefined;
  for (;;) {
    const buf = Buffer.allocUnsafe(1 << 20);
    const n = fs.readSync(fd, buf, 0, buf.length, null);
    if (n === 0) break;
    await out.write(buf.subarray(0, n));
    sent += n;
    if (!paused && sent >= Number(pauseAfter)) {
      paused = true;
      await new Promise((r) => setTimeout(r, Number(pauseMs)));
    }
  }
  const summary = await out.close();
  if (summary.status !== 'complete') throw new Error(`${name}: ${summary.reason}`);
}

main().then(() => process.exit(0), (e: Error) => {
  process.stderr.write(`raw-sender: ${e.message}\n`);
  process.exit(1);
});
