// Progress of a long conversion on a terminal: "PROG: N of M UNIT (P%)",
// redrawn at most twice a second, only when stderr is a TTY (never in a pipe or
// a log, where it would be noise), and finished with a newline.
export class Progress {
  private n = 0;
  private last = 0;
  private readonly tty = process.stderr.isTTY === true;

  constructor(private readonly prog: string, private readonly total: number, private readonly unit: string) {}

  add(k: number): void {
    this.n += k;
    if (!this.tty || Date.now() - this.last < 500) return;
    this.last = Date.now();
    this.draw();
  }

  done(): void {
    if (!this.tty) return;
    this.draw();
    process.stderr.write('\n');
  }

  private draw(): void {
    const pct = this.total ? ` (${Math.min(100, (100 * this.n) / this.total).toFixed(0)}%)` : '';
    process.stderr.write(`\r${this.prog}: ${this.n} of ${this.total} ${this.unit}${pct} `);
  }
}
