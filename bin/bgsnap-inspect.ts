#!/usr/bin/env node
// bgsnap-inspect IMAGE [--json]: what an image holds: status, source, blocks,
// page counts and sizes; for a chain, every generation (instant, pages and
// bytes it stored, complete or why not) and the blocks of one of them
// (--generation K; default the latest complete one that is not a pre-copy
// pass: a pass is marked "pass" and is not a snapshot). --verify re-reads every stored
// page (of every generation) against the CRC32 recorded when it was received;
// exits 3 if any differs or the image (generation) is incomplete.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Command } from 'commander';
import { ImageReader } from '../receiver/image-reader';
import { latestSnapshot, noSnapshot } from '../receiver/chain-reader';
import { main, parseIntArg } from './common';

const prog = new Command('bgsnap-inspect')
  .description('show what a bgsnap image holds')
  .argument('<image>', 'image directory')
  .option('--json', 'print JSON')
  .option('--verify', 're-check every stored page against its recorded checksum')
  .option('--generation <K>', 'a chain: show generation K (default: the latest complete one that is not a pre-copy pass)', parseIntArg('--generation'))
  .parse();
const opts = prog.opts<{ json?: boolean; verify?: boolean; generation?: number }>();

async function describe(img: ImageReader) {
  const blocks = [];
  for (let b = 0; b < img.blocks.length; b++) {
    const m = await img.pages(b);
    const present = m.present.count();
    const data = m.data.count();
    const { name, address, length, pages } = img.blocks[b];
    blocks.push({ name, address, length, pages, present, dataPages: data, zeroPages: present - data, discardedPages: m.discarded.count() });
  }
  // A chain's data is every generation's file: sizes are their sum.
  const files = img.chain ? img.generations.map((r) => r.file) : ['data'];
  const stats = files.map((f) => fs.statSync(path.join(img.dir, f)));
  const st = { size: Math.max(...stats.map((x) => x.size)), blocks: stats.reduce((n, x) => n + x.blocks, 0) };
  const chain = img.chainStatus ?? img.status;
  return {
    image: img.dir, status: chain.status, reason: chain.reason, ...chainFields(img), snapshotId: img.header?.snapshotId, source: img.header?.source,
    label: img.header?.label, created: img.header ? new Date(img.header.created).toISOString() : undefined, pageSize: img.format.pageSize,
    imageSize: st.size, imageBytesOnDisk: st.blocks * 512, states: await img.stateKinds(), totals: await img.totals(), blocks,
    drives: await img.drives(),
  };
}

// A chain's generations, and which one `blocks` shows.
function chainFields(img: ImageReader) {
  if (!img.chain) return {};
  const generations = img.generations.map((r) => ({
    generation: r.generation, instant: new Date(r.instant).toISOString(), instantMs: r.instant, status: r.status, reason: r.reason,
    pages: r.pages, dataPages: r.dataPages, zeroPages: r.zeroPages, discardedPages: r.discardedPages, dataBytes: r.dataBytes,
    diskBytes: r.diskBytes, blocksAdded: r.added.length, blocksRemoved: r.removed.length, file: r.file, ...(r.pass ? { pass: true } : {}),
  }));
  // Which generation is the snapshot (null: none complete), and why not when pre-copy passes are all there is.
  const none = noSnapshot(img.generations);
  return { generation: img.chain.generation, snapshotGeneration: latestSnapshot(img.generations)?.generation ?? null, noSnapshot: none || undefined, generations };
}

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function print(d: Awaited<ReturnType<typeof describe>>): void {
  const lines = [
    `image     ${d.image}`,
    `status    ${d.status}${d.reason ? ` (${d.reason})` : ''}`,
    `snapshot  ${d.snapshotId} from ${d.source} "${d.label}" at ${d.created}`,
    `size      ${mib(d.imageSize)} apparent, ${mib(d.imageBytesOnDisk)} on disk`,
    `states    ${d.states.join(', ') || '-'}`,
    `blocks    ${d.blocks.length}`,
  ];
  if (d.generations) {
    const passes = d.generations.filter((g) => g.pass).length;
    lines.push(`chain     ${d.generations.length} generations${passes ? ` (${passes} pre-copy passes)` : ''}; blocks below are generation ${d.generation}'s`);
    if (d.noSnapshot) lines.push(`          ${d.noSnapshot}`);
    for (const g of d.generations) {
      lines.push(`  gen ${String(g.generation).padEnd(4)} ${g.instant}  ${g.status.padEnd(10)} ${g.pass ? 'pass ' : passes ? '     ' : ''}${String(g.pages).padStart(8)} pages (${g.dataPages} data), ` +
        `${mib(g.dataBytes)} data, ${mib(g.diskBytes)} on disk, +${g.blocksAdded}/-${g.blocksRemoved} blocks${g.reason ? `  (${g.reason})` : ''}`);
    }
  }
  if (d.drives.length) lines.push(`drives    ${d.drives.map((v) => `${v.id} (${mib(v.size)}, ${v.file})`).join(', ')}`);
  for (const b of d.blocks) {
    lines.push(`  ${b.name.padEnd(28)} ${('0x' + b.address.toString(16)).padStart(14)} ${mib(b.length).padStart(12)}  ` +
      `${b.present}/${b.pages} pages: ${b.dataPages} data, ${b.zeroPages} zero${b.discardedPages ? `, ${b.discardedPages} discarded` : ''}`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

async function verify(img: ImageReader): Promise<number> {
  const v = await img.verify();
  const ok = v.badCount === 0 && v.unchecked === 0 && img.complete;
  const what = `${v.dataPages} data pages checked, ${v.zeroPages} zero pages checked, ${v.unchecked} without checksum, ${v.badCount} bad`;
  if (opts.json) process.stdout.write(JSON.stringify({ image: img.dir, status: img.status.status, ok, ...v }, null, 2) + '\n');
  else process.stdout.write(`verify    ${ok ? 'OK' : 'FAILED'}: ${what}${img.complete ? '' : ' (image is incomplete)'}\n${v.bad.map((b) => `  ${b}\n`).join('')}`);
  return ok ? 0 : 3;
}

main('bgsnap-inspect', async () => {
  const img = await ImageReader.open(prog.args[0], { generation: opts.generation });
  try {
    if (opts.verify) return await verify(img);
    const d = await describe(img);
    if (opts.json) process.stdout.write(JSON.stringify(d, null, 2) + '\n');
    else print(d);
  } finally {
    await img.close();
  }
});
