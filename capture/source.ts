// What every capture source (--qmp, --pid) gives the capture CLI: the snapshot
// as stream events, a way to stop early that releases the target, and its own
// statistics for --stats.
import type { StreamEvent } from '../format/events';

export interface CaptureSource<S extends object = object> {
  events: AsyncIterable<StreamEvent>;
  abort(reason: string): Promise<void>;
  stats(): S;
}
