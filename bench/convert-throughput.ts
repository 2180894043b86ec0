// How fast `bgsnap-convert IMAGE --to qemu -o -` feeds a reader through a pipe,
// next to the same QEMU stream from its file, all in one invocation, rounds
// in rotating order:
//   - cat FILE | cat > /dev/null: what -incoming exec:cat FILE gives QEMU;
//   - cat FILE > /dev/null: the file read alone, which bounds file:FILE;
//   - convert into the pipe (pages spliced by reference, receiver/convert-qemu.ts);
//   - the same with BGSNAP_FEED=copy (pages read into records and written);
//   - optionally another build's convert (--before DIST/bin/bgsnap-convert.js).
// The image comes from a generated QEMU stream (GiB of RAM, 20% zero pages).
// QEMU itself is not run here; bench/restore-qemu.ts times the restore.
//   node dist/bench/convert-throughput.js [--gib 2] [--rounds 3] [--dir DIR] [--before DIST/bin/bgsnap-convert.js]
import { spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { RamPartWriter, encodePreamble, encodeRamStart } from '../format/qemu-encode';
import { range } from './args';

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

// Wall seconds, and CPU seconds of every process of the pipeline (bash's
// `times`: its children's user and system time), which others' load on the
// machine disturbs much less than the wall time.
function timed(cmd: string): { s: number; cpu: number } {
  const t = process.hrtime.bigint();
  // pipefail: a convert that fails inside a pipeline must fail the run.
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', `${cmd} && times >&2`], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
  const s = Number(process.hrtime.bigint() - t) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} failed with ${r.status}: ${r.stderr}`);
  const m = /(\d+)m([\d.]+)s (\d+)m([\d.]+)s\s*$/.exec(r.stderr); // the children's line, the last
  return { s, cpu: m ? 60 * Number(m[1]) + Number(m[2]) + 60 * Number(m[3]) + Number(m[4]) : NaN };
}

function main(): void {
  const gib = Number(arg('--gib', '2'));
  const rounds = Number(arg('--rounds', '3'));
  const dir = fs.mkdtempSync(path.join(arg('--dir', os.tmpdir()), 'bgsnap-convbench-'));
  const stream = path.join(dir, 'qemu.stream');
  const bin = (n: string) => path.join(__dirname, '..', 'bin', `${n}.js`);
  const convert = (js: string, env = '') => `${env} ${process.execPath} ${js} ${dir}/img --to qemu -o - | cat > /dev/null`;
  try {
    generate(stream, gib * 1024 ** 3);
    timed(`${process.execPath} ${bin('bgsnap-receive')} -q -o ${dir}/img < ${stream}`);
    const row = (name: string, cmd: string) => ({ name, cmd, s: [] as number[], cpu: [] as number[] });
    const rows = [
      row('cat FILE | cat', `cat ${stream} | cat > /dev/null`),
      row('cat FILE > /dev/null', `cat ${stream} > /dev/null`),
      row('convert (splice) | cat', convert(bin('bgsnap-convert'))),
      row('convert (copy) | cat', convert(bin('bgsnap-convert'), 'BGSNAP_FEED=copy')),
    ];
    const before = arg('--before', '');
    if (before) rows.push(row('convert (--before) | cat', convert(before)));
    const load0 = os.loadavg();
    for (let r = 0; r < rounds; r++) for (let k = 0; k < rows.length; k++) {
      const c = rows[(k + r) % rows.length];
      const t = timed(c.cmd);
      c.s.push(t.s);
      c.cpu.push(t.cpu);
    }
    const mb = fs.statSync(stream).size / 1e6;
    const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    console.log(`load average ${load0.map((l) => l.toFixed(1)).join(' ')} before, ${os.loadavg().map((l) => l.toFixed(1)).join(' ')} after; ${gib} GiB guest RAM, QEMU stream ${mb.toFixed(0)} MB, ${rounds} rounds`);
    for (const c of rows) {
      console.log(`${c.name.padEnd(26)} ${range(c.s, 2).padStart(22)} s ${(mb / med(c.s)).toFixed(0).padStart(6)} MB/s  ${(med(rows[0].s) / med(c.s)).toFixed(2)}x of cat | cat; ` +
        `CPU ${range(c.cpu, 2)} s`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
