// The rules feature: where rules are kept (control database, state file, or the
// cluster primary for a worker), the store and the gate the proxy asks, and the
// replica pools reroute rules send queries to. Part of the composition root.

import { createHash } from 'node:crypto';
import os from 'node:os';
import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { Config } from '../config.ts';
import type { EventLog } from '../events/timeline.ts';
import { RulesGate } from '../rules/gate.ts';
import type { RulePersistence } from '../rules/persistence.ts';
import { ReplicaPool } from '../rules/replica.ts';
import { createRule, type Rule } from '../rules/rule.ts';
import { RuleStore } from '../rules/store.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { ControlDatabase } from '../state/control.ts';
import { StateFile } from '../state/file.ts';
import type { WorkerLink } from './workers.ts';

export interface RulesFeature {
  readonly persistence: RulePersistence;
  readonly store: RuleStore;
  readonly gate: RulesGate;
  readonly replicas: ReadonlyMap<string, ReplicaPool>;
  readonly log: Logger;
  /** Makes these config-file rules (see configRules) the ones in force; a worker's come from the primary. */
  applyConfigRules(wanted: readonly Rule[]): Promise<void>;
  close(): Promise<void>;
}

export async function openRules(
  config: Config,
  log: Logger,
  clock: Clock,
  events: EventLog,
  finder: ShapeFinder,
  worker: WorkerLink | null,
): Promise<RulesFeature> {
  const rulesLog = log.child({ component: 'rules' });
  // Persisted in the control database when there is one, else in the state file.
  const persistence: RulePersistence = worker
    ? worker.rules
    : config.control_url
      ? await ControlDatabase.open({
          url: config.control_url,
          instance: config.instance_name ?? `${os.hostname()}:${process.pid}`,
          log: rulesLog,
        })
      : new StateFile(config.state_file, rulesLog);
  const store = new RuleStore({ clock, log: rulesLog, events, persistence });
  await store.start();
  const replicas = new Map(
    Object.entries(config.replicas).map(([name, r]) => [
      name,
      new ReplicaPool({
        name,
        url: r.url,
        size: r.pool_size,
        connectTimeoutMs: config.connect_timeout_ms,
        log: log.child({ component: 'replica', replica: name }),
      }),
    ]),
  );
  const gate = new RulesGate({ store, finder, replicas, log: rulesLog });
  const feature: RulesFeature = {
    persistence,
    store,
    gate,
    replicas,
    log: rulesLog,
    async applyConfigRules(wanted) {
      if (!worker) await syncConfigRules(store, wanted);
    },
    async close() {
      store.stop();
      await Promise.all([...replicas.values()].map((r) => r.close()));
      await persistence.close();
    },
  };
  await feature.applyConfigRules(configRules(config, clock.now()));
  return feature;
}

/** The config file's rules, each with an id derived from its content (throws RuleError on a bad one). */
export function configRules(config: Config, now: number): Rule[] {
  return config.rules.map((input) => {
    const id = `cfg-${createHash('sha256').update(JSON.stringify(input)).digest('hex').slice(0, 10)}`;
    return createRule({ created_by: 'config', ...input }, now, 'config', id);
  });
}

/** Makes the config's rules the ones in force: adds new ones, lifts those no longer in the config. */
async function syncConfigRules(store: RuleStore, wanted: readonly Rule[]): Promise<void> {
  const ids = new Set(wanted.map((r) => r.id));
  for (const rule of wanted) if (!store.get(rule.id)) await store.add(rule);
  for (const rule of store.list()) {
    if (rule.id.startsWith('cfg-') && !ids.has(rule.id))
      await store.remove(rule.id, 'config', 'no longer in the configuration');
  }
}
