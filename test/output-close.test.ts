// io/output.ts: closing stdout while bytes are still queued by writes that
// did not ask to wait. Node emits 'drain' only after a write() that returned
// false, so a close that waited for 'drain' waited forever: the event loop
// emptied and the process exited 0 without a word (bgsnap-capture then lost
// its --stats). A real child process writes into a real pipe its parent reads
// only later.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import * as path from 'node:path';

const output = path.resolve(__dirname, '..', 'io', 'output.js');

// Fills the pipe until the next write is queued in Node (write() returned
// true, below the high-water mark), then closes and says so on stderr.
const CHILD = `
const { Output } = require(${JSON.stringify(output)});
(async () => {
  const o = Output.open('-');
  const chunk = Buffer.alloc(4096, 7);
  let n = 0;
  while (process.stdout.writableLength === 0 && n < 100000) await o.write(chunk), n++;
  process.stderr.write('queued ' + process.stdout.writableLength + ' after ' + n + ' writes\\n');
  await o.close();
  process.stderr.write('closed\\n');
})();
`;

test('stdout closes once bytes queued without a full buffer are handed over', async () => {
  const child = spawn(process.execPath, ['-e', CHILD], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '', bytes = 0;
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.pause(); // the reader lags: the pipe fills and Node queues
  await new Promise((r) => setTimeout(r, 500));
  child.stdout!.on('data', (b: Buffer) => (bytes += b.length));
  child.stdout!.resume();
  const code = await new Promise((r) => child.on('close', (c) => r(c)));
  assert.match(err, /queued \d+ after \d+ writes/, err);
  assert.ok(!/queued 0 /.test(err), `a write was left queued: ${err}`);
  assert.match(err, /closed/, `close() returned: ${err}`);
  assert.is(code, 0);
  console.log(`  ${err.trim().split('\n')[0]}; ${bytes} bytes read`);
});

test.run();
