// Teardown that cannot hang: a JavaScript side that stops taking buffers (or
// stops running callbacks) and then closes must get its process back promptly
// with the target released.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { assertReleased, startTarget } from './process-target';

for (const mode of ['hold', 'busy']) {
  test(`a consumer that stops (${mode}) then closes: its process exits promptly, target released`, async () => {
    const t = await startTarget('anon', 128, 3);
    try {
      const child = spawn(process.execPath, [path.join(__dirname, 'process-teardown-child.js'), String(t.pid), mode], { stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      child.stdout!.on('data', (d: Buffer) => { out += d.toString(); });
      const started = Date.now();
      const code = await new Promise<number | null>((resolve) => {
        const timer = setTimeout(() => { child.kill('SIGKILL'); resolve(-1); }, 30_000);
        child.on('exit', (c) => { clearTimeout(timer); resolve(c); });
      });
      const ms = Date.now() - started;
      console.log(`  ${mode}: child exited ${code} after ${ms} ms, said ${JSON.stringify(out.trim())}`);
      assert.is(code, 0, 'the process exited by itself');
      assert.match(out, /closed/);
      await assertReleased(t);
    } finally {
      t.kill();
    }
  });
}

test.run();
