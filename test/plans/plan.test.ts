// Plan summaries, fingerprints and diffs: the rules on small inline plans, then
// the same promises against plans the server actually produces (an index lookup
// that turns into a Seq Scan when its index is dropped, a backward index scan, a
// join) and a check that every node description is how text EXPLAIN words it.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { describeEstimates, describePlan, diffPlans, summarizePlan, type PlanSummary } from '../../src/plans/plan.ts';
import { testDatabase } from '../harness/database.ts';

type Json = Record<string, unknown>;

/** A plan node as EXPLAIN (FORMAT JSON) writes it, with made-up costs. */
function n(nodeType: string, props: Json = {}, ...children: Json[]): Json {
  return {
    'Node Type': nodeType,
    'Parallel Aware': false,
    'Async Capable': false,
    'Startup Cost': 0,
    'Total Cost': 100,
    'Plan Rows': 10,
    'Plan Width': 40,
    ...props,
    ...(children.length > 0 ? { Plans: children } : {}),
  };
}

/** EXPLAIN's output shape: an array holding one object with "Plan". */
function plan(root: Json): PlanSummary {
  return summarizePlan([{ Plan: root }]);
}

const indexScan = (index: string, relation: string, props: Json = {}): Json =>
  n('Index Scan', {
    'Scan Direction': 'Forward',
    'Index Name': index,
    'Relation Name': relation,
    Alias: relation,
    ...props,
  });
const seqScan = (relation: string, props: Json = {}): Json =>
  n('Seq Scan', { 'Relation Name': relation, Alias: relation, ...props });
const inner = (node: Json): Json => ({ ...node, 'Parent Relationship': 'Inner' });
const outer = (node: Json): Json => ({ ...node, 'Parent Relationship': 'Outer' });
const hashJoin = (left: Json, right: Json, joinType = 'Inner'): Json =>
  n(
    'Hash Join',
    { 'Join Type': joinType, 'Hash Cond': '(o.customer_id = u.id)' },
    outer(left),
    inner(n('Hash', {}, outer(right))),
  );
const nestedLoop = (left: Json, right: Json, joinType = 'Inner'): Json =>
  n('Nested Loop', { 'Join Type': joinType }, outer(left), inner(right));

// Captured from PostgreSQL 18: `explain (format json) select * from users where email = 'user42@example.com'`.
const PG18_EMAIL_LOOKUP = [
  {
    Plan: {
      'Node Type': 'Index Scan',
      'Parallel Aware': false,
      'Async Capable': false,
      'Scan Direction': 'Forward',
      'Index Name': 'users_email_idx',
      'Relation Name': 'users',
      Alias: 'users',
      'Startup Cost': 0.29,
      'Total Cost': 8.3,
      'Plan Rows': 1,
      'Plan Width': 45,
      Disabled: false,
      'Index Cond': "(email = 'user42@example.com'::text)",
    },
  },
];

// Captured from PostgreSQL 15 (COSTS OFF): `select * from t where id = (select max(id) from t)`.
// Older servers name InitPlans "InitPlan 2 (returns $1)"; 18 says "InitPlan 2".
const PG15_INITPLAN = [
  {
    Plan: {
      'Node Type': 'Index Scan',
      'Parallel Aware': false,
      'Async Capable': false,
      'Scan Direction': 'Forward',
      'Index Name': 't_pkey',
      'Relation Name': 't',
      Alias: 't',
      'Index Cond': '(id = $1)',
      Plans: [
        {
          'Node Type': 'Result',
          'Parent Relationship': 'InitPlan',
          'Subplan Name': 'InitPlan 2 (returns $1)',
          'Parallel Aware': false,
          'Async Capable': false,
          Plans: [
            {
              'Node Type': 'Limit',
              'Parent Relationship': 'InitPlan',
              'Subplan Name': 'InitPlan 1 (returns $0)',
              'Parallel Aware': false,
              'Async Capable': false,
              Plans: [
                {
                  'Node Type': 'Index Only Scan',
                  'Parent Relationship': 'Outer',
                  'Parallel Aware': false,
                  'Async Capable': false,
                  'Scan Direction': 'Backward',
                  'Index Name': 't_pkey',
                  'Relation Name': 't',
                  Alias: 't_1',
                  'Index Cond': '(id IS NOT NULL)',
                },
              ],
            },
          ],
        },
      ],
    },
  },
];

