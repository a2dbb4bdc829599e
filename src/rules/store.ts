// The rules in force: added and lifted through the API, the CLI, the dashboard,
// the config file or the mitigation policy; expired by their TTL; persisted (state
// file or control database) and, with a control database, replaced by the fleet's
// set whenever another instance changes it. Lookups by fingerprint are what the
// query path uses, so they are a map access.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../events/timeline.ts';
import type { RulePersistence } from './persistence.ts';
import { isExpired, isRule, type Rule } from './rule.ts';

export type RuleChangeListener = (rules: readonly Rule[]) => void;

export class RuleStore {
  private readonly byId = new Map<string, Rule>();
  private byFingerprint = new Map<string, Rule[]>();
  private readonly listeners: RuleChangeListener[] = [];
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly options: {
      clock: Clock;
      log: Logger;
      events: EventLog | null;
      persistence: RulePersistence | null;
    },
  ) {
    options.persistence?.onExternalChange((rules) => this.replaceAll(rules, 'another instance'));
  }

  /** Loads the persisted rules and starts expiring them. */
  async start(sweepMs = 1000): Promise<void> {
    if (this.options.persistence) this.replaceAll(await this.options.persistence.load(), 'state');
    this.timer = setInterval(() => this.sweep(), sweepMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** True when no rule exists: the gate's fast path. */
  get empty(): boolean {
    return this.byId.size === 0;
  }

  /** Rules on one shape (unexpired), or undefined. */
  forFingerprint(fingerprint: string): readonly Rule[] | undefined {
    return this.byFingerprint.get(fingerprint);
  }

  list(): Rule[] {
    return [...this.byId.values()];
  }

  get(id: string): Rule | undefined {
    return this.byId.get(id);
  }

  onChange(listener: RuleChangeListener): void {
    this.listeners.push(listener);
  }

  /** Adds a rule: persisted first, so a rule the API confirmed survives a restart. */
  async add(rule: Rule): Promise<Rule> {
    await this.options.persistence?.add(rule);
    this.byId.set(rule.id, rule);
    this.reindex();
    this.options.events?.add({
      type: 'rule_added',
      fingerprint: rule.fingerprint,
      summary: `${rule.action} rule ${rule.id} by ${rule.created_by}: ${rule.reason}`,
      details: { rule },
    });
    this.options.log.info({ rule }, 'rule added');
    return rule;
  }

  /** Lifts a rule; false if there is no such rule. */
  async remove(id: string, by: string, why = 'lifted'): Promise<boolean> {
    const rule = this.byId.get(id);
    if (!rule) return false;
    await this.options.persistence?.remove(id);
    this.byId.delete(id);
    this.reindex();
    this.options.events?.add({
      type: 'rule_removed',
      fingerprint: rule.fingerprint,
      summary: `${rule.action} rule ${rule.id} ${why} by ${by}`,
      details: { rule },
    });
    this.options.log.info({ rule: id, by, why }, 'rule removed');
    return true;
  }

  /** Drops expired rules (also from persistence). */
  sweep(): void {
    const now = this.options.clock.now();
    for (const rule of this.byId.values()) {
      if (!isExpired(rule, now)) continue;
      this.remove(rule.id, 'ttl', 'expired').catch((err: Error) => {
        // Not persisted as removed (control database down): stop enforcing it anyway.
        this.options.log.warn({ err, rule: rule.id }, 'expired rule could not be removed from persistence');
        this.byId.delete(rule.id);
        this.reindex();
      });
    }
  }

  private replaceAll(rules: readonly Rule[], from: string): void {
    const now = this.options.clock.now();
    this.byId.clear();
    for (const rule of rules) if (isRule(rule) && !isExpired(rule, now)) this.byId.set(rule.id, rule);
    this.reindex();
    this.options.log.debug({ rules: this.byId.size, from }, 'rules loaded');
  }

  private reindex(): void {
    const index = new Map<string, Rule[]>();
    for (const rule of this.byId.values()) {
      const list = index.get(rule.fingerprint);
      if (list) list.push(rule);
      else index.set(rule.fingerprint, [rule]);
    }
    this.byFingerprint = index;
    const rules = this.list();
    for (const listener of this.listeners) listener(rules);
  }
}
