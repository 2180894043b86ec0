// Drives a capture source into a stream sink (a bgsnap stream to a file, stdout
// or a network receiver), reporting progress and handing each zero-copy page
// batch back to its source once the sink has taken it.
import type { PageBatch, StreamEvent, StreamTotals } from '../format/events';
import type { StreamSink } from '../io/stream-sink';

export interface EmitProgress {
  bytesOut: number;
  pages: number; // page records written
  totalPages: number; // pages in the block table (0 until it was written)
}

// Returns the totals written in the END frame; throws if the source ended
// without one (then no END frame is written and the receiver marks it incomplete).
// `release` hands a zero-copy page batch back to its source (the process
// source's native buffers): the sink holds no reference once write() resolved.
export async function emitStream(
  events: AsyncIterable<StreamEvent>, sink: StreamSink, onProgress?: (p: EmitProgress) => void, release?: (b: PageBatch) => void,
): Promise<StreamTotals> {
  let totalPages = 0;
  for await (const ev of events) {
    if (ev.type === 'blocks') totalPages = ev.blocks.reduce((n, b) => n + b.length, 0) / (sink.pageSize || 1);
    await sink.write(ev);
    if (ev.type === 'pages') release?.(ev.batch);
    onProgress?.({ bytesOut: sink.bytes, pages: sink.totals.pages, totalPages });
    if (ev.type === 'end') return { ...sink.totals };
  }
  throw new Error('the capture source ended without an end of stream');
}
