// Reads a snapshot stream from any Readable, picks the decoder by magic (bgsnap or
// a raw QEMU migration stream), and feeds a sink. The decode step is a through2
// transform from bytes to event batches, so backpressure runs from the sink back
// to the socket or pipe the stream arrives on.
import { pipeline } from 'node:stream/promises';
import type { Readable, TransformCallback } from 'node:stream';
import through2 from 'through2';
import { BgsnapDecoder, isBgsnapStream, type DecoderOptions } from '../format/bgsnap';
import { QemuDecoder, isQemuStream } from '../format/qemu';
import { StreamError } from '../format/errors';
import type { StreamDecoder, StreamEvent } from '../format/events';
import type { ReceiveSummary, SnapshotSink } from '../io/sink';
import { fileops } from '../io/fileops';

// Chooses the decoder from the first bytes; undefined until 4 bytes have arrived.
export function detectDecoder(first: Buffer, opts: DecoderOptions = {}): StreamDecoder | undefined {
  if (first.length < 4) return undefined;
  if (isQemuStream(first)) return new QemuDecoder();
  if (first.length < 6) return undefined;
  if (isBgsnapStream(first)) return new BgsnapDecoder(opts);
  throw new StreamError('input', 'BAD_MAGIC', 0, `neither a bgsnap nor a QEMU migration stream (starts with ${first.subarray(0, 8).toString('hex')})`);
}

// What the decode transform emits: a batch of events, or the decode error in band,
// so every event decoded before the error reaches the sink before it is failed
// (an error raised through the pipeline would tear it down with events unread).
export type Decoded = StreamEvent[] | { error: Error };

// A transform from byte chunks to arrays of events; the stream's end is checked
// by the decoder's finish(), which throws unless the stream provably ended.
export function decodeStream(onBytes?: (n: number) => void, opts: DecoderOptions = {}) {
  let dec: StreamDecoder | undefined;
  let head = Buffer.alloc(0);
  let failed = false;
  return through2.obj(
    function (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) {
      if (failed) return cb();
      try {
        if (!dec) {
          head = Buffer.concat([head, chunk]);
          dec = detectDecoder(head, opts);
          if (!dec) return cb();
          chunk = head;
        }
        const events = dec.push(chunk);
        onBytes?.(dec.bytesIn);
        cb(null, events.length ? events : undefined);
      } catch (e) {
        failed = true;
        cb(null, { error: e as Error });
      }
    },
    function (cb: TransformCallback) {
      if (failed) return cb();
      try {
        if (!dec) throw new StreamError('input', 'TRUNCATED', head.length, head.length ? 'input ended inside the stream magic' : 'input is empty');
        const events = dec.finish();
        cb(null, events.length ? events : undefined);
      } catch (e) {
        cb(null, { error: e as Error });
      }
    },
  );
}

// Receives one stream into the sink. Resolves with the summary whenever the sink
// could be closed; the summary says incomplete, with the reason, if anything broke.
// A sink that verifies PageBatch.check (the image writer, which checksums every
// page anyway) gets page frames whose checksum the decoder left to it.
// Decoded batches own their buffers, so a sink that can keep them (writeOwned)
// gets them without waiting for each to be written.
type ReceivingSink = SnapshotSink & { streamBytes?: number; checksPages?: boolean; writeOwned?(ev: StreamEvent): void | Promise<void> };

export async function receive(input: Readable, sink: ReceivingSink): Promise<ReceiveSummary> {
  let cause: Error | undefined; // the consumer's own error; pipeline may report an AbortError instead
  const opts = { deferPageChecks: sink.checksPages === true, crc32: (d: Uint8Array, c = 0) => fileops.crc32(d, c) };
  try {
    await pipeline(input, decodeStream((n) => (sink.streamBytes = n), opts), async (source: AsyncIterable<Decoded>) => {
      try {
        for await (const events of source) {
          if (!Array.isArray(events)) throw events.error;
          for (const ev of events) {
            const r = sink.writeOwned ? sink.writeOwned(ev) : sink.write(ev);
            if (r) await r;
          }
        }
      } catch (e) {
        cause = e as Error;
        throw e;
      }
    });
  } catch (e) {
    return sink.fail((cause ?? (e as Error)).message);
  }
  return sink.finish();
}
