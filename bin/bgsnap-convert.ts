#!/usr/bin/env node
// bgsnap-convert IMAGE --to qemu|qemu-mapped-ram|raw|elf-core|disk -o OUT: replays an image as a QEMU migration
// stream (OUT "-" is stdout, for -incoming "exec:bgsnap-convert IMAGE --to qemu -o -"),
// as QEMU's mapped-ram migration file (QEMU >= 9.0: -incoming defer, mapped-ram
// capability on, migrate-incoming file:OUT),
// as flat memory, as one drive's sparse raw disk (--to disk --drive ID), or
// (process images) as an ELF core file for gdb. Refuses incomplete
// images unless --allow-incomplete. A chain image (format/SPEC.md, "Chains of generations")
// gives generation K with --generation K, by default its latest complete one
// that is not a pre-copy pass (a pass is never converted: it is no snapshot).
import { Command, Option } from 'commander';
import { ImageReader } from '../receiver/image-reader';
import { noSnapshot } from '../receiver/chain-reader';
import { PipeFeed, convertToQemu } from '../receiver/convert-qemu';
import { convertToMappedRam } from '../receiver/convert-mapped-ram';
import { convertToRaw } from '../receiver/convert-raw';
import { convertToElfCore } from '../receiver/convert-elf';
import { convertToDisk } from '../receiver/convert-disk';
import { Output } from '../io/output';
import { main, parseIntArg } from './common';
import { writePrivateFile } from '../io/private-file';

const prog = new Command('bgsnap-convert')
  .description('convert a bgsnap image into a QEMU migration stream, raw memory or an ELF core file')
  .addHelpText('after', `
--to qemu-mapped-ram writes QEMU's mapped-ram migration file (QEMU 9.0 or later), restored with
  qemu-system-x86_64 ... -incoming defer   then over QMP:
  migrate-set-capabilities {"capabilities":[{"capability":"mapped-ram","state":true},{"capability":"multifd","state":true}]}
  migrate-set-parameters {"multifd-channels":4}      (multifd optional: pages load in parallel)
  migrate-incoming {"uri":"file:OUT"}`)
  .argument('<image>', 'image directory')
  .addOption(new Option('--to <format>', 'output format').choices(['qemu', 'qemu-mapped-ram', 'raw', 'elf-core', 'disk']).makeOptionMandatory())
  .requiredOption('-o, --output <file>', 'output file ("-" for stdout with --to qemu)')
  .option('--block <name>', 'with --to raw: write only this block')
  .option('--drive <id>', 'with --to disk: the drive to write (its -drive id; bgsnap-inspect lists them)')
  .option('--generation <K>', 'a chain image: materialise generation K (default: the latest complete one that is not a pre-copy pass)', parseIntArg('--generation'))
  .option('--allow-incomplete', 'convert an image (or generation) that is marked incomplete')
  .option('--force', 'replace an existing output file (never a symbolic link)')
  .parse();

const opts = prog.opts<{ to: string; output: string; block?: string; drive?: string; generation?: number; allowIncomplete?: boolean; force?: boolean }>();
// Outputs hold the snapshot's memory: created 0600, never through a symbolic link.
const create = { force: opts.force };

async function convert(img: ImageReader): Promise<void> {
  if (opts.to === 'qemu') {
    // Into a pipe (QEMU's exec: migration), pages go in by reference.
    const pipe = opts.output === '-' ? PipeFeed.open(1) : undefined;
    const out = pipe ?? Output.open(opts.output, create);
    await convertToQemu(img, out);
    if (out instanceof Output) await out.close();
  } else if (opts.to === 'qemu-mapped-ram') {
    if (opts.output === '-') throw new Error('--to qemu-mapped-ram writes a file QEMU reads at offsets; give a file name, not "-"');
    await convertToMappedRam(img, opts.output, create);
  } else if (opts.to === 'disk') {
    if (opts.output === '-') throw new Error('--to disk writes a sparse file; give a file name, not "-"');
    if (!opts.drive) throw new Error('--to disk needs --drive ID (bgsnap-inspect lists the drives)');
    await convertToDisk(img, opts.drive, opts.output, create);
  } else if (opts.to === 'elf-core') {
    if (opts.output === '-') throw new Error('--to elf-core writes a sparse file; give a file name, not "-"');
    const core = await convertToElfCore(img, opts.output, create); // refuses QEMU images: they have no threads or mappings
    for (const w of core.warnings) process.stderr.write(`bgsnap-convert: warning: ${w}\n`);
  } else {
    if (opts.output === '-') throw new Error('--to raw writes a sparse file; give a file name, not "-"');
    const layout = await convertToRaw(img, opts.output, opts.block, create);
    if (layout.length > 1) writePrivateFile(`${opts.output}.map.json`, JSON.stringify(layout, null, 2) + '\n', create);
  }
}

// An incomplete image (or generation) only with --allow-incomplete. A chain
// whose passes arrived but whose snapshot did not has no snapshot: a pass is
// never converted (its pages are from different moments); the cut snapshot
// generation is, with --allow-incomplete, with a warning that where it is
// missing pages the passes' stand in.
function refuseIncomplete(img: ImageReader): void {
  const what = img.chain ? `generation ${img.chain.generation} of image ${img.dir}` : `image ${img.dir}`;
  const none = noSnapshot(img.generations);
  if (img.chain?.record.pass) throw new Error(`image ${img.dir}: nothing to convert: ${none}`);
  if (img.complete) return;
  const why = none ? `image ${img.dir}: ${none}` : `${what} is incomplete (${img.status.reason})`;
  if (!opts.allowIncomplete) throw new Error(`${why}; pass --allow-incomplete to convert what it holds`);
  if (none) process.stderr.write(`bgsnap-convert: warning: ${none}; pages generation ${img.chain!.generation} did not deliver are the passes', read while the target ran: not a point-in-time snapshot\n`);
}

main('bgsnap-convert', async () => {
  const img = await ImageReader.open(prog.args[0], { generation: opts.generation });
  try {
    refuseIncomplete(img);
    await convert(img);
  } finally {
    await img.close();
  }
});
