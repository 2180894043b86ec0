// A QEMU VM snapshotted straight to a remote receiver: `bgsnap-capture --qmp
// --to tcp://` over mutual TLS into `bgsnap-receive --listen`, acknowledged only
// once durable; the remote image verifies page by page and restores in a fresh,
// unmodified QEMU at the snapshot point.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ensureGuest, type Guest } from './helpers/guest';
import { startVm, waitForResume, type Vm, type VmOptions } from './helpers/vm';
import { BIN, run } from './helpers/cli';
import { makePki, startReceiver, tmpDir, type ReceiverProc } from './helpers/net';

const ctx: { guest?: Guest; vm?: Vm; rx?: ReceiverProc; dir?: string } = {};

function vmOptions(extra: Partial<VmOptions> = {}): VmOptions {
  return { kernel: ctx.guest!.kernel, initrd: ctx.guest!.initrd, memMb: 256, guestMb: 48, ...extra };
}

test.before(async () => {
  ctx.guest = await ensureGuest();
  ctx.dir = tmpDir('vmnet');
});

test.after(async () => {
  await ctx.vm?.kill();
  await ctx.rx?.kill();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

test('capture --qmp --to tcp:// with mutual TLS: durable remote image that restores', async () => {
  const pki = makePki(ctx.dir!);
  const root = path.join(ctx.dir!, 'root');
  fs.mkdirSync(root);
  ctx.rx = await startReceiver(root, ['--cert', pki.serverCert, '--key', pki.serverKey, '--ca', pki.ca]);
  const vm = (ctx.vm = await startVm(vmOptions()));
  await vm.waitForTicks(2, 90_000);
  const lastBefore = vm.ticks().at(-1)!.n;
  const r = await run(BIN.capture, ['--qmp', vm.qmpPath, '--to', ctx.rx.url, '--name', 'vm1', '--ca', pki.ca, '--cert', pki.clientCert, '--key', pki.clientKey,
    '--compress', '1'], 120_000);
  assert.is(r.code, 0, r.stderr);
  const window = { lastBefore, lastEnd: vm.ticks().at(-1)!.n };
  await vm.kill();
  const image = path.join(root, 'vm1');
  const v = await run(BIN.inspect, [image, '--verify']);
  assert.is(v.code, 0, v.stderr + v.stdout);
  const incoming = `exec:${BIN.convert} '${image}' --to qemu -o -`;
  ctx.vm = await startVm(vmOptions({ incoming }));
  const ticks = await waitForResume(ctx.vm, window, 3, 120_000);
  assert.ok(ticks.every((t) => t.ok));
});

test.run();
