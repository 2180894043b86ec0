// An independent reading of a QEMU mapped-ram migration file's head (shares no
// code with format/qemu-mapped-ram.ts): where the preamble ends, the ram
// section's ids, each block's name, length and mapped-ram header, and where the
// block list ended.
export interface Parsed {
  preambleEnd: number;
  sectionId: number;
  instanceId: number;
  blocks: { name: string; length: number; headerAt: number; version: number; pageSize: number; bitmapOffset: number; pagesOffset: number }[];
  end: number; // where the ram block list ended (EOS)
}

// Where the file header and CONFIGURATION end (only the capabilities subsection
// is expected: x86 sends no target-page-bits).
export function configEnd(f: Buffer): number {
  let p = 8 + 5 + f.readUInt32BE(9); // magic, version, 07 len machine
  while (f[p] === 0x05) {
    const name = f.toString('latin1', p + 2, p + 2 + f[p + 1]);
    p += 2 + f[p + 1] + 4;
    if (name !== 'configuration/capabilities') throw new Error(`unexpected configuration subsection ${name}`);
    const n = f.readUInt32BE(p);
    p += 4;
    for (let i = 0; i < n; i++) p += 1 + f[p];
  }
  return p;
}

export function parseMappedRam(f: Buffer): Parsed {
  const preambleEnd = configEnd(f);
  let p = preambleEnd;
  if (f[p] !== 0x01) throw new Error(`no START section after the configuration at ${p}`);
  const sectionId = f.readUInt32BE(p + 1);
  p += 5 + 1 + f[p + 5];
  const instanceId = f.readUInt32BE(p);
  p += 8;
  let left = Number(f.readBigUInt64BE(p) & ~0xfffn);
  p += 8;
  const blocks: Parsed['blocks'] = [];
  while (left > 0) {
    const headerAt = p;
    const name = f.toString('latin1', p + 1, p + 1 + f[p]);
    p += 1 + f[p];
    const length = Number(f.readBigUInt64BE(p));
    p += 8;
    const b = { name, length, headerAt, version: f.readUInt32BE(p), pageSize: Number(f.readBigUInt64BE(p + 4)),
      bitmapOffset: Number(f.readBigUInt64BE(p + 12)), pagesOffset: Number(f.readBigUInt64BE(p + 20)) };
    blocks.push(b);
    p = b.pagesOffset + length;
    left -= length;
  }
  return { preambleEnd, sectionId, instanceId, blocks, end: p };
}

