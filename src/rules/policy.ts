// Automatic mitigation of regression incidents. off: nothing; dry-run (the
// default): say what would be done, on the timeline and in the log; enforce: put a
// shed rule with a TTL on the regressed shape, and lift it once the shape recovers.
// Shapes on the protect list are never touched.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../detect/events.ts';
import type { Incident, IncidentChange } from '../detect/incidents.ts';
import { createRule } from './rule.ts';
import type { RuleStore } from './store.ts';

export type MitigationMode = 'off' | 'dry-run' | 'enforce';


export interface PolicyOptions {
  readonly mode: MitigationMode;
  readonly protect: ReadonlySet<string>;
  readonly maxConcurrent: number;
  readonly queueTimeoutMs: number;
  readonly ttlS: number;
  readonly store: RuleStore;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
}

export class MitigationPolicy {
  /** Incident id -> the rule this policy put in place for it. */
  private readonly applied = new Map<string, string>();

  constructor(private readonly options: PolicyOptions) {}

  readonly onIncident = (incident: Incident, change: IncidentChange): void => {
    if (change === 'opened') this.mitigate(incident);
    else if (change === 'resolved') this.lift(incident);
  };

  private mitigate(incident: Incident): void {
    const o = this.options;
    if (o.mode === 'off') return;
    if (o.protect.has(incident.fingerprint)) {
      incident.mitigation = { mode: o.mode, action: 'none', rule_id: null, note: 'shape is on the protect list' };
      this.record(incident, `shape ${incident.fingerprint} is protected: no mitigation`);
      return;
    }
    // A lock held elsewhere or load from outside the proxy: shedding this shape would not help.
    const elsewhere = incident.causes.find((c) => c.decisive && c.mitigable === false);
    if (elsewhere !== undefined) {
      incident.mitigation = { mode: o.mode, action: 'none', rule_id: null, note: `nothing mitigated: the cause is not this shape (${elsewhere.type})` };
      this.record(incident, `shape ${incident.fingerprint}: nothing mitigated, the cause is not this shape (${elsewhere.type})`);
      return;
    }
    const plan = `shed shape ${incident.fingerprint} to ${o.maxConcurrent} concurrent execution(s) (queue ${o.queueTimeoutMs} ms) for up to ${o.ttlS} s`;
    if (o.mode === 'dry-run') {
      incident.mitigation = { mode: o.mode, action: 'none', rule_id: null, note: `dry-run: would ${plan}` };
      this.record(incident, `dry-run: would ${plan}`);
      return;
    }
    const rule = createRule(
      {
        action: 'shed',
        fingerprint: incident.fingerprint,
        max_concurrent: o.maxConcurrent,
        queue_timeout_ms: o.queueTimeoutMs,
        ttl_s: o.ttlS,
        reason: `incident ${incident.id}: ${incident.summary}`.slice(0, 1000),
        created_by: 'policy',
      },
      o.clock.now(),
      'policy',
    );
    incident.mitigation = { mode: o.mode, action: 'shed', rule_id: rule.id, note: plan };
    this.applied.set(incident.id, rule.id);
    o.store.add(rule).then(
      () => this.record(incident, `enforce: ${plan} (rule ${rule.id})`),
      (err: Error) => {
        o.log.error({ err, incident: incident.id }, 'mitigation rule could not be stored');
        incident.mitigation = { mode: o.mode, action: 'none', rule_id: null, note: `failed to apply: ${err.message}` };
      },
    );
  }

  private lift(incident: Incident): void {
    const ruleId = this.applied.get(incident.id);
    if (ruleId === undefined) return;
    this.applied.delete(incident.id);
    this.options.store.remove(ruleId, 'policy', 'lifted: the shape recovered').then(
      () => this.record(incident, `lifted rule ${ruleId}: shape ${incident.fingerprint} recovered`),
      (err: Error) => this.options.log.error({ err, rule: ruleId }, 'mitigation rule could not be lifted (its TTL will)'),
    );
  }

  private record(incident: Incident, summary: string): void {
    this.options.events.add({ type: 'mitigation', fingerprint: incident.fingerprint, summary, details: { incident: incident.id, mode: this.options.mode } });
    this.options.log.warn({ incident: incident.id, fingerprint: incident.fingerprint, mode: this.options.mode }, summary);
  }
}
