// The shared sink suite over the file byte sink: events encoded by a StreamSink
// into a bgsnap file (what `bgsnap-capture -o FILE` writes), which is then
// received into an image, as `bgsnap-receive -o IMAGE < FILE` would. The
// summary is the receiver's, with this side's reason and input bytes, as for
// the network sink.
import * as fs from 'node:fs';
import { Output } from '../io/output';
import { StreamSink } from '../io/stream-sink';
import type { ReceiveSummary } from '../io/sink';
import { ImageWriter } from '../receiver/image';
import { receive } from '../receiver/receive';
import { sinkSuite } from './helpers/sink-suite';

sinkSuite('file (StreamSink over Output, then received)', async (dir) => {
  const file = `${dir}.bgsnap`;
  const sink = new StreamSink(Output.open(file));
  const thenReceive = async (own: ReceiveSummary): Promise<ReceiveSummary> => {
    const read = await receive(fs.createReadStream(file), await ImageWriter.create(dir));
    // A stream cut short on this side must read back as incomplete too.
    if (own.status === 'incomplete' && read.status === 'complete') throw new Error(`${file}: a failed stream read back as complete`);
    return { ...read, status: own.status === 'complete' ? read.status : 'incomplete', reason: own.reason || read.reason, streamBytes: own.streamBytes };
  };
  return Object.assign(sink, {
    finish: async () => thenReceive(await StreamSink.prototype.finish.call(sink)),
    fail: async (reason: string) => thenReceive(await StreamSink.prototype.fail.call(sink, reason)),
  });
}).run();
