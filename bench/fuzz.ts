// The long fuzz run: mutated real bgsnap and QEMU streams through the decoders
// and receive() into real images, for as long as asked.
//   node dist/bench/fuzz.js [--seconds 300] [--seed N]
// Prints every failing case with its seed and case number (reproducible).
import { fuzz } from '../test/helpers/fuzz';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
}

async function main(): Promise<void> {
  const seconds = Number(arg('--seconds', '300'));
  let seed = Number(arg('--seed', String(Date.now() % 1_000_000)));
  const end = Date.now() + seconds * 1000;
  let cases = 0;
  let received = 0;
  let failures = 0;
  while (Date.now() < end) {
    const r = await fuzz(seed, Math.min(30_000, end - Date.now()));
    cases += r.cases;
    received += r.received;
    failures += r.failures.length;
    r.failures.forEach((f) => console.log(`FAIL ${f}`));
    console.log(`seed ${seed}: ${r.cases} cases; total ${cases} cases, ${received} through receive, ${failures} failures`);
    seed++;
  }
  process.exit(failures ? 1 : 0);
}

void main();
