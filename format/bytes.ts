// Big-endian helpers shared by the codecs. 64-bit fields become plain numbers:
// every quantity bgsnap cares about (offsets, lengths) fits in 2^53, and staying
// off BigInt keeps the per-record hot paths cheap.

const TWO32 = 0x1_0000_0000;

// Reads a be64 as a number; returns -1 when it does not fit in 2^53 so callers
// can turn that into a format-specific error.
export function readBe64(buf: Buffer, pos: number): number {
  const hi = buf.readUInt32BE(pos);
  if (hi >= 0x20_0000) return -1;
  return hi * TWO32 + buf.readUInt32BE(pos + 4);
}

export function writeBe64(buf: Buffer, pos: number, value: number): number {
  if (!Number.isSafeInteger(value) || value < 0) throw new RangeError(`be64 out of range: ${value}`);
  buf.writeUInt32BE(Math.floor(value / TWO32), pos);
  buf.writeUInt32BE(value % TWO32, pos + 4);
  return pos + 8;
}

// A 1-byte length then that many bytes. Latin-1 maps bytes 1:1 to code units, so
// a name decoded here re-encodes to the identical bytes.
export function writeCounted(buf: Buffer, pos: number, name: Buffer): number {
  buf[pos] = name.length;
  name.copy(buf, pos + 1);
  return pos + 1 + name.length;
}

export function countedBytes(name: string): Buffer {
  const b = Buffer.from(name, 'latin1');
  if (b.length === 0 || b.length > 255) throw new RangeError(`counted name must be 1..255 bytes: '${name}'`);
  return b;
}
