// A bounded queue of stream events with several producers (QEMU's migration
// stream, the disks' NBD writes) and one consumer (the sink). push() resolves
// once there is room again, so a slow sink slows every producer.
import type { StreamEvent } from '../format/events';

const LIMIT = 16;

export class EventQueue implements AsyncIterable<StreamEvent> {
  private items: StreamEvent[] = [];
  private roomWaiters: (() => void)[] = [];
  private wakeConsumer: (() => void) | null = null;
  private closed = false;
  private error: Error | null = null;

  async push(ev: StreamEvent): Promise<void> {
    if (this.error) throw this.error;
    this.items.push(ev);
    this.wake();
    while (this.items.length > LIMIT && !this.error) await new Promise<void>((r) => this.roomWaiters.push(r));
    if (this.error) throw this.error;
  }

  close(): void {
    this.closed = true;
    this.wake();
  }

  fail(err: Error): void {
    this.error ??= err;
    this.wake();
    for (const r of this.roomWaiters.splice(0)) r();
  }

  private wake(): void {
    const w = this.wakeConsumer;
    this.wakeConsumer = null;
    w?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<StreamEvent> {
    for (;;) {
      if (this.error) throw this.error;
      const ev = this.items.shift();
      if (ev) {
        if (this.items.length <= LIMIT) for (const r of this.roomWaiters.splice(0)) r();
        yield ev;
        continue;
      }
      if (this.closed) return;
      await new Promise<void>((r) => (this.wakeConsumer = r));
    }
  }
}
