// The socket side of the handshake codec (format/net-protocol.ts): both ends
// read fixed-size messages, with sizes the caller has already bounded.
import { once } from 'node:events';
import type { Duplex } from 'node:stream';

// Reads exactly n bytes from a paused stream, or throws if it ends first.
export async function readExact(s: Duplex, n: number): Promise<Buffer> {
  if (n === 0) return Buffer.alloc(0);
  for (;;) {
    const b = s.read(n) as Buffer | null;
    if (b && b.length === n) return b;
    if (b) s.unshift(b);
    if (s.readableEnded || s.destroyed) throw new Error('the connection closed during the handshake');
    await Promise.race([once(s, 'readable'), once(s, 'end'), once(s, 'close')]);
  }
}
