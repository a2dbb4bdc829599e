// Automatic mitigation of regression incidents, built so that it cannot make an
// incident worse. off: nothing; dry-run (the default): say what would be done;
// enforce: put a shed rule with a TTL on the incident's root shape, and lift it once
// the incident resolves.
//
// One function decides (decide()); dry-run and enforce differ only in whether the
// decided rule is stored, so a dry-run reports exactly what enforce would do,
// budget included. The policy never acts on:
// - a database-wide incident (no single shape is the cause) or a victim shape (it
//   acts on the incident's root only);
// - a transaction-control or session statement (BEGIN, COMMIT, SET, FETCH...):
//   shedding COMMIT fails every write transaction, an outage instead of a slow query;
// - a shape on the protect list, or one it has never seen;
// - anything beyond its budget: at most N automatic rules at once, covering at most
//   a set share of all recent calls.
// Every decision, refusals included, is logged, put on the timeline, alerted (the
// webhook) and kept for GET /api/mitigation.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../events/timeline.ts';
import type { Incident, IncidentChange } from '../detect/incidents.ts';
import { createRule } from './rule.ts';
import type { RuleStore } from './store.ts';

export type MitigationMode = 'off' | 'dry-run' | 'enforce';

/** The settings a config reload may change. */
export interface PolicySettings {
  readonly mode: MitigationMode;
  readonly protect: ReadonlySet<string>;
  readonly maxConcurrent: number;
  readonly queueTimeoutMs: number;
  readonly ttlS: number;
  /** Automatic rules in force at once. */
  readonly maxRules: number;
  /** Largest share (0-1) of all recent calls the automatic rules may cover together. */
  readonly maxTrafficShare: number;
}

/** What the policy needs to know about shapes (the shape registry implements it in app.ts). */
export interface PolicyShapes {
  /** A seen shape's statement kind, or undefined if this instance never saw it. */
  lookup(
    fingerprint: string,
  ): { readonly kind: string; readonly command: string; readonly control: boolean } | undefined;
  /** The share (0-1) of all recent calls that these shapes had together. */
  trafficShare(fingerprints: readonly string[]): number;
}

export interface PolicyOptions extends PolicySettings {
  readonly shapes: PolicyShapes;
  readonly store: RuleStore;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  /** Sends an alert (the incident webhook); every automatic action and refusal goes here. */
  readonly alert?: (payload: unknown) => void;
}

/** A shape the policy chose not to act on, and why. */
export interface Refusal {
  readonly fingerprint: string | null;
  readonly reason: string;
}

/** One decision of the policy, as logged, alerted and listed by GET /api/mitigation. */
export interface MitigationDecision {
  readonly at: string;
  readonly incident: string;
  readonly mode: MitigationMode;
  /** shed: a rule was (enforce) or would have been (dry-run) put in place; lift: taken away; none: refused. */
  readonly action: 'shed' | 'lift' | 'none';
  readonly fingerprint: string | null;
  readonly rule_id: string | null;
  readonly note: string;
  readonly refused: readonly Refusal[];
}

interface Applied {
  readonly fingerprint: string;
  /** null in dry-run: the rule enforce would have stored. */
  readonly ruleId: string | null;
  readonly expiresAt: number;
  /** The store confirmed the rule (until then it is absent from the store but counts all the same). */
  stored: boolean;
}

const KEEP_DECISIONS = 100;

export class MitigationPolicy {
  /** Incident id -> the rule this policy put (or, in dry-run, would have put) in place for it. */
  private readonly applied = new Map<string, Applied>();
  private readonly decisions: MitigationDecision[] = [];
  private settings: PolicySettings;

  constructor(private readonly options: PolicyOptions) {
    this.settings = options;
  }

  /** Applies reloaded settings; rules already in place keep their TTL. */
  reconfigure(settings: PolicySettings): void {
    this.settings = settings;
  }

  readonly onIncident = (incident: Incident, change: IncidentChange): void => {
    if (change === 'opened') this.mitigate(incident);
    else if (change === 'resolved') this.lift(incident);
  };

