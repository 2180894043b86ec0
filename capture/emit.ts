// Writes capture events as a bgsnap stream to an Output (file, stdout), frame by
// frame and without copying page data, waiting for the destination to drain: a
// slow reader slows the capture instead of growing memory.
import { BgsnapEncoder } from '../format/bgsnap';
import type { PageBatch, StreamEvent, StreamTotals } from '../format/events';
import type { Output } from '../io/output';

export interface EmitProgress {
  bytesOut: number;
  pages: number; // page records written
  totalPages: number; // pages in the block table (0 until it was written)
}

function framesOf(enc: BgsnapEncoder, ev: StreamEvent): Buffer[] {
  switch (ev.type) {
    case 'header': return enc.header(ev.header);
    case 'blocks': return enc.blocks(ev.blocks);
    case 'pages': return enc.pages(ev.batch);
    case 'discard': return enc.discard(ev.batch);
    case 'state': return enc.state(ev.state);
    case 'end': return enc.end();
  }
}

// Returns the totals written in the END frame; throws if the source ended
// without one (then no END frame is written and the receiver marks it incomplete).
// `release` hands a zero-copy page batch back to its source once its frame has
// been written (the process source's native buffers).
export async function emitStream(
  events: AsyncIterable<StreamEvent>, out: Pick<Output, 'bytes' | 'write' | 'writeSettled'>, enc: BgsnapEncoder, onProgress?: (p: EmitProgress) => void,
  release?: (b: PageBatch) => void,
): Promise<StreamTotals> {
  await out.write(enc.magic());
  let totalPages = 0;
  for await (const ev of events) {
    if (ev.type === 'blocks') totalPages = ev.blocks.reduce((n, b) => n + b.length, 0) / (enc.pageSize || 1);
    const parts = framesOf(enc, ev);
    if (ev.type === 'pages' && release) {
      // Writes complete in order: once the last part is taken, all of them are.
      for (let i = 0; i < parts.length - 1; i++) await out.write(parts[i]);
      await out.writeSettled(parts[parts.length - 1]);
      release(ev.batch);
    } else for (const part of parts) await out.write(part);
    onProgress?.({ bytesOut: out.bytes, pages: enc.totals.pages, totalPages });
    if (ev.type === 'end') return { ...enc.totals };
  }
  throw new Error('the capture source ended without an end of stream');
}
