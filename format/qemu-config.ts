// Subsections of a QEMU stream's CONFIGURATION section (migration/savevm.c,
// vmstate_configuration), QEMU 7.2 to 10.x. Each is 05, a counted name, be32
// version, then its fields. target-page-bits (x86 never sends it) and uuid
// (validate-uuid; only a destination that asks checks it) pass; capabilities
// lists capabilities that change the RAM section's layout (x-ignore-shared,
// mapped-ram) and is refused by name.
import { StreamError } from './errors.js';
import { capabilityRefusal } from './qemu-refusals.js';

// Returns where the subsection at `pos` ends, or -1 when `buf` does not hold all
// of it yet. `at` is the stream offset of buf[0], for errors.
export function configSubsectionEnd(buf: Buffer, pos: number, at: number): number {
  if (buf.length - pos < 2) return -1;
  const n = buf[pos + 1];
  const body = pos + 2 + n + 4;
  if (buf.length < body + 4) return -1;
  const name = buf.toString('latin1', pos + 2, pos + 2 + n);
  if (name === 'configuration/capabilities') return refuseCapabilities(buf, pos, body, at);
  if (name === 'configuration/uuid') return buf.length >= body + 16 ? body + 16 : -1;
  if (name !== 'configuration/target-page-bits') throw unsupported(at + pos, `configuration subsection '${name}'`);
  const bits = buf.readUInt32BE(body);
  if (bits !== 12) throw unsupported(at + pos, `target page bits ${bits}, only 4 KiB pages`);
  return body + 4;
}

// be32 count, then counted capability names: all of them are read to name them.
function refuseCapabilities(buf: Buffer, pos: number, body: number, at: number): number {
  const count = buf.readUInt32BE(body);
  const caps: string[] = [];
  let p = body + 4;
  for (let i = 0; i < Math.min(count, 64); i++) {
    if (p >= buf.length || p + 1 + buf[p] > buf.length) return -1;
    caps.push(buf.toString('latin1', p + 1, p + 1 + buf[p]));
    p += 1 + buf[p];
  }
  throw unsupported(at + pos, capabilityRefusal(caps));
}

function unsupported(offset: number, detail: string): StreamError {
  return new StreamError('qemu', 'UNSUPPORTED', offset, detail);
}
