// Bounded mutation fuzzing (a few seconds) of the bgsnap and QEMU decoders and
// of receive() into a real image: only StreamError may escape a decoder, nothing
// hangs (each decode is synchronous and the run is time-boxed; uvu's own timeout
// would not stop a spinning loop, so a hang shows as this test never finishing),
// and no byte lands outside the image's block layout. bench/fuzz.ts runs longer.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { fuzz } from './helpers/fuzz';

test('mutated real streams: StreamError or success, never a crash or a write outside the image', async () => {
  const seed = Number(process.env.BGSNAP_FUZZ_SEED ?? Date.now() % 100000);
  const started = Date.now();
  const r = await fuzz(seed, Number(process.env.BGSNAP_FUZZ_MS ?? 4000));
  const took = Date.now() - started;
  console.log(`  fuzz seed ${seed}: ${r.cases} cases (${r.received} through receive into an image) in ${took} ms`);
  assert.equal(r.failures, [], r.failures.join('\n'));
  assert.ok(r.cases > 50, 'enough cases ran');
  assert.ok(took < 20_000, 'no case hung');
});

test.run();
