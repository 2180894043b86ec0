// The events one QMP connection received, oldest first, and the callers waiting
// for the next: shared by the direct client (qmp.ts) and the libvirt one
// (libvirt-qmp.ts), which differ only in how events reach them.
import type { QmpEvent } from './qmp';

interface EventWaiter {
  match(ev: QmpEvent): boolean;
  resolve(ev: QmpEvent): void;
}

export class QmpEventLog {
  readonly events: QmpEvent[] = [];
  private waiters: EventWaiter[] = [];

  constructor(private readonly where: () => string) {}

  // The first event `name` matching `pred` at or after `sinceIndex` in
  // `events` (default: from now on); a caller can look back as well as wait.
  wait(name: string, timeoutMs: number, pred: (ev: QmpEvent) => boolean = () => true, sinceIndex = this.events.length): Promise<QmpEvent> {
    const match = (ev: QmpEvent) => ev.event === name && pred(ev);
    const seen = this.events.slice(sinceIndex).find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise<QmpEvent>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new Error(`QMP event ${name} not received within ${timeoutMs} ms from ${this.where()}`));
      }, timeoutMs);
      const waiter: EventWaiter = { match, resolve: (ev) => (clearTimeout(timer), resolve(ev)) };
      this.waiters.push(waiter);
    });
  }

  add(ev: QmpEvent): void {
    this.events.push(ev);
    const ready = this.waiters.filter((w) => w.match(ev));
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve(ev);
  }
}
