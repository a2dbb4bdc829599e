// Mitigation that cannot make an incident worse, against a real server: under a
// tpcb-like workload (BEGIN, SET, UPDATE, SELECT, INSERT, END), COMMIT becomes slow
// (a deferred constraint trigger) and the policy on enforce opens incidents; it
// must never refuse BEGIN, SET, COMMIT or ROLLBACK. And manual rules: one on a
// control statement needs force, one on an unseen shape comes with a warning.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { runRules } from '../../src/cli/rules.ts';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { fastDetection } from '../harness/incident.ts';

const T = 'pgw_tpcb';
const ACCOUNTS = 20_000;
const BRANCHES = 4;
const CLIENTS = 4;

/** The statements of one transaction, by kind; the kind names the refusal counters. */
const SCRIPT: { kind: string; text: string; values?: (rand: () => number) => unknown[] }[] = [
  { kind: 'BEGIN', text: 'BEGIN' },
  { kind: 'SET', text: "SET LOCAL statement_timeout = '20s'" },
  {
    kind: 'UPDATE accounts',
    text: `UPDATE ${T}_accounts SET abalance = abalance + $1 WHERE aid = $2`,
    values: (r) => [r() % 100, 1 + (r() % ACCOUNTS)],
  },
  {
    kind: 'SELECT accounts',
    text: `SELECT abalance FROM ${T}_accounts WHERE aid = $1`,
    values: (r) => [1 + (r() % ACCOUNTS)],
  },
  {
    kind: 'UPDATE tellers',
    text: `UPDATE ${T}_tellers SET tbalance = tbalance + $1 WHERE tid = $2`,
    values: (r) => [r() % 100, 1 + (r() % (BRANCHES * 10))],
  },
  {
    kind: 'UPDATE branches',
    text: `UPDATE ${T}_branches SET bbalance = bbalance + $1 WHERE bid = $2`,
    values: (r) => [r() % 100, 1 + (r() % BRANCHES)],
  },
  {
    kind: 'INSERT history',
    text: `INSERT INTO ${T}_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, now())`,
    values: (r) => [1, 1, 1 + (r() % ACCOUNTS), r() % 100],
  },
  { kind: 'END', text: 'END' },
];
const CONTROL_KINDS = ['BEGIN', 'SET', 'END', 'ROLLBACK'];

interface Tpcb {
  committed: number;
  refusals: Map<string, number>;
  stop(): Promise<void>;
}

async function startTpcb(url: string): Promise<Tpcb> {
  const state: Tpcb = { committed: 0, refusals: new Map(), stop: async () => undefined };
  let running = true;
  let seed = 1;
  const rand = () => (seed = (seed * 48271) % 2147483647);
  const refused = (kind: string, err: Error) => {
    if (err.message.startsWith('pgwarden:')) state.refusals.set(kind, (state.refusals.get(kind) ?? 0) + 1);
  };
  const clients = await Promise.all(
    Array.from({ length: CLIENTS }, async () => {
      const c = new pg.Client({ connectionString: url, application_name: 'tpcb' });
      c.on('error', () => undefined);
      await c.connect();
      return c;
    }),
  );
  const loops = clients.map(async (c) => {
    while (running) {
      let failed = false;
      for (const step of SCRIPT) {
        try {
          await c.query(step.text, step.values?.(rand));
        } catch (err) {
          refused(step.kind, err as Error);
          failed = true;
          break;
        }
      }
      if (!failed) state.committed++;
      else {
        try {
          await c.query('ROLLBACK');
        } catch (err) {
          refused('ROLLBACK', err as Error);
        }
      }
    }
  });
  state.stop = async () => {
    running = false;
    await Promise.all(loops);
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
  };
  return state;
}

async function createTpcbTables(): Promise<void> {
  await withClient(async (c) => {
    await dropTpcbTables(c);
    await c.query(`create table ${T}_branches (bid int primary key, bbalance int not null default 0)`);
    await c.query(`create table ${T}_tellers (tid int primary key, bid int, tbalance int not null default 0)`);
    await c.query(
      `create table ${T}_accounts (aid int primary key, bid int, abalance int not null default 0, filler char(84))`,
    );
    await c.query(`create table ${T}_history (tid int, bid int, aid int, delta int, mtime timestamp)`);
    await c.query(`insert into ${T}_branches (bid) select g from generate_series(1, ${BRANCHES}) g`);
    await c.query(
      `insert into ${T}_tellers (tid, bid) select g, 1 + g % ${BRANCHES} from generate_series(1, ${BRANCHES * 10}) g`,
    );
    await c.query(
      `insert into ${T}_accounts (aid, bid) select g, 1 + g % ${BRANCHES} from generate_series(1, ${ACCOUNTS}) g`,
    );
    await c.query(`analyze ${T}_accounts`);
  });
}

