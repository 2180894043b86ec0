// Command-line and report helpers shared by the benchmarks, kept apart from
// process-common so a benchmark that needs only gcc and node (tracking-cost)
// does not load the capture addon.
import * as os from 'node:os';

export function arg(name: string, def: string): string {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
}

export function machine(): string {
  const mem = (os.totalmem() / 2 ** 30).toFixed(0);
  return `${os.cpus().length} cores, ${mem} GiB, Linux ${os.release()}, load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`;
}

// "min-max" (median) of repeated runs.
export function range(xs: number[], digits = 1): string {
  if (!xs.length) return '-';
  const s = [...xs].sort((a, b) => a - b);
  const f = (x: number) => x.toFixed(digits);
  return s.length === 1 ? f(s[0]) : `${f(s[0])}-${f(s[s.length - 1])} (med ${f(s[Math.floor(s.length / 2)])})`;
}