describe('summarizePlan', () => {
  test('a real index lookup is summarized with its relation, index, cost and rows', () => {
    const summary = summarizePlan(PG18_EMAIL_LOOKUP);
    assert.match(summary.fingerprint, /^[0-9a-f]{16}$/);
    assert.deepEqual(summary.nodes, [
      {
        nodeType: 'Index Scan',
        relation: 'users',
        index: 'users_email_idx',
        scanDirection: 'Forward',
        description: 'Index Scan using users_email_idx on users',
        depth: 0,
        planRows: 1,
      },
    ]);
    assert.equal(describeEstimates(summary), 'Index Scan using users_email_idx on users (est. 1 rows)');
    assert.deepEqual(summary.relations, ['users']);
    assert.deepEqual(summary.indexes, ['users_email_idx']);
    assert.equal(summary.totalCost, 8.3);
    assert.equal(summary.planRows, 1);
  });

  test('the array, its single object, a JSON string and a result row all summarize alike', () => {
    const expected = summarizePlan(PG18_EMAIL_LOOKUP);
    assert.deepEqual(summarizePlan(PG18_EMAIL_LOOKUP[0]), expected);
    assert.deepEqual(summarizePlan(JSON.stringify(PG18_EMAIL_LOOKUP)), expected);
    assert.deepEqual(summarizePlan({ 'QUERY PLAN': PG18_EMAIL_LOOKUP }), expected);
  });

  test('InitPlans are part of the tree, in pre-order, with their own depth', () => {
    const summary = summarizePlan(PG15_INITPLAN);
    assert.deepEqual(
      summary.nodes.map((node) => [node.depth, node.description]),
      [
        [0, 'Index Scan using t_pkey on t'],
        [1, 'Result'],
        [2, 'Limit'],
        [3, 'Index Only Scan Backward using t_pkey on t'],
      ],
    );
    assert.deepEqual(summary.relations, ['t']);
    assert.deepEqual(summary.indexes, ['t_pkey']);
  });

  test('a plan taken with COSTS OFF has zero cost and rows', () => {
    const summary = summarizePlan(PG15_INITPLAN);
    assert.equal(summary.totalCost, 0);
    assert.equal(summary.planRows, 0);
  });

  test('descriptions follow text EXPLAIN: strategies, join types, partial modes, operations', () => {
    const cases: [Json, string][] = [
      [n('Aggregate', { Strategy: 'Plain', 'Partial Mode': 'Simple' }), 'Aggregate'],
      [n('Aggregate', { Strategy: 'Sorted', 'Partial Mode': 'Simple' }), 'GroupAggregate'],
      [n('Aggregate', { Strategy: 'Hashed', 'Partial Mode': 'Partial' }), 'Partial HashAggregate'],
      [n('Aggregate', { Strategy: 'Mixed', 'Partial Mode': 'Finalize' }), 'Finalize MixedAggregate'],
      [n('SetOp', { Strategy: 'Hashed', Command: 'Except All' }), 'HashSetOp Except All'],
      [n('Hash Join', { 'Join Type': 'Left' }), 'Hash Left Join'],
      [n('Hash Join', { 'Join Type': 'Right Anti' }), 'Hash Right Anti Join'],
      [n('Nested Loop', { 'Join Type': 'Inner' }), 'Nested Loop'],
      [n('Nested Loop', { 'Join Type': 'Left' }), 'Nested Loop Left Join'],
      [n('Merge Join', { 'Join Type': 'Inner' }), 'Merge Join'],
      [n('Merge Join', { 'Join Type': 'Full' }), 'Merge Full Join'],
      [n('ModifyTable', { Operation: 'Update', 'Relation Name': 'users', Alias: 'users' }), 'Update on users'],
      [n('Seq Scan', { 'Parallel Aware': true, 'Relation Name': 'users', Alias: 'u' }), 'Parallel Seq Scan on users'],
      [n('Bitmap Index Scan', { 'Index Name': 'users_email_idx' }), 'Bitmap Index Scan on users_email_idx'],
      [
        n('Index Only Scan', { 'Scan Direction': 'Backward', 'Index Name': 'x', 'Relation Name': 't', Alias: 't' }),
        'Index Only Scan Backward using x on t',
      ],
      [n('Function Scan', { 'Function Name': 'generate_series', Alias: 'g' }), 'Function Scan on generate_series'],
      [n('Values Scan', { Alias: '*VALUES*' }), 'Values Scan on "*VALUES*"'],
      [n('CTE Scan', { 'CTE Name': 'recent', Alias: 'r' }), 'CTE Scan on recent'],
      [n('Seq Scan', { 'Relation Name': 'Users', Alias: 'Users' }), 'Seq Scan on "Users"'],
      [
        n('Custom Scan', { 'Custom Plan Provider': 'ColumnarScan', 'Relation Name': 't', Alias: 't' }),
        'Custom Scan (ColumnarScan) on t',
      ],
    ];
    for (const [node, expected] of cases) assert.equal(plan(node).nodes[0].description, expected);
  });

  test('malformed input throws an error that says what was wrong', () => {
    assert.throws(
      () => summarizePlan(42),
      /summarizePlan: expected EXPLAIN \(FORMAT JSON\) output with a "Plan" object, got 42/,
    );
    assert.throws(() => summarizePlan([]), /an array of one plan, got 0 elements/);
    assert.throws(() => summarizePlan('{not json'), /summarizePlan: not JSON/);
    assert.throws(() => summarizePlan({ Plan: { 'Total Cost': 1 } }), /\$\.Plan has no "Node Type" string/);
    assert.throws(() => summarizePlan({ Plan: n('Limit', { Plans: {} }) }), /\$\.Plan\.Plans is not an array/);
    assert.throws(
      () => summarizePlan({ Plan: n('Limit', {}, n('Sort', { 'Relation Name': 7 })) }),
      /\$\.Plan\.Plans\[0\]\."Relation Name" is not a string/,
    );
    assert.throws(
      () => summarizePlan({ Plan: n('Limit', { Plans: [null] }) }),
      /\$\.Plan\.Plans\[0\] is not a plan node/,
    );
  });
});