  /** Mode, budget, rules in force and recent decisions (newest first), for the API. */
  status() {
    this.prune();
    const s = this.settings;
    const inForce = [...this.applied].map(([incident, a]) => ({
      incident,
      fingerprint: a.fingerprint,
      rule_id: a.ruleId,
      expires_at: new Date(a.expiresAt).toISOString(),
    }));
    return {
      mode: s.mode,
      budget: {
        max_rules: s.maxRules,
        max_traffic_share: s.maxTrafficShare,
        rules_in_force: inForce.length,
        traffic_share: this.options.shapes.trafficShare(inForce.map((a) => a.fingerprint)),
      },
      in_force: inForce,
      decisions: [...this.decisions].reverse(),
    };
  }

  /**
   * What the policy does about a newly opened incident: the shape to shed, or none,
   * with every shape it declined and why. Pure of side effects; both modes use it.
   */
  decide(incident: Incident): { fingerprint: string | null; refused: Refusal[] } {
    const s = this.settings;
    const refused: Refusal[] = [];
    const none = (fingerprint: string | null, reason: string) => {
      refused.push({ fingerprint, reason });
      return { fingerprint: null, refused };
    };
    if (incident.kind === 'database_wide')
      return none(null, 'database-wide incident: no single shape is its cause, so no shape is shed');
    // A lock held elsewhere or load from outside the proxy: shedding a shape would not help.
    const elsewhere = incident.causes.find((c) => c.conclusive && 'mitigable' in c && c.mitigable === false);
    if (elsewhere !== undefined)
      return none(null, `the cause is not a shape through the proxy (${elsewhere.type}): shedding would not help`);
    const root = incident.root !== undefined ? incident.root : incident.fingerprint;
    if (root === null) return none(null, 'the incident has no root shape');
    if (root !== incident.fingerprint)
      refused.push({
        fingerprint: incident.fingerprint,
        reason: `a victim of root shape ${root}: only the root is mitigated`,
      });
    if (s.protect.has(root)) return none(root, 'the shape is on the protect list (mitigation_protect)');
    const shape = this.options.shapes.lookup(root);
    if (shape === undefined) return none(root, 'no shape with this fingerprint has been seen by this instance');
    if (shape.control) {
      return none(
        root,
        `a transaction-control or session statement (${shape.kind || shape.command}): shedding it would fail the transactions and sessions around it`,
      );
    }
    this.prune();
    for (const a of this.applied.values())
      if (a.fingerprint === root) return none(root, 'already mitigated by an automatic rule');
    if (this.applied.size >= s.maxRules)
      return none(
        root,
        `budget: ${this.applied.size} automatic rule(s) in force already (mitigation_max_rules = ${s.maxRules})`,
      );
    const share = this.options.shapes.trafficShare([...[...this.applied.values()].map((a) => a.fingerprint), root]);
    if (share > s.maxTrafficShare) {
      return none(
        root,
        `budget: automatic rules would cover ${pct(share)} of recent calls (mitigation_max_traffic_share = ${pct(s.maxTrafficShare)})`,
      );
    }
    return { fingerprint: root, refused };
  }

