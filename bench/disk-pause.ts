// Where the pause of a whole-VM snapshot with disks goes. One TCG guest writing
// O_DIRECT records to a virtio disk (the vm-disks scenario: data ahead of its
// records, so the backup outlasts the pause), captured with --disks in turns by
// this build and by --before (another build's bin/bgsnap-capture.js, e.g.
// main's), all in one invocation on one VM. Per capture: pauseMs (our `stop`
// until the guest was seen running), QEMU's own downtime, and where the pause
// went (pauseSteps, this build only). Each round also takes a RAM-only
// snapshot (--no-disks): QEMU's downtime without disks on this machine now.
//   node dist/bench/disk-pause.js [--runs 3] [--disk-mb 160] [--qemu 7.2|10] [--before MAIN/dist/bin/bgsnap-capture.js]
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ensureGuest } from '../test/helpers/guest';
import { ensureQemu10 } from '../test/helpers/qemu10';
import { sleep, startVm } from '../test/helpers/vm';
import { BIN, sh } from '../test/helpers/cli';
import { arg, machine } from './args';

interface Row { who: string; pauseMs: number; downtimeMs: number; diskCopyMs: number; steps: string }

async function captureOnce(capture: string, qmpPath: string, dir: string, who: string, disks = '--disks'): Promise<Row> {
  const stats = path.join(dir, `${who}.json`);
  const image = path.join(dir, `${who}.img`);
  const r = await sh(`${capture} --qmp '${qmpPath}' ${disks} --stats '${stats}' | ${BIN.receive} -q -o '${image}'`, 600_000);
  if (r.code !== 0) throw new Error(`${who}: capture failed: ${r.stderr}`);
  const s = JSON.parse(fs.readFileSync(stats, 'utf8'));
  fs.rmSync(image, { recursive: true, force: true });
  const steps = s.pauseSteps ? Object.entries(s.pauseSteps).map(([k, v]) => `${k} ${v}`).join(', ') : '';
  return { who, pauseMs: s.pauseMs, downtimeMs: s.downtimeMs, diskCopyMs: s.diskCopyMs, steps };
}

async function main(): Promise<void> {
  const runs = Number(arg('--runs', '3'));
  const diskMb = Number(arg('--disk-mb', '160'));
  const before = arg('--before', '');
  const qemu = arg('--qemu', '7.2') === '10' ? await ensureQemu10() : undefined;
  const guest = await ensureGuest();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-bench-pause-'));
  const disk = path.join(dir, 'd0.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, `${diskMb}M`]);
  execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P 0x33 0 ${diskMb - 16}M`, disk]);
  const vm = await startVm({
    kernel: guest.kernel, initrd: guest.initrd, memMb: 256, guestMb: 16, qemu, startTimeoutMs: 60_000,
    append: `bgsnap.disk=1 bgsnap.disk_at=${diskMb - 10}`, extraArgs: ['-drive', `file=${disk},format=raw,if=virtio,id=d0`],
  });
  const rows: Row[] = [];
  try {
    await vm.waitForLine(/^disk=ok/, 180_000);
    console.log(`${machine()}; QEMU ${qemu?.version ?? '7.2'}, ${diskMb} MiB raw disk, 256 MiB guest (TCG)`);
    for (let i = 0; i < runs; i++) {
      rows.push(await captureOnce(BIN.capture, vm.qmpPath, dir, `this-${i}`));
      await sleep(2000);
      if (before) rows.push(await captureOnce(`'${process.execPath}' '${before}'`, vm.qmpPath, dir, `before-${i}`));
      await sleep(2000);
      rows.push(await captureOnce(BIN.capture, vm.qmpPath, dir, `ramonly-${i}`, '--no-disks'));
      await sleep(2000);
    }
  } finally {
    await vm.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  for (const r of rows) console.log(`${r.who.padEnd(10)} pause ${String(r.pauseMs ?? '-').padStart(5)} ms  QEMU downtime ${String(r.downtimeMs).padStart(5)} ms  disk copy ${r.diskCopyMs} ms  ${r.steps}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
