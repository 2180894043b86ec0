// Where decoded snapshot events go. One interface for every destination (a local
// image today, a network peer later), so one shared test suite covers them all.
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
}

export interface SnapshotSink {
  // Called for each event in stream order; may apply backpressure by returning a promise.
  write(ev: StreamEvent): void | Promise<void>;
  // The stream provably ended (END frame, or QEMU's EOF): make it durable.
  finish(): Promise<ReceiveSummary>;
  // The stream broke: keep what arrived, marked incomplete with the reason.
  fail(reason: string): Promise<ReceiveSummary>;
}