  private mitigate(incident: Incident): void {
    const s = this.settings;
    if (s.mode === 'off') return;
    const { fingerprint, refused } = this.decide(incident);
    if (fingerprint === null) {
      const note = `no mitigation: ${refused.map((r) => r.reason).join('; ')}`;
      incident.mitigation = { mode: s.mode, action: 'none', rule_id: null, note, refused };
      this.record(incident, { action: 'none', fingerprint: null, rule_id: null, note, refused });
      return;
    }
    const plan = `shed shape ${fingerprint} to ${s.maxConcurrent} concurrent execution(s) (queue ${s.queueTimeoutMs} ms) for up to ${s.ttlS} s`;
    const now = this.options.clock.now();
    const expiresAt = now + s.ttlS * 1000;
    if (s.mode === 'dry-run') {
      this.applied.set(incident.id, { fingerprint, ruleId: null, expiresAt, stored: false });
      const note = `dry-run: would ${plan}`;
      incident.mitigation = { mode: s.mode, action: 'none', rule_id: null, note, refused };
      this.record(incident, { action: 'shed', fingerprint, rule_id: null, note, refused });
      return;
    }
    const rule = createRule(
      {
        action: 'shed',
        fingerprint,
        max_concurrent: s.maxConcurrent,
        queue_timeout_ms: s.queueTimeoutMs,
        ttl_s: s.ttlS,
        reason: `incident ${incident.id}: ${incident.summary}`.slice(0, 1000),
        created_by: 'policy',
      },
      now,
      'policy',
    );
    incident.mitigation = { mode: s.mode, action: 'shed', rule_id: rule.id, note: plan, refused };
    const applied: Applied = { fingerprint, ruleId: rule.id, expiresAt, stored: false };
    this.applied.set(incident.id, applied);
    // Recorded now, as a dry-run records it: the decision is made; storing it may still fail.
    this.record(incident, {
      action: 'shed',
      fingerprint,
      rule_id: rule.id,
      note: `enforce: ${plan} (rule ${rule.id})`,
      refused,
    });
    this.options.store.add(rule).then(
      () => {
        applied.stored = true;
      },
      (err: Error) => {
        this.applied.delete(incident.id);
        const note = `failed to apply rule ${rule.id}: ${err.message}`;
        incident.mitigation = { mode: s.mode, action: 'none', rule_id: null, note, refused };
        this.record(incident, { action: 'none', fingerprint, rule_id: null, note, refused: [] });
      },
    );
  }

  private lift(incident: Incident): void {
    const applied = this.applied.get(incident.id);
    if (applied === undefined) return;
    this.applied.delete(incident.id);
    const { fingerprint, ruleId } = applied;
    if (ruleId === null) {
      this.record(incident, {
        action: 'lift',
        fingerprint,
        rule_id: null,
        note: `dry-run: would lift the shed rule on shape ${fingerprint}: the incident resolved`,
        refused: [],
      });
      return;
    }
    this.options.store.remove(ruleId, 'policy', 'lifted: the incident resolved').then(
      (removed) => {
        if (removed)
          this.record(incident, {
            action: 'lift',
            fingerprint,
            rule_id: ruleId,
            note: `lifted rule ${ruleId}: shape ${fingerprint} recovered`,
            refused: [],
          });
      },
      (err: Error) =>
        this.options.log.error({ err, rule: ruleId }, 'mitigation rule could not be lifted (its TTL will)'),
    );
  }

  /** Forgets rules that ended without the incident resolving: TTL expiry, or lifted by an operator. */
  private prune(): void {
    const now = this.options.clock.now();
    for (const [id, a] of this.applied) {
      if (a.expiresAt <= now || (a.stored && this.options.store.get(a.ruleId!) === undefined)) this.applied.delete(id);
    }
  }

  private record(incident: Incident, d: Omit<MitigationDecision, 'at' | 'incident' | 'mode'>): void {
    const o = this.options;
    const decision: MitigationDecision = {
      at: new Date(o.clock.now()).toISOString(),
      incident: incident.id,
      mode: this.settings.mode,
      ...d,
    };
    this.decisions.push(decision);
    if (this.decisions.length > KEEP_DECISIONS) this.decisions.shift();
    const refusals = d.refused.length
      ? ` (refused: ${d.refused.map((r) => `${r.fingerprint ?? 'incident'}: ${r.reason}`).join('; ')})`
      : '';
    o.events.add({
      type: 'mitigation',
      fingerprint: d.fingerprint ?? incident.fingerprint,
      summary: `${d.note}${d.action === 'none' ? '' : refusals}`,
      details: { incident: incident.id, mode: decision.mode, action: d.action, rule_id: d.rule_id, refused: d.refused },
    });
    o.log.warn(
      {
        incident: incident.id,
        fingerprint: d.fingerprint,
        mode: decision.mode,
        action: d.action,
        rule: d.rule_id,
        refused: d.refused,
      },
      d.note,
    );
    o.alert?.({ event: 'mitigation', decision });
  }
}

const pct = (share: number) => `${Math.round(share * 1000) / 10}%`;
