// Where snapshots go. SnapshotSink is the one interface every destination of
// decoded snapshot events implements (a local image, a bgsnap stream into a
// file, a pipe or a network receiver), so one shared test suite covers them all
// (test/helpers/sink-suite.ts). ByteSink is the byte level beneath a stream
// sink: a file or pipe (io/output.ts) or a network peer (net/client.ts).
import type { StreamEvent } from '../format/events';

export interface ReceiveSummary {
  status: 'complete' | 'incomplete';
  reason: string; // why incomplete; '' when complete
  image: string;
  snapshotId: string;
  source: string;
  pagesReceived: number; // page records in the stream, duplicates included
  uniquePages: number; // distinct pages stored
  dataPages: number; // of which hold bytes
  zeroPages: number; // of which are holes
  duplicatePages: number; // records that replaced an earlier copy
  discardedPages: number;
  streamBytes: number;
  imageBytes: number; // bytes the data file occupies on disk
  imageSize: number; // apparent size of the data file
  seconds: number;
  generations?: number; // a chain: generations received (complete or not)
  completeGenerations?: number;
  passes?: number; // a chain: of which pre-copy passes (complete, flagged PASS): not snapshots
}

export interface SnapshotSink {
  // Called for each event in stream order; may apply backpressure by returning a
  // promise. Once it returns (or its promise resolves) the sink holds no
  // reference to the event's buffers, so a zero-copy source may reuse them.
  write(ev: StreamEvent): void | Promise<void>;
  // The stream provably ended (END frame, or QEMU's EOF): make it durable.
  finish(): Promise<ReceiveSummary>;
  // The stream broke: keep what arrived, marked incomplete with the reason.
  fail(reason: string): Promise<ReceiveSummary>;
}

export interface ByteSink {
  readonly bytes: number; // written so far
  // Resolves when the destination can take more (backpressure), or throws once it failed.
  write(buf: Buffer): Promise<void>;
  // Resolves only once the destination has taken buf, so the caller may reuse it.
  writeSettled(buf: Buffer): Promise<void>;
  // Everything was written: flush; a network peer also acknowledges a complete,
  // durable image with its summary. Throws if that did not happen.
  close(): Promise<ReceiveSummary | void>;
  // The stream broke: stop writing, so the far end keeps it as incomplete; a
  // network peer's summary of what it kept, when it sent one.
  abandon(): Promise<ReceiveSummary | void>;
}
