// The fleet view's publishing side: every fleet_publish_interval_s this instance
// writes its top shapes (by total time, at most fleet_top_shapes rows) to the
// control database, and the admin API merges every live instance's rows for
// `?scope=fleet`. An instance that stops publishing drops out of the view after
// three intervals (its rows are deleted then); a failed publish is logged and
// retried at the next interval, never felt by the query path.

import type { Logger } from 'pino';
import { mergeFleet, publishedOf, type FleetShape } from '../shapes/fleet.ts';
import type { ShapeRegistry } from '../shapes/registry.ts';
import type { ControlDatabase } from '../state/control.ts';

export interface FleetOptions {
  readonly registry: ShapeRegistry;
  readonly control: ControlDatabase;
  readonly intervalMs: number;
  readonly topShapes: number;
  readonly log: Logger;
}

export class FleetPublisher {
  private timer: NodeJS.Timeout | null = null;
  private failing = false;

  constructor(private readonly options: FleetOptions) {}

  /** How long an instance's rows count as live: three missed publishes. */
  get expireS(): number {
    return (3 * this.options.intervalMs) / 1000;
  }

  start(): void {
    this.timer = setInterval(() => void this.publish(), this.options.intervalMs);
    this.timer.unref();
    void this.publish();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async publish(): Promise<void> {
    const top = this.options.registry
      .all()
      .sort((a, b) => b.totalMs - a.totalMs)
      .slice(0, this.options.topShapes)
      .map(publishedOf);
    try {
      await this.options.control.publishShapes(top, this.expireS);
      if (this.failing) this.options.log.info('shape summaries published again');
      this.failing = false;
    } catch (err) {
      // Once per outage at warn: the control database's own log says the rest.
      this.options.log[this.failing ? 'debug' : 'warn'](
        { err },
        'shape summaries not published: control database unreachable',
      );
      this.failing = true;
    }
  }

  /** The merged shapes of every live instance. */
  async fleet(): Promise<FleetShape[]> {
    const { shapes, skipped } = mergeFleet(await this.options.control.fleetShapes(this.expireS));
    if (skipped > 0)
      this.options.log.warn({ skipped }, 'control database: skipped shape summaries that could not be read');
    return shapes;
  }
}
