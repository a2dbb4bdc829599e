// What check-migration reads from a shape's text and from a migration's locks,
// without a database: typed literals become casts, parameters find the column
// they are compared with, relations their locks; what a rewritten query tree
// refers to; which lock patterns are flagged.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { parseWorkload } from '../../src/workload/format.ts';
import { conflicts, lockImpact, lockName, type ShapeTouch, type StatementLocks } from '../../src/workload/locks.ts';
import { parseMigration } from '../../src/workload/migration.ts';
import { treeReferences } from '../../src/workload/privileges.ts';
import { neutralValue } from '../../src/workload/representative.ts';
import { analyzeStatement, rewriteTypedLiterals } from '../../src/workload/statement.ts';

describe('a shape as check-migration reads it', () => {
  before(() => loadParser());

  test('typed literals normalized to `type $n` become casts; the rest of the text is left as it was', () => {
    assert.deepEqual(
      rewriteTypedLiterals('select * from invoices where account_id = $1 and due > date $2 order by due limit $3'),
      {
        text: 'select * from invoices where account_id = $1 and due > CAST($2 AS date) order by due limit $3',
        count: 1,
      },
    );
    const { text, count } = rewriteTypedLiterals(
      'select now() - interval $1, interval $2 day to second, timestamp with time zone $3, timestamptz $4, numeric(10,2) $5, timestamp(3) $6, public.mytype $7, $8::date, cast($9 as date)',
    );
    assert.equal(
      text,
      'select now() - CAST($1 AS interval), CAST($2 AS interval day to second), CAST($3 AS timestamp with time zone), CAST($4 AS timestamptz), CAST($5 AS numeric(10,2)), CAST($6 AS timestamp(3)), CAST($7 AS public.mytype), $8::date, cast($9 as date)',
    );
    assert.equal(count, 7);
    assert.deepEqual(rewriteTypedLiterals('select $1 from t'), { text: 'select $1 from t', count: 0 });
  });

  test('each parameter knows the column it is compared with, through aliases and casts; LIMIT and OFFSET are told apart', () => {
    const a = analyzeStatement(
      'select * from invoices i where i.account_id = $1 and $2 < due and b in ($3, $4) and c + $5 > 0 limit $6 offset $7',
    );
    assert.deepEqual(
      a.params.map((p) => [p.number, p.context, p.column?.relation?.name ?? null, p.column?.name ?? null]),
      [
        [1, 'compare', 'invoices', 'account_id'],
        [2, 'compare', null, 'due'],
        [3, 'compare', null, 'b'],
        [4, 'compare', null, 'b'],
        [5, 'other', null, null],
        [6, 'limit', null, null],
        [7, 'offset', null, null],
      ],
    );
    assert.equal(a.paramCount, 7);
  });

  test('relations carry the lock the statement takes on them; CTE names are not relations', () => {
    const lockOf = (q: string) => analyzeStatement(q).relations.map((r) => [r.schema, r.name, r.lock]);
    assert.deepEqual(lockOf('update accounts set bid = $1 where aid in (select aid from history)'), [
      [null, 'accounts', 'RowExclusiveLock'],
      [null, 'history', 'AccessShareLock'],
    ]);
    assert.deepEqual(lockOf('with x as (select 1) select * from x join public.y on true for update'), [
      ['public', 'y', 'RowShareLock'],
    ]);
  });

  test('a value of the parameter type for parameters with no statistics', () => {
    assert.equal(neutralValue({ number: 2, context: 'limit', column: null }, 'bigint'), '10');
    assert.equal(neutralValue(undefined, 'timestamp with time zone'), '2000-01-01');
    assert.equal(neutralValue(undefined, 'integer[]'), '{}');
    assert.equal(neutralValue(undefined, 'some_enum'), null);
  });
});

describe('what a rewritten query tree refers to', () => {
  test('function, operator and relation OIDs, across wrapped lines and lists', () => {
    const tree =
      '({QUERY :commandType 1 :rtable ({RANGETBLENTRY :rtekind 0 :relid\n 16384} ) :quals {OPEXPR :opno 96 :opfuncid 65} {FUNCEXPR :funcid\n 16390 :funcresulttype 23} {ROWCOMPAREEXPR :opnos (o 97 521)} {AGGREF :aggfnoid 2147} :sortop 0})';
    assert.deepEqual(treeReferences([tree]), {
      functions: ['65', '16390', '2147'],
      operators: ['96', '97', '521'],
      relations: ['16384'],
    });
  });
});

