// The timer loop the monitoring watches share: run a read, then wait the interval
// and run it again (never two at once), log the first failure of a run as a warning
// and the repeats at debug, and stop cleanly even mid-read.

import type { Logger } from 'pino';

export interface PollerOptions {
  /** What is read, for the log line ("settings check", "activity sample"). */
  readonly what: string;
  readonly intervalMs: number;
  readonly log: Logger;
  readonly run: () => Promise<unknown>;
}

export class Poller {
  private timer: NodeJS.Timeout | null = null;
  private running = false;
  private failing = false;

  constructor(private readonly options: PollerOptions) {}

  start(): void {
    if (this.running) return;
    this.running = true;
    const tick = () => {
      void this.options
        .run()
        .then(() => this.markHealthy())
        .catch((err: unknown) => {
          if (!this.running) return;
          this.options.log[this.failing ? 'debug' : 'warn'](
            { err },
            `${this.options.what} failed; retrying next interval`,
          );
          this.failing = true;
        })
        .finally(() => {
          if (!this.running) return;
          this.timer = setTimeout(tick, this.options.intervalMs);
          this.timer.unref();
        });
    };
    tick();
  }

  stop(): void {
    this.running = false;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** A read succeeded (also one run outside the timer): the next failure is news again. */
  markHealthy(): void {
    this.failing = false;
  }
}
