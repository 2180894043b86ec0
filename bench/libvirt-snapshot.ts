// Whole-VM snapshot of a libvirt domain (issue 9's bench): a TCG guest of 2 GiB
// (default) with a 4 GiB raw disk holding 1 GiB of data, on a private libvirtd
// (test/helpers/libvirt.ts), the guest writing to its disk and memory all the
// time. In each round, on the same running domain, one after the other:
//   - bgsnap: `bgsnap-capture --domain --disks | bgsnap-receive` (RAM, devices, disk);
//   - QEMU's own background snapshot, RAM and devices only, into a file
//     (capture/qemu-source.ts through libvirt: the same QMP commands);
//   - libvirt's external live snapshot: `virsh snapshot-create-as --live
//     --memspec ... --diskspec vda,snapshot=external` (memory file plus a qcow2
//     overlay), then `virsh blockcommit --active --pivot` to put the disk back
//     as it was, timed apart: bgsnap leaves nothing to merge.
// Pause is QEMU's own: from its STOP event to its RESUME event (QEMU's
// timestamps, seen through `virsh qemu-monitor-event`), the same clock for all.
//   node dist/bench/libvirt-snapshot.js [--mem-mb 2048] [--disk-gib 4] [--data-gib 1] [--rounds 1]
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { LibvirtQmp } from '../capture/libvirt-qmp';
import { openQemuSnapshot } from '../capture/qemu-source';
import type { QmpEvent } from '../capture/qmp';
import { ensureGuest } from '../test/helpers/guest';
import { domainXml, logLines, startLibvirtd, type Libvirtd } from '../test/helpers/libvirt';
import { BIN } from '../test/helpers/cli';
import { arg, machine, range } from './args';

interface Row { pauseMs: number[]; totalS: number[]; extra: string[] }
const NAME = 'bgsnap-bench';

const ts = (e: QmpEvent) => (e.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : NaN);

// QEMU's STOP-to-RESUME spans among the events since `from`, summed.
function pauses(ev: QmpEvent[], from: number): number {
  let total = 0;
  let stop: number | null = null;
  for (const e of ev.slice(from)) {
    if (e.event === 'STOP') stop = ts(e);
    if (e.event === 'RESUME' && stop !== null) (total += ts(e) - stop), (stop = null);
  }
  return total;
}

function sh(cmd: string): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn('sh', ['-c', cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('close', (code) => resolve({ code, stderr }));
  });
}

async function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = Date.now();
  const v = await f();
  return [v, (Date.now() - t0) / 1000];
}

async function bgsnap(lv: Libvirtd, dir: string, row: Row): Promise<void> {
  const img = path.join(dir, 'bgsnap.img');
  const stats = path.join(dir, 'cap.json');
  const [r, s] = await timed(() => sh(`${BIN.capture} --domain ${NAME} --connect '${lv.uri}' --disks --stats ${stats} | ${BIN.receive} -q -o ${img}`));
  if (r.code !== 0) throw new Error(`bgsnap failed: ${r.stderr}`);
  const st = JSON.parse(fs.readFileSync(stats, 'utf8'));
  row.totalS.push(s);
  row.extra.push(`pauseMs (bgsnap's) ${st.pauseMs}, QEMU downtime ${st.downtimeMs} ms, disk copy ${st.diskCopyMs} ms`);
  fs.rmSync(img, { recursive: true, force: true });
}

async function qemuOwn(lv: Libvirtd, dir: string, row: Row): Promise<void> {
  const file = path.join(dir, 'qemu.stream');
  const qmp = await LibvirtQmp.connect(NAME, lv.uri, { events: false });
  try {
    const [res, s] = await timed(async () => {
      const snap = await openQemuSnapshot(qmp.path, { qmp });
      const out = fs.createWriteStream(file);
      await Promise.all([new Promise<void>((ok, ko) => snap.stream.pipe(out).on('finish', () => ok()).on('error', ko)), snap.done]);
      return snap.done;
    });
    row.totalS.push(s);
    row.extra.push(`QEMU downtime ${res.downtimeMs} ms`);
  } finally {
    qmp.close();
    fs.rmSync(file, { force: true });
  }
}