async function dropTpcbTables(c: pg.Client): Promise<void> {
  await c.query(`drop table if exists ${T}_branches, ${T}_tellers, ${T}_accounts, ${T}_history`);
  await c.query(`drop function if exists ${T}_slow_commit() cascade`);
}

interface Decision {
  action: string;
  fingerprint: string | null;
  refused: { fingerprint: string | null; reason: string }[];
}

describe('mitigation on enforce under a tpcb-like workload', { timeout: 180_000 }, () => {
  let pgw: TestApp;
  let tpcb: Tpcb;

  before(async () => {
    await createTpcbTables();
    pgw = await startTestApp({
      ...fastDetection(),
      mitigation: 'enforce',
      mitigation_max_concurrent: 1,
      mitigation_queue_timeout_ms: 20,
    });
    tpcb = await startTpcb(pgw.url());
  });

  after(async () => {
    await tpcb?.stop();
    await pgw?.stop();
    await withClient(dropTpcbTables);
  });

  test('a slow COMMIT opens an incident the policy refuses to shed, and no BEGIN, SET, COMMIT or ROLLBACK is ever refused', async () => {
    const shapeOf = async (prefix: string) => {
      const { body } = await pgw.api('/api/shapes?sort=calls&limit=100');
      return (body as { fingerprint: string; query: string; command: string }[]).find((s) =>
        s.query.startsWith(prefix),
      );
    };
    const end = await waitFor(
      async () => {
        const shape = await shapeOf('END');
        if (!shape) return undefined;
        const { body } = await pgw.api(`/api/shapes/${shape.fingerprint}`);
        return body.series.length >= 8 ? shape : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'a baseline for END' },
    );
    const before = tpcb.committed;
    // COMMIT now runs a 30 ms trigger per inserted history row: the commit itself regresses.
    await withClient(async (c) => {
      await c.query(
        `create function ${T}_slow_commit() returns trigger language plpgsql as $$ begin perform pg_sleep(0.03); return null; end $$`,
      );
      await c.query(
        `create constraint trigger ${T}_slow_commit after insert on ${T}_history deferrable initially deferred for each row execute function ${T}_slow_commit()`,
      );
    });

    // The incident that takes in the slow COMMIT: END as its root (the policy refuses it,
    // a control statement), END as a victim of another root (row locks held across the slow
    // commit can slow the UPDATEs first, or an incident opened earlier on a busy host takes
    // END in), or one database-wide incident. Whichever: the policy decided about it.
    type Involved = {
      id: string;
      kind: string;
      root: string | null;
      fingerprint: string;
      victims: { fingerprint: string }[];
    };
    const involvesEnd = (i: Involved) =>
      i.kind === 'database_wide' ||
      i.root === end.fingerprint ||
      i.fingerprint === end.fingerprint ||
      i.victims.some((v) => v.fingerprint === end.fingerprint);
    let seen = '';
    const found = await waitFor(
      async () => {
        const { body: incidents } = await pgw.api('/api/incidents');
        const { body: mitigation } = await pgw.api('/api/mitigation');
        // What a timeout reports: the incidents and decisions the test saw last.
        seen = JSON.stringify({
          incidents: (incidents as Involved[]).map((i) => [i.id, i.kind, i.root, i.victims.length]),
          decisions: mitigation.decisions,
        }).slice(0, 2000);
        for (const i of incidents as Involved[]) {
          if (!involvesEnd(i)) continue;
          const decided = (mitigation.decisions as (Decision & { incident: string })[]).filter(
            (d) => d.incident === i.id,
          );
          if (decided.length > 0) return { incident: i, decisions: decided };
        }
        return undefined;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the policy to decide about the incident that takes in END' },
    ).catch((err: Error) => {
      throw new Error(`${err.message}; seen: ${seen}`);
    });
    const { incident, decisions } = found;
    for (const d of decisions) assert.notEqual(d.fingerprint, end.fingerprint, `the policy shed END: ${d.action}`);
    const endRefusal = decisions.flatMap((d) => d.refused).find((r) => r.fingerprint === end.fingerprint);
    if (incident.root === end.fingerprint || incident.fingerprint === end.fingerprint) {
      assert.ok(endRefusal, `the policy says why it left END alone: ${JSON.stringify(decisions)}`);
      assert.match(endRefusal.reason, /transaction-control or session statement \(TransactionStmt\)|a victim of root/);
    }
    // Keep the workload running under the incident for a while, then count.
    const until = Date.now() + 5_000;
    await waitFor(() => Date.now() >= until, {
      timeoutMs: 10_000,
      intervalMs: 200,
      what: '5 s more under the incident',
    });
    for (const kind of CONTROL_KINDS)
      assert.equal(tpcb.refusals.get(kind) ?? 0, 0, `${kind} refused ${tpcb.refusals.get(kind)} time(s)`);
    assert.ok(tpcb.committed > before, 'transactions kept committing');

    const { body: rules } = await pgw.api('/api/rules');
    const { body: shapes } = await pgw.api('/api/shapes?limit=100');
    const commandOf = new Map(
      (shapes as { fingerprint: string; command: string }[]).map((s) => [s.fingerprint, s.command]),
    );
    for (const rule of rules as { fingerprint: string; created_by: string }[]) {
      assert.ok(
        !['BEGIN', 'SET', 'END', 'ROLLBACK'].includes(commandOf.get(rule.fingerprint) ?? ''),
        `the policy put a rule on ${commandOf.get(rule.fingerprint)}`,
      );
    }
    const { body: events } = await pgw.api('/api/events?type=mitigation');
    assert.ok(
      (events as { details: { incident?: string } }[]).some((e) => e.details.incident === incident.id),
      'the decision is on the timeline',
    );
    console.log(
      `# incident ${incident.kind} rooted at ${incident.root === end.fingerprint ? 'END' : incident.root}; decisions ${JSON.stringify(decisions.map((d) => d.action))}; refusals by statement kind: ${JSON.stringify(Object.fromEntries(tpcb.refusals))}; committed ${tpcb.committed}`,
    );
  });
});

describe('manual rules: force for control statements, a warning for unseen shapes', () => {
  let pgw: TestApp;
  let commitFingerprint: string;
  const cli = async (args: string[]) => {
    let out = '';
    let err = '';
    const code = await runRules(
      [...args, '--admin', `127.0.0.1:${pgw.app.adminPort}`, '--token', pgw.config.admin_token!],
      { write: (t: string) => (out += t) },
      { write: (t: string) => (err += t) },
    );
    return { code, out, err };
  };

  before(async () => {
    pgw = await startTestApp();
    const c = new pg.Client({ connectionString: pgw.url() });
    await c.connect();
    await c.query('begin');
    await c.query('commit');
    await c.end();
    commitFingerprint = await waitFor(async () => {
      const { body } = await pgw.api('/api/shapes?limit=100');
      return (body as { fingerprint: string; command: string }[]).find((s) => s.command === 'COMMIT')?.fingerprint;
    });
  });

  after(() => pgw?.stop());

  test('a rule on a fingerprint never seen is accepted with a warning', async () => {
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'block', fingerprint: 'deadbeefdeadbeef', reason: 'typo?' },
    });
    assert.equal(status, 201);
    assert.deepEqual(body.warnings, ['no shape with this fingerprint has been seen by this instance']);
    const { body: rules } = await pgw.api('/api/rules');
    assert.equal((rules as { id: string; seen: boolean }[]).find((r) => r.id === body.id)?.seen, false);
  });

  test('the CLI prints the unseen-shape warning', async () => {
    const result = await cli(['block', 'feedfacefeedface', '--reason', 'typo?']);
    assert.equal(result.code, 0);
    assert.match(result.err, /warning: no shape with this fingerprint has been seen by this instance/);
    assert.match((await cli(['list'])).out, /feedfacefeedface.*shape never seen here/);
  });

  test('a rule on COMMIT is refused without force, and the refusal says why it is dangerous', async () => {
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'shed', fingerprint: commitFingerprint, max_concurrent: 1, reason: 'x' },
    });
    assert.equal(status, 409);
    assert.match(body.error, /transaction-control or session statement \(TransactionStmt\).*outage.*force/);
    const result = await cli(['block', commitFingerprint]);
    assert.equal(result.code, 1);
    assert.match(result.err, /--force/);
  });

  test('with force a rule on COMMIT is accepted (API field and CLI flag)', async () => {
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'block', fingerprint: commitFingerprint, reason: 'on purpose', force: true, ttl_s: 5 },
    });
    assert.equal(status, 201);
    assert.deepEqual(body.warnings, []);
    assert.equal(body.seen, true);
    const result = await cli(['block', commitFingerprint, '--force', '--ttl', '5']);
    assert.equal(result.code, 0, result.err);
  });
});
