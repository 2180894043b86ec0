// A guest that dirties memory faster than precopy can converge, migrated with
// QEMU's ordinary precopy straight into bgsnap-receive (migrate exec:, no bgsnap
// on the sending side): the stream grows to several times the RAM while the
// image stays no larger than the RAM. Once QEMU is allowed to converge, the image
// is complete, holds exactly the last copy of every page the stream carried
// (checked against an independent reading of the teed raw stream) and restores:
// a fresh QEMU loads it and, migrated out again, gives back exactly that RAM.
// QEMU 7.2's own TCG precopy can leave the guest inconsistent (a stale hot page;
// we also saw the restored guest kernel panic), so RAM equality with the stream,
// not the guest's behaviour after it, is the criterion.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { sleep, startVm, type Vm, type VmOptions } from './helpers/vm';
import { BIN, run } from './helpers/cli';
import { lastCopyRam } from './helpers/qemu-ram-oracle';
import { tmpDir } from './helpers/net';

const RAM = 128 << 20;
const ctx: { guest?: Guest; vm?: Vm; dir?: string; ram?: Buffer } = {};
type Info = { status?: string; ram?: { transferred: number } };

function vmOptions(extra: Partial<VmOptions> = {}): VmOptions {
  return { kernel: ctx.guest!.kernel, initrd: ctx.guest!.initrd, memMb: 128, guestMb: 32, ...extra };
}

test.before(async () => {
  ctx.guest = await ensureGuest();
  ctx.dir = tmpDir('precopy');
});

test.after(async () => {
  await ctx.vm?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

async function waitFor(vm: Vm, until: (i: Info) => boolean, ms: number): Promise<Info> {
  const end = Date.now() + ms;
  for (;;) {
    const info = await vm.qmp.execute<Info>('query-migrate');
    if (until(info) || Date.now() > end) return info;
    await sleep(200);
  }
}

test('precopy that does not converge: stream several times the RAM, image no larger than the RAM', async () => {
  const vm = (ctx.vm = await startVm(vmOptions()));
  await vm.waitForTicks(2, 90_000);
  const raw = path.join(ctx.dir!, 'precopy.qemu');
  const image = path.join(ctx.dir!, 'precopy.img');
  const stats = path.join(ctx.dir!, 'stats.json');
  await vm.qmp.execute('migrate-set-parameters', { 'downtime-limit': 1 });
  await vm.qmp.execute('migrate', { uri: `exec:tee '${raw}' | ${BIN.receive} -o '${image}' --stats '${stats}'` });
  const grown = await waitFor(vm, (i) => (i.ram?.transferred ?? 0) > 3 * RAM || !['setup', 'active'].includes(i.status ?? ''), 60_000);
  assert.is(grown.status, 'active', 'precopy must still be running: the guest dirties faster than it converges');
  await vm.qmp.execute('migrate-set-parameters', { 'downtime-limit': 20_000 });
  const done = await waitFor(vm, (i) => !['setup', 'active', 'device'].includes(i.status ?? ''), 60_000);
  assert.is(done.status, 'completed');
  for (let i = 0; i < 100 && !fs.existsSync(stats); i++) await sleep(100);
  const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
  const streamBytes = fs.statSync(raw).size;
  process.stderr.write(`precopy: stream ${(streamBytes / 1048576).toFixed(0)} MiB for ${RAM >> 20} MiB RAM, ${s.pagesReceived} page records, ` +
    `${s.duplicatePages} duplicates dropped, image ${(s.imageBytes / 1048576).toFixed(1)} MiB on disk\n`);
  assert.is(s.status, 'complete', s.reason);
  assert.is(s.streamBytes, streamBytes);
  assert.ok(streamBytes > 3 * RAM, `stream ${streamBytes} bytes`);
  assert.ok(s.duplicatePages > RAM / 4096, `${s.duplicatePages} duplicate pages dropped`);
  assert.ok(s.imageBytes <= RAM + (1 << 20), `image holds ${s.imageBytes} bytes on disk for ${RAM} bytes of RAM`);
  await vm.kill();
  ctx.vm = undefined;

  const out = path.join(ctx.dir!, 'ram.raw');
  const r = await run(BIN.convert, [image, '--to', 'raw', '-o', out]);
  assert.is(r.code, 0, r.stderr);
  const oracle = lastCopyRam(fs.readFileSync(raw), 'pc.ram', RAM);
  assert.is(oracle.records, s.pagesReceived, 'both readings count the same page records');
  assert.ok(fs.readFileSync(out).equals(oracle.ram), 'image RAM equals the last copy of every page in the stream');
  ctx.ram = oracle.ram;
  fs.rmSync(raw);
  fs.rmSync(out);
});

test('the converged precopy image restores: QEMU loads it and holds exactly its RAM', async () => {
  assert.ok(ctx.ram, 'needs the previous test');
  const incoming = `exec:${BIN.convert} '${path.join(ctx.dir!, 'precopy.img')}' --to qemu -o -`;
  const vm = (ctx.vm = await startVm(vmOptions({ incoming, extraArgs: ['-S'] })));
  const loaded = await waitForStatus(vm, (st) => st === 'paused', 60_000);
  assert.is(loaded, 'paused', 'the destination loaded the stream and waits paused (-S)');
  const back = path.join(ctx.dir!, 'back.qemu');
  await vm.qmp.execute('migrate', { uri: `exec:cat > '${back}' && touch '${back}.done'` });
  const done = await waitFor(vm, (i) => !['setup', 'active', 'device'].includes(i.status ?? ''), 60_000);
  assert.is(done.status, 'completed');
  for (let i = 0; i < 100 && !fs.existsSync(`${back}.done`); i++) await sleep(100);
  const again = lastCopyRam(fs.readFileSync(back), 'pc.ram', RAM);
  assert.ok(again.ram.equals(ctx.ram!), 'the restored VM holds exactly the RAM of the image');
});

async function waitForStatus(vm: Vm, ok: (status: string) => boolean, ms: number): Promise<string> {
  const end = Date.now() + ms;
  for (;;) {
    const { status } = await vm.qmp.execute<{ status: string }>('query-status');
    if (ok(status) || Date.now() > end) return status;
    await sleep(200);
  }
}

test.run();