async function libvirtExternal(lv: Libvirtd, dir: string, base: string, row: Row): Promise<void> {
  const mem = path.join(dir, 'lv.mem');
  const overlay = path.join(dir, 'lv.qcow2');
  const args = ['snapshot-create-as', NAME, `s${Date.now()}`, '--no-metadata', '--live', '--atomic',
    '--memspec', `file=${mem},snapshot=external`, '--diskspec', `vda,snapshot=external,file=${overlay}`];
  const [, s] = await timed(async () => lv.virsh(args));
  row.totalS.push(s);
  const [, c] = await timed(async () => lv.virsh(['blockcommit', NAME, 'vda', '--active', '--pivot', '--wait']));
  const back = lv.virsh(['domblklist', NAME]).includes(base);
  row.extra.push(`then blockcommit --active --pivot ${c.toFixed(1)} s (disk back on its base: ${back})`);
  fs.rmSync(mem, { force: true });
  fs.rmSync(overlay, { force: true });
}

async function main(): Promise<void> {
  const memMb = Number(arg('--mem-mb', '2048'));
  const diskGib = Number(arg('--disk-gib', '4'));
  const dataGib = Number(arg('--data-gib', '1'));
  const rounds = Number(arg('--rounds', '1'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bgsnap-bench-lv-'));
  const g = await ensureGuest();
  const lv = await startLibvirtd();
  // Interrupted, the daemon and its QEMU still go (helpers/libvirt.ts, on exit).
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => process.exit(130));
  try {
    const disk = path.join(dir, 'vda.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', disk, `${diskGib}G`]);
    execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${dataGib}G`, disk]);
    const serial = path.join(dir, 'serial.log');
    const cmdline = `console=ttyS0 quiet panic=-1 bgsnap.mb=${Math.floor(memMb / 4)} bgsnap.tick_ms=300 bgsnap.disk=1 bgsnap.disk_at=${dataGib * 1024 + 16}`;
    fs.writeFileSync(path.join(dir, 'dom.xml'), domainXml({ name: NAME, kernel: g.kernel, initrd: g.initrd, cmdline, memMb, disk, serialLog: serial }));
    lv.virsh(['define', path.join(dir, 'dom.xml')]);
    lv.virsh(['start', NAME]);
    for (let i = 0; i < 1800 && !logLines(serial).some((l) => l.startsWith('disk=ok')); i++) await new Promise((r) => setTimeout(r, 200));
    const events = await LibvirtQmp.connect(NAME, lv.uri);
    const rows: Row[] = [];
    const contenders: [string, (row: Row) => Promise<void>][] = [
      ['bgsnap --domain --disks (RAM, devices, disk)', (row) => bgsnap(lv, dir, row)],
      ['QEMU background snapshot (RAM, devices)', (row) => qemuOwn(lv, dir, row)],
      ['virsh snapshot-create-as --live --memspec (external)', (row) => libvirtExternal(lv, dir, disk, row)],
    ];
    for (const _ of contenders) rows.push({ pauseMs: [], totalS: [], extra: [] });
    for (let r = 0; r < rounds; r++) {
      for (const [i, [, run]] of contenders.entries()) {
        const from = events.events.length;
        await run(rows[i]);
        await new Promise((res) => setTimeout(res, 2000)); // the last events arrive through virsh
        rows[i].pauseMs.push(pauses(events.events, from));
        // As it goes: a round of the full size takes minutes on a loaded machine.
        console.log(`round ${r + 1}, ${contenders[i][0]}: pause ${rows[i].pauseMs.at(-1)!.toFixed(0)} ms, total ${rows[i].totalS.at(-1)!.toFixed(2)} s, ${rows[i].extra.at(-1)}`);
      }
    }
    events.close();
    const bad = logLines(serial).filter((l) => /disk=FAIL|check=FAIL/.test(l));
    console.log(`libvirt whole-VM snapshot: ${memMb} MiB guest, ${diskGib} GiB raw disk (${dataGib} GiB data), ${rounds} round(s); ${machine()}`);
    console.log(`guest checks during the run: ${bad.length ? `FAILED: ${bad.slice(0, 3).join(' | ')}` : 'all ok'}`);
    rows.forEach((row, i) => {
      console.log(`${contenders[i][0]}\n  pause (QEMU STOP->RESUME) ${range(row.pauseMs)} ms, total ${range(row.totalS, 2)} s`);
      for (const e of row.extra) console.log(`  ${e}`);
    });
  } finally {
    await lv.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().then(() => process.exit(0), (e: Error) => (console.error(e), process.exit(1)));
