// An independent, deliberately naive reading of a raw QEMU migration stream's RAM
// (whole file in memory, no batching, no validation beyond what it needs), used
// as the oracle for "last copy of each page wins" in precopy tests. It shares no
// code with format/qemu.ts on purpose.
// `tail` is where the RAM sections ended: the device state's first byte.
export function lastCopyRam(stream: Buffer, blockName: string, blockBytes: number): { ram: Buffer; records: number; tail: number } {
  const ram = Buffer.alloc(blockBytes);
  let p = 8; // magic + version
  if (stream[p] !== 0x07) throw new Error('oracle: no configuration section');
  p += 5 + stream.readUInt32BE(p + 1);
  let block = '';
  let records = 0;
  for (;;) {
    const type = stream[p++];
    if (type === 0x01 || type === 0x04) {
      const nameLen = stream[p + 4];
      const idstr = stream.toString('latin1', p + 5, p + 5 + nameLen);
      if (idstr !== 'ram') return { ram, records, tail: p - 1 };
      p += 4 + 1 + nameLen + 8;
    } else if (type === 0x02 || type === 0x03) {
      p += 4;
    } else if (type === 0x08) {
      p += 4 + stream.readUInt16BE(p + 2); // COMMAND: be16 cmd, be16 len, data (QEMU 10's SWITCHOVER_START)
      continue;
    } else return { ram, records, tail: p - 1 };
    for (;;) {
      const word = Number(stream.readBigUInt64BE(p));
      p += 8;
      const flags = word % 4096;
      const offset = word - flags;
      if (flags & 0x10) break; // EOS
      if (flags & 0x04) {
        let left = offset;
        while (left > 0) {
          const n = stream[p];
          left -= Number(stream.readBigUInt64BE(p + 1 + n));
          p += 1 + n + 8;
        }
        continue;
      }
      if (!(flags & 0x20)) {
        block = stream.toString('latin1', p + 1, p + 1 + stream[p]);
        p += 1 + stream[p];
      }
      records++;
      if (flags & 0x02) {
        if (block === blockName) ram.fill(stream[p], offset, offset + 4096);
        p += 1;
      } else if (flags & 0x08) {
        if (block === blockName) stream.copy(ram, offset, p, p + 4096);
        p += 4096;
      } else throw new Error(`oracle: unexpected flags ${flags}`);
    }
    p += 5; // footer
  }
}
