// Measures the proxy-to-database round trip (a trivial query on the monitoring
// connection) every few seconds, so an incident can say whether the network or
// the server as a whole got slower, or not.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { MonitorPool } from '../plans/monitor.ts';

const CAPACITY = 900;

export class RoundTripTracker {
  private readonly at = new Float64Array(CAPACITY);
  private readonly ms = new Float64Array(CAPACITY);
  private next = 0;
  private count = 0;
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly options: { monitor: MonitorPool; clock: Clock; log: Logger; intervalMs: number }) {}

  start(): void {
    const tick = async () => {
      try {
        this.record(this.options.clock.now(), await this.options.monitor.roundTripMs());
      } catch (err) {
        this.options.log.debug({ err }, 'round-trip probe failed');
      }
    };
    void tick();
    this.timer = setInterval(() => void tick(), this.options.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  record(at: number, ms: number): void {
    this.at[this.next] = at;
    this.ms[this.next] = ms;
    this.next = (this.next + 1) % CAPACITY;
    if (this.count < CAPACITY) this.count++;
  }

  /** Median round trip measured between `from` and `to` (epoch ms), or null if none. */
  medianBetween(from: number, to: number): number | null {
    const values: number[] = [];
    for (let i = 0; i < this.count; i++) if (this.at[i] >= from && this.at[i] <= to) values.push(this.ms[i]);
    if (values.length === 0) return null;
    values.sort((a, b) => a - b);
    return values[Math.floor((values.length - 1) / 2)];
  }
}
