// The architecture as tests: the import rules between layers hold in the
// sources, and the commands that only read or write images (inspect, convert,
// receive) never load the ptrace/userfaultfd capture addon.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BIN, sh } from './helpers/cli';
import { readSources, violations } from './helpers/layers';
import { generate } from './helpers/streams';
import { tmpDir } from './helpers/net';

const ROOT = path.resolve(__dirname, '..', '..');
const dir = tmpDir('layers');

test('the import rules catch a crossing, a codec doing I/O, and every import form', () => {
  const bad = violations([
    { file: 'capture/x.ts', text: "import type { ImageBlock } from '../receiver/image';" },
    { file: 'receiver/y.ts', text: "export { addon } from '../capture/addon';" },
    { file: 'format/z.ts', text: "import * as fs from 'node:fs';\nconst m = require('../io/output');" },
    { file: 'io/w.ts', text: "const n = await import('../net/client');" },
    { file: 'net/v.ts', text: "import '../receiver/server';" },
  ]);
  assert.is(bad.length, 6, bad.join('\n'));
  const ok = violations([{ file: 'receiver/ok.ts', text: "import { x } from '../format/bgsnap';\nimport { y } from '../io/sink';\nimport * as fs from 'node:fs';" }]);
  assert.equal(ok, []);
});

test('the sources keep the layer rules (format/ pure; capture/ and receiver/ never import each other)', () => {
  const sources = readSources(ROOT);
  assert.ok(sources.some((s) => s.file.startsWith('capture/')) && sources.some((s) => s.file.startsWith('receiver/')), 'no sources found');
  assert.equal(violations(sources), []);
});

// Records, at exit, every native module mapped into the process: what the
// kernel loaded, however it was reached (import, require, a dependency).
const PRELOAD = path.join(dir, 'record-maps.js');
fs.writeFileSync(PRELOAD, `process.on('exit', () => {
  const maps = require('fs').readFileSync('/proc/self/maps', 'utf8');
  const nodes = [...new Set(maps.split('\\n').map((l) => l.split(/\\s+/)[5] || '').filter((p) => p.endsWith('.node')))];
  require('fs').writeFileSync(process.env.BGSNAP_MAPS_OUT, nodes.map((p) => require('path').basename(p)).join('\\n'));
});\n`);

async function loadedAddons(name: string, command: string, input?: Buffer): Promise<string[]> {
  const out = path.join(dir, `${name}.maps`);
  const r = await sh(`BGSNAP_MAPS_OUT='${out}' NODE_OPTIONS='--require ${PRELOAD}' ${command}`, 60_000, input);
  assert.ok(r.code === 0, `${command}: exit ${r.code}\n${r.stderr}`);
  return fs.readFileSync(out, 'utf8').split('\n');
}

test('receive, inspect and convert load only the file-operations addon; capture loads the engine', async () => {
  const img = path.join(dir, 'img');
  const receive = await loadedAddons('receive', `${BIN.receive} -o '${img}'`, generate(7).stream);
  const inspect = await loadedAddons('inspect', `${BIN.inspect} '${img}' --verify`);
  const convert = await loadedAddons('convert', `${BIN.convert} '${img}' --to raw -o '${path.join(dir, 'raw')}'`);
  for (const [cmd, loaded] of Object.entries({ receive, inspect, convert })) {
    assert.not.ok(loaded.includes('bgsnap.node'), `${cmd} loaded the capture addon: ${loaded.join(', ')}`);
  }
  assert.ok(receive.includes('bgsnap_fileops.node'), `receive: ${receive.join(', ')}`); // it punches holes
  // The same probe sees the capture addon where it belongs, so the checks above can fail.
  const capture = await loadedAddons('capture', `${BIN.capture} --help`);
  assert.ok(capture.includes('bgsnap.node'), `capture: ${capture.join(', ')}`);
});

test.run();