describe('schemas (EXPLAIN VERBOSE)', () => {
  const lookup = (schema: string) => [
    {
      Plan: {
        'Node Type': 'Index Scan',
        'Parallel Aware': false,
        'Async Capable': false,
        'Scan Direction': 'Forward',
        'Index Name': 'accounts_email_idx',
        'Relation Name': 'accounts',
        Schema: schema,
        Alias: 'accounts',
        'Total Cost': 8.3,
        'Plan Rows': 1,
        Output: ['id'],
      },
    },
  ];

  test("relations and indexes are listed with their table's schema; descriptions name schemas other than public", () => {
    const tenant = summarizePlan(lookup('tenant_b'));
    assert.deepEqual(tenant.relations, ['tenant_b.accounts']);
    assert.deepEqual(tenant.indexes, ['tenant_b.accounts_email_idx']);
    assert.deepEqual(tenant.schemas, ['tenant_b']);
    assert.equal(tenant.nodes[0].description, 'Index Scan using accounts_email_idx on tenant_b.accounts');
    const common = summarizePlan(lookup('public'));
    assert.deepEqual(common.relations, ['public.accounts']);
    assert.equal(common.nodes[0].description, 'Index Scan using accounts_email_idx on accounts');
  });

  test("another schema's table is another plan; every session's temporary schema is one", () => {
    assert.notEqual(summarizePlan(lookup('tenant_a')).fingerprint, summarizePlan(lookup('tenant_b')).fingerprint);
    const temp = summarizePlan(lookup('pg_temp_3'));
    assert.equal(temp.fingerprint, summarizePlan(lookup('pg_temp_12')).fingerprint);
    assert.deepEqual(temp.schemas, ['pg_temp']);
  });

  test('a plan without schemas (no VERBOSE) keeps the names it always had, and the fingerprint of public', () => {
    const plain = lookup('x');
    delete (plain[0].Plan as Record<string, unknown>).Schema;
    const summary = summarizePlan(plain);
    assert.equal(summary.fingerprint, summarizePlan(lookup('public')).fingerprint);
    assert.notEqual(summary.fingerprint, summarizePlan(lookup('tenant_a')).fingerprint);
    assert.deepEqual(summary.relations, ['accounts']);
    assert.deepEqual(summary.schemas, []);
    assert.equal(summary.nodes[0].description, 'Index Scan using accounts_email_idx on accounts');
  });
});

