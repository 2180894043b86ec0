// How fast `bgsnap-convert IMAGE --to qemu -o -` feeds a reader, next to reading
// the same QEMU stream from a file (cat > /dev/null: the most any reader of
// QEMU's own snapshot file gets from the file itself), in the same invocation.
// The image comes from a generated QEMU stream (GiB of RAM, 20% zero pages).
// QEMU itself is not run here; see the README for the restore it gates.
//   node dist/bench/convert-throughput.js [--gib 2] [--dir DIR] [--before DIST/bin/bgsnap-convert.js]
import { spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { RamPartWriter, encodePreamble, encodeRamStart } from '../format/qemu-encode';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
}

// preamble, RAM START, one PART with every page (every 5th zero), EOF + description.
function generate(file: string, bytes: number): void {
  const blocks = [{ name: 'pc.ram', length: bytes }];
  const fd = fs.openSync(file, 'w');
  const w = (b: Buffer) => fs.writeSync(fd, b);
  w(encodePreamble('pc-i440fx-7.2'));
  w(encodeRamStart(blocks));
  const part = new RamPartWriter(blocks);
  w(part.begin());
  const pool = crypto.randomBytes(64 << 20);
  for (let p = 0; p < bytes / 4096; p++) {
    const idx = Uint32Array.of(p);
    const src = (p * 4096) % (pool.length - 4096);
    w(p % 5 === 0 ? part.zeros(0, idx) : part.pages(0, idx, pool.subarray(src, src + 4096)));
  }
  w(part.end());
  const json = Buffer.from(JSON.stringify({ page_size: 4096, devices: [] }));
  const vm = Buffer.alloc(5);
  vm[0] = 0x06;
  vm.writeUInt32BE(json.length, 1);
  w(Buffer.concat([Buffer.from([0x00]), vm, json]));
  fs.closeSync(fd);
}

function timed(cmd: string): number {
  const t = process.hrtime.bigint();
  const r = spawnSync('sh', ['-c', cmd], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} failed with ${r.status}`);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

function main(): void {
  const gib = Number(arg('--gib', '2'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-convbench-'));
  const stream = path.join(dir, 'qemu.stream');
  const bin = (n: string) => path.join(__dirname, '..', 'bin', `${n}.js`);
  try {
    generate(stream, gib * 1024 ** 3);
    timed(`${process.execPath} ${bin('bgsnap-receive')} -q -o ${dir}/img < ${stream}`);
    const rows: [string, number][] = [];
    rows.push(['cat QEMU stream file', timed(`cat ${stream} > /dev/null`)]);
    rows.push(['convert --to qemu', timed(`${process.execPath} ${bin('bgsnap-convert')} ${dir}/img --to qemu -o - | cat > /dev/null`)]);
    const before = arg('--before', '');
    if (before) rows.push(['convert (--before)', timed(`${process.execPath} ${before} ${dir}/img --to qemu -o - | cat > /dev/null`)]);
    const mb = fs.statSync(stream).size / 1e6;
    console.log(`load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')}; ${gib} GiB guest RAM, QEMU stream ${mb.toFixed(0)} MB`);
    for (const [name, s] of rows) console.log(`${name.padEnd(22)} ${s.toFixed(2).padStart(7)} s ${(mb / s).toFixed(0).padStart(6)} MB/s  ${(rows[0][1] / s).toFixed(2)}x of cat`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
