// The end of a QEMU stream's opaque device tail: the only proof, without device
// schemas, that a QEMU migration stream ended rather than was cut short.
import { StreamError } from './errors.js';
import { QEMU_PAGE, SEC } from './qemu.js';

// The tail is opaque, but its end is checkable: EOF (00) right after a section
// footer (7e be32 id) or at the tail's start, optionally followed by
// VMDESCRIPTION (06 be32 len JSON) whose length reaches exactly the end.
export function checkTail(tail: Buffer, at: number): void {
  const L = tail.length;
  const eofOk = (i: number) => tail[i] === SEC.EOF && (i === 0 || (i >= 5 && tail[i - 5] === SEC.FOOTER));
  if (eofOk(L - 1)) return;
  for (let p = L - 6; p >= 1; p--) {
    if (tail[p] !== SEC.VMDESC || tail.readUInt32BE(p + 1) !== L - p - 5 || !eofOk(p - 1)) continue;
    if (tail[p + 5] !== 0x7b || tail[L - 1] !== 0x7d) continue; // JSON object braces
    return checkVmdesc(tail.subarray(p + 5), at + p);
  }
  throw new StreamError('qemu', 'TRUNCATED', at + L, 'device tail does not end with EOF (+ VMDESCRIPTION): stream cut short');
}

function checkVmdesc(json: Buffer, at: number): void {
  let desc: { page_size?: unknown } = {};
  try {
    desc = JSON.parse(json.toString('utf8')) as typeof desc;
  } catch {
    throw new StreamError('qemu', 'MALFORMED', at, 'VMDESCRIPTION is not valid JSON');
  }
  const size = desc.page_size ?? QEMU_PAGE;
  if (size !== QEMU_PAGE) throw new StreamError('qemu', 'UNSUPPORTED', at, `VMDESCRIPTION page_size ${String(size)}, expected 4096`);
}