describe('plan fingerprints', () => {
  test('costs, row estimates, widths, conditions and aliases do not change the fingerprint', () => {
    const a = plan(hashJoin(seqScan('orders', { Filter: '(total > 10)' }), seqScan('users', { Alias: 'u' })));
    const b = plan({
      ...hashJoin(
        seqScan('orders', { Filter: '(total > 99)', 'Total Cost': 5, 'Plan Rows': 1 }),
        seqScan('users', { Alias: 'x' }),
      ),
      'Total Cost': 12345,
      'Plan Rows': 999,
      'Plan Width': 1,
    });
    assert.equal(a.fingerprint, b.fingerprint);
  });

  test('an index swap, a Seq Scan, a scan direction or a join type changes the fingerprint', () => {
    const base = plan(indexScan('users_email_idx', 'users')).fingerprint;
    assert.notEqual(plan(indexScan('users_email_name_idx', 'users')).fingerprint, base);
    assert.notEqual(plan(seqScan('users')).fingerprint, base);
    assert.notEqual(plan(indexScan('users_email_idx', 'users', { 'Scan Direction': 'Backward' })).fingerprint, base);
    const join = (type: string) => plan(hashJoin(seqScan('orders'), seqScan('users'), type)).fingerprint;
    assert.notEqual(join('Left'), join('Inner'));
  });

  test('swapping the inputs of a join changes the fingerprint', () => {
    const a = plan(hashJoin(seqScan('orders'), seqScan('users')));
    const b = plan(hashJoin(seqScan('users'), seqScan('orders')));
    assert.notEqual(a.fingerprint, b.fingerprint);
  });

  test('the same nodes under another parent relationship are another plan', () => {
    const asInitPlan = plan(n('Result', {}, { ...n('Limit'), 'Parent Relationship': 'InitPlan' }));
    const asSubPlan = plan(n('Result', {}, { ...n('Limit'), 'Parent Relationship': 'SubPlan' }));
    assert.notEqual(asInitPlan.fingerprint, asSubPlan.fingerprint);
  });
});