describe('lock impact', () => {
  before(() => loadParser());

  const hot: ShapeTouch[] = [
    {
      fingerprint: 'r',
      query: 'select',
      callsPerS: 1000,
      calls: 10,
      relations: new Map([['orders', 'AccessShareLock']]),
    },
    {
      fingerprint: 'w',
      query: 'update',
      callsPerS: 200,
      calls: 10,
      relations: new Map([['orders', 'RowExclusiveLock']]),
    },
  ];
  const observed = (
    sql: string,
    mode: StatementLocks['locks'][number]['mode'],
    durationMs: number,
    rewrote: string[] = [],
  ): StatementLocks[] =>
    parseMigration(sql).map((statement, i, all) =>
      i === all.length - 1
        ? {
            statement,
            durationMs,
            source: 'observed',
            locks: [{ relation: 'orders', name: 'orders', kind: 'table', mode }],
            rewrote,
          }
        : { statement, durationMs: 0.1, source: 'observed', locks: [], rewrote: [] },
    );

  test("the conflict matrix is PostgreSQL's", () => {
    assert.equal(conflicts('ShareLock', 'RowExclusiveLock'), true);
    assert.equal(conflicts('ShareLock', 'AccessShareLock'), false);
    assert.equal(conflicts('ShareUpdateExclusiveLock', 'RowExclusiveLock'), false);
    assert.equal(conflicts('AccessExclusiveLock', 'AccessShareLock'), true);
    assert.equal(lockName('ShareUpdateExclusiveLock'), 'SHARE UPDATE EXCLUSIVE');
  });

  test('a rewrite under ACCESS EXCLUSIVE queues every shape of the table, and no lock_timeout is flagged', () => {
    const impact = lockImpact(
      observed('alter table orders add column x float default random()', 'AccessExclusiveLock', 4200, ['orders']),
      hot,
      1000,
    );
    assert.deepEqual(
      impact.statements[0].blocked[0].shapes.map((s) => s.fingerprint),
      ['r', 'w'],
    );
    assert.equal(impact.statements[0].blocked[0].callsPerS, 1200);
    assert.deepEqual(
      impact.findings.map((f) => f.pattern),
      ['table_rewrite', 'missing_lock_timeout'],
    );
    assert.match(
      impact.findings[0].message,
      /rewrites orders under ACCESS EXCLUSIVE for 4\.2 s on staging .*2 shapes at 1,200 calls\/s in production would queue behind it/,
    );
  });

  test('CREATE INDEX queues only the writers; with lock_timeout set first only the CONCURRENTLY advice remains', () => {
    const impact = lockImpact(
      observed("set lock_timeout = '2s'; create index on orders (x)", 'ShareLock', 50),
      hot,
      1000,
    );
    assert.deepEqual(
      impact.statements[1].blocked[0].shapes.map((s) => s.fingerprint),
      ['w'],
    );
    assert.deepEqual(
      impact.findings.map((f) => f.pattern),
      ['create_index_without_concurrently'],
    );
  });

  test('a short ACCESS EXCLUSIVE after SET lock_timeout, and any lock on a table no shape touches, are not flagged', () => {
    assert.deepEqual(
      lockImpact(
        observed("set lock_timeout = '2s'; alter table orders add column y int", 'AccessExclusiveLock', 3),
        hot,
        1000,
      ).findings,
      [],
    );
    assert.deepEqual(
      lockImpact(
        observed('alter table orders add column x float default random()', 'AccessExclusiveLock', 4200, ['orders']),
        [],
        1000,
      ).findings,
      [],
    );
  });
});

describe('the workload file', () => {
  test('a file from an older pgwarden, without the newer fields, still reads', () => {
    const old = {
      format: 'pgwarden-workload/1',
      generated_at: '2025-01-01T00:00:00Z',
      shapes: [{ fingerprint: 'a1b2c3d4e5f60718', query: 'select 1', command: 'SELECT' }],
    };
    const shape = parseWorkload(old).shapes[0];
    assert.equal(shape.calls_per_s, null);
    assert.equal(shape.relations, null);
    assert.equal(shape.plan_cost, null);
    assert.equal(shape.first_seen, null);
  });
});
