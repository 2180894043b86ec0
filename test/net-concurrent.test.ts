// Many captures into one receiver at once, over real loopback sockets: a real
// `bgsnap-capture --pid --to` next to relayed generated streams, all complete
// and verified; a stalled sender does not hold up the others and is dropped by
// the idle timeout; the stream limit refuses the sender over it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BgsnapEncoder } from '../format/bgsnap';
import { NetOutput } from '../net/client';
import { ImageReader } from '../receiver/image-reader';
import { BIN, run } from './helpers/cli';
import { generate, makeHeader } from './helpers/streams';
import { dirEntries, relay, startReceiver, tmpDir, writeToken, waitFor } from './helpers/net';
import { checkInvariant, startTarget } from './process-target';

const work = tmpDir('net-conc');
const token = writeToken(work);
const auth = ['--insecure', '--token-file', token];

async function verify(image: string): Promise<void> {
  const v = await run(BIN.inspect, ['--verify', image]);
  assert.is(v.code, 0, `${image}: ${v.stdout}${v.stderr}`);
}

async function regionConsistent(image: string, base: number, size: number): Promise<void> {
  const img = await ImageReader.open(image);
  try {
    const bi = img.blocks.findIndex((b) => b.address <= base && base + size <= b.address + b.pages * 4096);
    assert.ok(bi >= 0, 'target region in the image');
    const region = Buffer.alloc(size);
    img.readPages(bi, (base - img.blocks[bi].address) / 4096, size / 4096, region);
    const inv = checkInvariant(region);
    assert.ok(inv.ok, inv.detail);
  } finally {
    await img.close();
  }
}

test('four concurrent captures (one real --pid) into one receiver: all complete and verified', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, [...auth, '--max-streams', '4']);
  const t = await startTarget('anon', 64, 3);
  try {
    const pidRun = run(BIN.capture, ['--pid', String(t.pid), '--to', rx.url, ...auth, '--name', 'pid', '--buffer-mb', '16'], 90_000);
    const relays = [51, 52, 53].map((seed) => relay(generate(seed, { compressLevel: seed === 52 ? 3 : undefined }).stream, rx.url, [...auth, '--name', `gen${seed}`]));
    const results = await Promise.all([pidRun, ...relays]);
    results.forEach((r, i) => assert.is(r.code, 0, `capture ${i}: ${r.stderr}`));
    assert.equal(dirEntries(root), ['gen51', 'gen52', 'gen53', 'pid']);
    for (const name of dirEntries(root)) await verify(path.join(root, name));
    await regionConsistent(path.join(root, 'pid'), t.base, t.size);
    assert.match(await t.command('check'), /^check ok/);
  } finally {
    t.kill();
    await rx.kill();
  }
});

test('a stalled sender does not hold up others and is dropped at the idle timeout; over the limit is refused', async () => {
  const root = tmpDir('root');
  const rx = await startReceiver(root, [...auth, '--max-streams', '2', '--idle-timeout', '2']);
  process.env.BGSNAP_TOKEN = fs.readFileSync(token, 'utf8');
  try {
    // Connected, header sent, then silent: its image exists and is in flight.
    const stalled = await NetOutput.connect({ to: rx.url, insecure: true, name: 'stalled' });
    const enc = new BgsnapEncoder();
    await stalled.write(enc.magic());
    for (const p of enc.header(makeHeader())) await stalled.write(p);
    await waitFor(() => fs.existsSync(path.join(root, 'stalled', 'index')), 5000, 'the stalled image');
    const held = await NetOutput.connect({ to: rx.url, insecure: true, name: 'held' });
    const over = await relay(generate(61).stream, rx.url, [...auth, '--name', 'over']);
    assert.is.not(over.code, 0);
    assert.match(over.stderr, /refused the capture \(BUSY\): the receiver is at its limit of 2 concurrent streams/);
    held.destroy(); // frees its slot; the stalled one keeps its own
    await new Promise((r) => setTimeout(r, 300));
    const ok = await relay(generate(62).stream, rx.url, [...auth, '--name', 'ok']);
    assert.is(ok.code, 0, ok.stderr);
    const err = await stalled.close().then(() => undefined, (e: Error) => e);
    assert.match(String(err?.message), /image incomplete: no data from the sender for 2 s/);
    const img = await ImageReader.open(path.join(root, 'stalled'));
    assert.is(img.status.status, 'incomplete');
    assert.match(img.status.reason, /no data from the sender for 2 s/);
    await img.close();
    await verify(path.join(root, 'ok'));
    assert.ok(!dirEntries(root).includes('over'));
  } finally {
    await rx.kill();
  }
});

test.after(() => fs.rmSync(work, { recursive: true, force: true }));
test.run();
