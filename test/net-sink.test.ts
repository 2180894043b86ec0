// The shared sink suite over the full network path: events re-encoded by a
// StreamSink over a NetOutput, sent over a real loopback socket (token over
// plain TCP here; TLS is covered by net-auth) to an in-process Receiver, stored
// by its ImageWriter. Same expectations as the local image.
import * as crypto from 'node:crypto';
import * as path from 'node:path';
import { Receiver } from '../receiver/server';
import { NetOutput } from '../net/client';
import { StreamSink } from '../io/stream-sink';
import type { ReceiveSummary } from '../io/sink';
import { sinkSuite } from './helpers/sink-suite';

const token = crypto.randomBytes(24).toString('hex');

// One receiver per image, rooted at the image's parent; stopped once the sink closed.
sinkSuite('network (StreamSink over NetOutput -> Receiver over 127.0.0.1)', async (dir) => {
  const rx = new Receiver({
    root: path.dirname(dir), auth: { token: Buffer.from(token), insecure: true }, maxStreams: 4, maxImageBytes: 1 << 30, idleMs: 20_000,
  });
  const addr = await rx.listen('127.0.0.1', 0);
  process.env.BGSNAP_TOKEN = token;
  const sink = new StreamSink(await NetOutput.connect({ to: `tcp://127.0.0.1:${addr.port}`, insecure: true, name: path.basename(dir) }));
  const after = async (p: Promise<ReceiveSummary>) => {
    try {
      return await p;
    } finally {
      await rx.stop('test done');
    }
  };
  return Object.assign(sink, {
    finish: () => after(StreamSink.prototype.finish.call(sink)),
    fail: (reason: string) => after(StreamSink.prototype.fail.call(sink, reason)),
  });
}).run();
