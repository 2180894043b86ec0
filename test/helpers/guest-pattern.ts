// Reads the test guest's memory pattern (test/guest/init.c) out of a raw copy of
// guest RAM, wherever the guest kernel placed its pages, and judges whether the
// copy is one instant of the guest: the single-threaded workload moves an amount
// between two pages by rewriting them one after the other, so at any instant the
// values sum to the conserved total, or fall short by one amount (1..997) while
// the second page of a transfer is not yet written. A copy taken over a stretch of
// time mixes thousands of transfers and misses the total by far more.
const TAG = 0x6267736e61702d70n;
const MAX_AMOUNT = 997;
const SHARE = 1000;

export interface PatternCheck {
  found: number; // distinct pattern pages found
  duplicates: number;
  sum: number;
  total: number;
  atMaxGen: number;
  consistent: boolean;
}

export function checkGuestPattern(ram: Buffer, npages: number): PatternCheck {
  const seen = new Uint8Array(npages);
  let found = 0;
  let duplicates = 0;
  let sum = 0;
  let maxGen = -1n;
  let atMaxGen = 0;
  for (let off = 0; off + 4096 <= ram.length; off += 4096) {
    const i = ram.readBigUInt64LE(off) ^ TAG;
    if (i >= BigInt(npages)) continue;
    if (seen[Number(i)]++) duplicates++;
    else found++;
    sum += Number(ram.readBigInt64LE(off + 8));
    const gen = ram.readBigUInt64LE(off + 16);
    if (gen > maxGen) [maxGen, atMaxGen] = [gen, 1];
    else if (gen === maxGen) atMaxGen++;
  }
  const total = npages * SHARE;
  const short = total - sum;
  const consistent = found === npages && duplicates === 0 && atMaxGen <= 2 && short >= 0 && short <= MAX_AMOUNT;
  return { found, duplicates, sum, total, atMaxGen, consistent };
}