describe('diffPlans', () => {
  test('identical plans give an empty headline and no changes', () => {
    const a = plan(indexScan('users_email_idx', 'users'));
    const b = plan(indexScan('users_email_idx', 'users', { 'Total Cost': 99 }));
    assert.deepEqual(diffPlans(a, b), { headline: '', removed: [], added: [] });
  });

  test('an index scan replaced by a Seq Scan pairs the two on their relation', () => {
    const before = plan(n('Limit', {}, outer(indexScan('users_email_idx', 'users'))));
    const after = plan(n('Limit', {}, outer(seqScan('users'))));
    assert.deepEqual(diffPlans(before, after), {
      headline: 'Index Scan using users_email_idx on users -> Seq Scan on users',
      removed: ['Index Scan using users_email_idx on users'],
      added: ['Seq Scan on users'],
    });
  });

  test('access paths that changed on several relations are listed together', () => {
    const before = plan(nestedLoop(indexScan('users_email_idx', 'users'), indexScan('orders_customer_idx', 'orders')));
    const after = plan(hashJoin(seqScan('orders'), seqScan('users')));
    const diff = diffPlans(before, after);
    assert.equal(
      diff.headline,
      'Index Scan using users_email_idx on users -> Seq Scan on users; Index Scan using orders_customer_idx on orders -> Seq Scan on orders',
    );
    assert.deepEqual(diff.removed, [
      'Nested Loop',
      'Index Scan using users_email_idx on users',
      'Index Scan using orders_customer_idx on orders',
    ]);
    assert.deepEqual(diff.added, ['Hash Join', 'Seq Scan on orders', 'Hash', 'Seq Scan on users']);
  });

  test('a bitmap scan is shown with the index it reads', () => {
    const bitmap = n(
      'Bitmap Heap Scan',
      { 'Relation Name': 'users', Alias: 'users', 'Recheck Cond': '(email = $1)' },
      outer(n('Bitmap Index Scan', { 'Index Name': 'users_email_idx' })),
    );
    const diff = diffPlans(plan(bitmap), plan(seqScan('users')));
    assert.equal(
      diff.headline,
      'Bitmap Heap Scan on users (Bitmap Index Scan on users_email_idx) -> Seq Scan on users',
    );
    assert.deepEqual(diff.removed, ['Bitmap Heap Scan on users', 'Bitmap Index Scan on users_email_idx']);
  });

  test('only join nodes changing pairs the first removed with the first added', () => {
    const before = plan(hashJoin(seqScan('orders'), seqScan('users')));
    const after = plan(nestedLoop(seqScan('orders'), n('Materialize', {}, outer(seqScan('users')))));
    assert.deepEqual(diffPlans(before, after), {
      headline: 'Hash Join -> Nested Loop',
      removed: ['Hash Join', 'Hash'],
      added: ['Nested Loop', 'Materialize'],
    });
  });

  test('a node that only appears reads "+ X", one that only disappears "- X"', () => {
    const bare = plan(seqScan('users'));
    const sorted = plan(n('Sort', { 'Sort Key': ['name'] }, outer(seqScan('users'))));
    assert.deepEqual(diffPlans(bare, sorted), { headline: '+ Sort', removed: [], added: ['Sort'] });
    assert.deepEqual(diffPlans(sorted, bare), { headline: '- Sort', removed: ['Sort'], added: [] });
  });

  test('removed and added are multiset differences: one of two identical scans can change', () => {
    const before = plan(hashJoin(seqScan('users', { Alias: 'a' }), seqScan('users', { Alias: 'b' })));
    const after = plan(hashJoin(seqScan('users', { Alias: 'a' }), indexScan('users_pkey', 'users', { Alias: 'b' })));
    assert.deepEqual(diffPlans(before, after), {
      headline: 'Seq Scan on users -> Index Scan using users_pkey on users',
      removed: ['Seq Scan on users'],
      added: ['Index Scan using users_pkey on users'],
    });
  });

  test('a scan on a new relation reads "+ X"', () => {
    const before = plan(seqScan('users'));
    const after = plan(hashJoin(seqScan('users'), seqScan('orders')));
    assert.equal(diffPlans(before, after).headline, '+ Seq Scan on orders');
  });

  test('the same nodes rearranged still get a headline', () => {
    const before = plan(hashJoin(seqScan('orders'), seqScan('users')));
    const after = plan(hashJoin(seqScan('users'), seqScan('orders')));
    assert.deepEqual(diffPlans(before, after), {
      headline: 'Seq Scan on orders; Seq Scan on users -> Seq Scan on users; Seq Scan on orders',
      removed: [],
      added: [],
    });
  });
});

describe('describePlan', () => {
  test('lists the scans in plan order', () => {
    const summary = plan(hashJoin(seqScan('users'), indexScan('orders_pkey', 'orders')));
    assert.equal(describePlan(summary), 'Seq Scan on users; Index Scan using orders_pkey on orders');
  });

  test('a plan without scans is described by its root', () => {
    assert.equal(describePlan(plan(n('Result'))), 'Result');
  });
});

// ---------------------------------------------------------------------------
// Against the server.

const SCHEMA = 'pgw_plan_fixture';
const LOOKUP = 'select * from users where email = $1';

describe('plans from PostgreSQL', () => {
  let client: pg.Client;
  const plans: Record<string, PlanSummary> = {};

  async function explain(sql: string, values: unknown[] = []): Promise<PlanSummary> {
    const { rows } = await client.query<{ 'QUERY PLAN': unknown }>(`explain (format json) ${sql}`, values);
    return summarizePlan(rows[0]['QUERY PLAN']);
  }

  before(async () => {
    client = new pg.Client({ connectionString: testDatabase().url });
    await client.connect();
    client.on('notice', () => {});
    await client.query(`drop schema if exists ${SCHEMA} cascade`);
    await client.query(`create schema ${SCHEMA}`);
    await client.query(`set search_path = ${SCHEMA}`);
    // Keep the plans small and deterministic whatever the server's defaults.
    await client.query('set max_parallel_workers_per_gather = 0');
    await client.query(`
      create table users (id bigint generated always as identity primary key, email text not null, name text not null);
      insert into users (email, name) select 'user' || g || '@example.com', 'name ' || (g % 500) from generate_series(1, 20000) g;
      create unique index users_email_idx on users (email);
      create table orders (id bigint generated always as identity primary key, customer_id bigint not null, created_at timestamptz not null);
      insert into orders (customer_id, created_at) select 1 + g % 20000, '2024-01-01'::timestamptz + g * interval '1 minute' from generate_series(1, 60000) g;
      create index orders_customer_id_idx on orders (customer_id);
      create index orders_created_at_idx on orders (created_at);
      analyze users;
      analyze orders;
    `);

    plans.lookup42 = await explain(LOOKUP, ['user42@example.com']);
    plans.lookup4242 = await explain(LOOKUP, ['user4242@example.com']);
    plans.lookupLiteral = await explain(`select * from users where email = 'user7@example.com'`);
    plans.join = await explain('select o.* from users u join orders o on o.customer_id = u.id where u.email = $1', [
      'user42@example.com',
    ]);
    plans.latest = await explain('select * from orders order by created_at desc limit 10');

    await client.query('drop index users_email_idx');
    plans.seqScan = await explain(LOOKUP, ['user42@example.com']);
    await client.query(
      `insert into users (email, name) select 'more' || g || '@example.com', 'x' from generate_series(1, 10000) g; analyze users`,
    );
    plans.seqScanBigger = await explain(LOOKUP, ['user42@example.com']);
    await client.query('create index users_name_idx on users (name)');
    plans.seqScanWithNameIndex = await explain(LOOKUP, ['user42@example.com']);
    await client.query('create unique index users_email_name_idx on users (email, name)');
    plans.otherIndex = await explain(LOOKUP, ['user42@example.com']);
  });

  after(async () => {
    await client.query(`drop schema if exists ${SCHEMA} cascade`);
    await client.end();
  });

  test('a lookup by unique email is an Index Scan using users_email_idx', () => {
    assert.deepEqual(
      plans.lookup42.nodes.map((node) => node.description),
      ['Index Scan using users_email_idx on users'],
    );
    assert.deepEqual(plans.lookup42.relations, ['users']);
    assert.deepEqual(plans.lookup42.indexes, ['users_email_idx']);
  });

  test('the same lookup with different constants has the same fingerprint', () => {
    assert.equal(plans.lookup4242.fingerprint, plans.lookup42.fingerprint);
    assert.equal(plans.lookupLiteral.fingerprint, plans.lookup42.fingerprint);
  });

  test('dropping the index changes the fingerprint and the diff names both access paths', () => {
    assert.notEqual(plans.seqScan.fingerprint, plans.lookup42.fingerprint);
    assert.deepEqual(diffPlans(plans.lookup42, plans.seqScan), {
      headline: 'Index Scan using users_email_idx on users -> Seq Scan on users',
      removed: ['Index Scan using users_email_idx on users'],
      added: ['Seq Scan on users'],
    });
  });

  test('costs that grow with the table leave the fingerprint alone', () => {
    assert.ok(plans.seqScanBigger.totalCost > plans.seqScan.totalCost);
    assert.equal(plans.seqScanBigger.fingerprint, plans.seqScan.fingerprint);
  });

  test('an index on another column leaves the lookup plan alone', () => {
    assert.equal(plans.seqScanWithNameIndex.fingerprint, plans.seqScan.fingerprint);
  });

  test('a new index on the lookup column reads as the Seq Scan it replaces, and as an index swap', () => {
    assert.equal(
      diffPlans(plans.seqScan, plans.otherIndex).headline,
      'Seq Scan on users -> Index Scan using users_email_name_idx on users',
    );
    assert.equal(
      diffPlans(plans.lookup42, plans.otherIndex).headline,
      'Index Scan using users_email_idx on users -> Index Scan using users_email_name_idx on users',
    );
  });

  test('ORDER BY ... DESC LIMIT reads the index backward', () => {
    assert.deepEqual(
      plans.latest.nodes.map(({ nodeType, scanDirection, description }) => ({ nodeType, scanDirection, description })),
      [
        { nodeType: 'Limit', scanDirection: undefined, description: 'Limit' },
        {
          nodeType: 'Index Scan',
          scanDirection: 'Backward',
          description: 'Index Scan Backward using orders_created_at_idx on orders',
        },
      ],
    );
  });

  test('a join lists both relations and the indexes it uses', () => {
    assert.deepEqual(plans.join.relations, ['users', 'orders']);
    assert.ok(plans.join.indexes.includes('users_email_idx'), plans.join.indexes.join(', '));
    assert.ok(plans.join.indexes.includes('orders_customer_id_idx'), plans.join.indexes.join(', '));
    assert.equal(plans.join.nodes[0].nodeType, 'Nested Loop');
    assert.match(
      describePlan(plans.join),
      /^Index Scan using users_email_idx on users; .*orders_customer_id_idx.* on orders/,
    );
  });

  // Plans of many node kinds; each description must be how text EXPLAIN starts that node's line.
  const KINDS: [string, string[]][] = [
    ['initplan and backward index-only scan', ['select * from users where id = (select max(customer_id) from orders)']],
    [
      'correlated subplan',
      ['select (select count(*) from orders o where o.customer_id = u.id) from users u where u.id < 5'],
    ],
    [
      'hash anti join',
      [
        'set local enable_nestloop = off',
        'select * from users u where not exists (select 1 from orders o where o.customer_id = u.id)',
      ],
    ],
    [
      'merge left join',
      [
        'set local enable_hashjoin = off',
        'set local enable_nestloop = off',
        'select * from users u left join orders o on o.customer_id = u.id',
      ],
    ],
    ['nested loop left join', ['select * from users u left join orders o on o.customer_id = u.id where u.id = 3']],
    ['hash setop', ['select email from users intersect select email from users where id < 10']],
    [
      'group and hash aggregates',
      ['set local enable_hashagg = off', 'select name, count(*) from users group by name order by 2 desc'],
    ],
    [
      'partial aggregates under gather',
      [
        'set local max_parallel_workers_per_gather = 2',
        'set local parallel_setup_cost = 0',
        'set local parallel_tuple_cost = 0',
        'set local min_parallel_table_scan_size = 0',
        'select name, count(*) from orders join users on users.id = orders.customer_id group by name',
      ],
    ],
    ['bitmap or', ["select * from users where email in ('a', 'b') or id = 3"]],
    [
      'function, values and cte scans',
      [
        'with recent as materialized (select * from orders where id < 5) select * from generate_series(1, 3) g, (values (1), (2)) v(x), recent r',
      ],
    ],
    [
      'subquery scan and window',
      [
        'select * from (select id, row_number() over (order by id) from users where id < 10 offset 0) s where s.row_number > 1',
      ],
    ],
    [
      'insert, update and delete',
      [
        "insert into users (email, name) values ('z', 'z')",
        'update users set name = $$y$$ where id = 1',
        'delete from orders where customer_id = 3',
      ],
    ],
    [
      'lock rows and unique',
      ['select * from users where id < 100 for update', 'select distinct name from users where id < 100'],
    ],
    ['merge', ['merge into users u using (select 1 as id) s on u.id = s.id when matched then update set name = $$m$$']],
  ];

  for (const [kind, statements] of KINDS) {
    test(`descriptions match text EXPLAIN: ${kind}`, async () => {
      await client.query('begin');
      try {
        for (const sql of statements) {
          if (sql.startsWith('set ')) {
            await client.query(sql);
            continue;
          }
          const json = await client.query<{ 'QUERY PLAN': unknown }>(`explain (format json, costs off) ${sql}`);
          const text = await client.query<{ 'QUERY PLAN': string }>(`explain (costs off) ${sql}`);
          const lines = text.rows.map((row) => row['QUERY PLAN']);
          // The node lines: the first, and those that start with "->" (the rest are details and headings).
          const nodeLines = [lines[0], ...lines.slice(1).filter((line) => line.trimStart().startsWith('->'))].map(
            (line) => line.replace(/^\s*(->\s+)?/, ''),
          );
          const descriptions = summarizePlan(json.rows[0]['QUERY PLAN']).nodes.map((node) => node.description);
          assert.equal(descriptions.length, nodeLines.length, `${sql}\n${lines.join('\n')}`);
          descriptions.forEach((description, i) => {
            const line = nodeLines[i];
            assert.ok(
              line === description || line.startsWith(`${description} `),
              `${sql}\n  text: ${line}\n  ours: ${description}`,
            );
          });
        }
      } finally {
        await client.query('rollback');
      }
    });
  }
});
