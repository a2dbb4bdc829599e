// Which code planning a client's statement could run, and whether the monitor may
// plan it. Planning is not inert: the planner folds IMMUTABLE functions with
// constant arguments (and STABLE ones while estimating selectivity), in the
// statement itself and in what it pulls in (views, column defaults, row security
// policies, index and partition expressions, check constraints, domain defaults).
// A function a client can create would otherwise run with the monitoring role's
// privileges.
//
// EXPLAIN runs as the session's role (SET LOCAL ROLE, see explain.ts) where the
// monitor may become it. Even then, code the client controls could `RESET ROLE`
// (set_config('role', 'none', true)) and continue as the monitor, so the rule is
// the same in spirit either way: every function planning can reach must be one we
// trust. Trusted means:
// - as the session's role: in pg_catalog, or owned by a superuser and written in C
//   (extensions): a superuser's SQL or PL function resolves the names it calls
//   through the session's search_path, which the client chooses;
// - without it (the monitor is not a member of that role): in pg_catalog only;
// and never one of the pg_catalog functions that run SQL or read whole tables
// (table_to_xml and friends). The check is conservative: names are matched across
// every schema (a function named like one the statement calls anywhere counts),
// and every user-defined cast function counts for every statement.

import { parseSync } from 'libpg-query';
import type pg from 'pg';
import { loadParser } from '../shapes/fingerprint.ts';

/** Names a statement uses that planning resolves to code. */
export interface PlanTimeReferences {
  readonly functions: readonly string[];
  readonly operators: readonly string[];
  readonly relations: readonly string[];
}

/** Why a statement is not planned on the monitor; its message starts "not sampled: ". */
export class NotSampled extends Error {
  constructor(reason: string) {
    super(`not sampled: ${reason}`);
    this.name = 'NotSampled';
  }
}

/** Operators used without being spelled: CASE, IN, DISTINCT, GROUP BY, ORDER BY, joins. */
const IMPLICIT_OPERATORS = ['=', '<>', '<', '>', '<=', '>='];
/** Languages whose functions do not look up other functions by name at run time. */
const COMPILED = new Set(['c', 'internal']);
/** pg_catalog functions that run SQL text or read a whole table/schema/database. */
const UNSAFE_CATALOG_FUNCTION = /_to_xml(schema)?$|_to_xml_and_xmlschema$|^query_to_|^cursor_to_/;

/** Parses `text` (one statement) and collects what it names; NotSampled if it does not parse. */
export async function planTimeReferences(text: string): Promise<PlanTimeReferences> {
  await loadParser();
  let tree: unknown;
  try {
    tree = parseSync(text);
  } catch {
    throw new NotSampled('the statement does not parse, so what planning it would run cannot be checked');
  }
  const functions = new Set<string>();
  const operators = new Set<string>(IMPLICIT_OPERATORS);
  const relations = new Set<string>();
  const lastName = (list: unknown): string | null => {
    if (!Array.isArray(list) || list.length === 0) return null;
    const last = list[list.length - 1] as { String?: { sval?: string } };
    return last.String?.sval ?? null;
  };
  const walk = (node: unknown): void => {
    if (Array.isArray(node)) {
      for (const item of node) walk(item);
      return;
    }
    if (node === null || typeof node !== 'object') return;
    // A RangeVar appears bare where the field's type is fixed (INSERT, UPDATE,
    // DELETE and MERGE targets), wrapped as { RangeVar: ... } elsewhere.
    const relname = (node as { relname?: unknown }).relname;
    if (typeof relname === 'string') relations.add(relname);
    for (const [key, value] of Object.entries(node as Record<string, unknown>)) {
      const v = value as Record<string, unknown>;
      if (key === 'FuncCall') {
        const name = lastName(v.funcname);
        if (name) functions.add(name);
      } else if (key === 'A_Expr') {
        const name = lastName(v.name);
        if (name === null) {
          // no name: nothing to resolve
        } else if (/BETWEEN/i.test(name)) {
          operators.add('<=').add('>=');
        } else if (v.kind === 'AEXPR_SIMILAR') {
          operators.add(name);
          functions.add('similar_to_escape');
        } else {
          operators.add(name);
        }
      } else if (key === 'SortBy') {
        const name = lastName(v.useOp);
        if (name) operators.add(name);
      } else if (key === 'SubLink') {
        const name = lastName(v.operName); // x op ANY (SELECT ...)
        if (name) operators.add(name);
      }
      walk(value);
    }
  };
  walk(tree);
  return { functions: [...functions], operators: [...operators], relations: [...relations] };
}

/**
 * Every function planning could reach through `refs`, by name across all schemas:
 * functions of that name, operator implementations (and estimators), functions
 * that the named relations (their partitions and inheritance children, and the
 * relations their views read) depend on through defaults, policies, rules,
 * indexes, constraints and statistics, and every cast function. Triggers are left
 * out: they never fire during planning.
 */
const REACHABLE_SQL = `
with recursive rels(oid) as (
    select c.oid from pg_class c where c.relname = any($3::text[])
  union
    select x.child from rels r cross join lateral (
      select i.inhrelid from pg_inherits i where i.inhparent = r.oid
      union all
      select d.refobjid from pg_rewrite rw
        join pg_depend d on d.classid = 'pg_rewrite'::regclass and d.objid = rw.oid and d.refclassid = 'pg_class'::regclass
      where rw.ev_class = r.oid
    ) x(child)
),
objs(classid, objid) as (
    select 'pg_class'::regclass::oid, oid from rels
  union
    select d.classid, d.objid from pg_depend d join rels r on d.refclassid = 'pg_class'::regclass and d.refobjid = r.oid
    where d.classid <> 'pg_trigger'::regclass
  union
    -- Column types: a domain's DEFAULT fills an INSERT like a column default.
    select 'pg_type'::regclass::oid, t.oid from rels r
      cross join lateral (select a.atttypid from pg_attribute a where a.attrelid = r.oid and a.attnum > 0) a
      join pg_type t on t.oid in (a.atttypid, (select typbasetype from pg_type where oid = a.atttypid))
    where t.typtype = 'd'
),
-- The only functions that matter: few in most databases, so everything joins to them.
suspect as materialized (
    select p.oid, p.proname, p.pronamespace, p.proowner, p.prolang from pg_proc p
    where p.pronamespace <> 'pg_catalog'::regnamespace or p.proname ~ $4
),
operators as (
    select o.oprname, o.oprcode::oid as fn from pg_operator o where o.oprname = any($2::text[])
  union all
    select o.oprname, o.oprrest::oid from pg_operator o where o.oprname = any($2::text[]) and o.oprrest <> 0
  union all
    select o.oprname, o.oprjoin::oid from pg_operator o where o.oprname = any($2::text[]) and o.oprjoin <> 0
),
reached(fn, via) as (
    select s.oid, 'function ' || s.proname from suspect s where s.proname = any($1::text[])
  union all
    select s.oid, 'operator ' || o.oprname from operators o join suspect s on s.oid = o.fn
  union all
    select s.oid, 'a relation it reads' from objs o
      join pg_depend d on d.classid = o.classid and d.objid = o.objid and d.refclassid = 'pg_proc'::regclass
      join suspect s on s.oid = d.refobjid
  union all
    select s.oid, 'a relation it reads (operator ' || op.oprname || ')' from objs o
      join pg_depend d on d.classid = o.classid and d.objid = o.objid and d.refclassid = 'pg_operator'::regclass
      join pg_operator op on op.oid = d.refobjid
      join suspect s on s.oid = op.oprcode
  union all
    select s.oid, 'a cast to ' || format_type(c.casttarget, null) from pg_cast c join suspect s on s.oid = c.castfunc
)
select r.via, n.nspname as schema, s.proname as name, a.rolname as owner, a.rolsuper as superuser, l.lanname as language
from reached r
  join suspect s on s.oid = r.fn
  join pg_namespace n on n.oid = s.pronamespace
  join pg_roles a on a.oid = s.proowner
  join pg_language l on l.oid = s.prolang
`;

interface ReachedRow {
  via: string;
  schema: string;
  name: string;
  owner: string;
  superuser: boolean;
  language: string;
}

/**
 * Throws NotSampled when planning `refs` could run code the monitor must not run:
 * with `asSessionRole`, functions outside pg_catalog not owned by a superuser;
 * without, anything outside pg_catalog; in both, pg_catalog's SQL-running ones.
 */
export async function assertPlanTimeCodeTrusted(
  client: pg.ClientBase,
  refs: PlanTimeReferences,
  asSessionRole: boolean,
): Promise<void> {
  // Named: prepared once per monitoring connection (its planning is a third of its cost).
  const { rows } = await client.query<ReachedRow>({
    name: 'pgwarden_plan_time_code',
    text: REACHABLE_SQL,
    values: [refs.functions, refs.operators, refs.relations, UNSAFE_CATALOG_FUNCTION.source],
  });
  for (const row of rows) {
    const name = `${row.schema}.${row.name}()`;
    if (row.schema === 'pg_catalog')
      throw new NotSampled(`${row.via} can run ${name}, which runs SQL or reads whole tables`);
    if (!asSessionRole) {
      throw new NotSampled(
        `${row.via} can run ${name}, outside pg_catalog, and the monitoring role cannot SET ROLE to the session's role (grant it membership)`,
      );
    }
    if (!row.superuser)
      throw new NotSampled(`${row.via} can run ${name}, owned by ${row.owner}, which is not a superuser`);
    if (!COMPILED.has(row.language)) {
      // SQL or PL code looks names up at run time through the session's
      // search_path, which the client chooses: its calls could land on the client's code.
      throw new NotSampled(
        `${row.via} can run ${name}, written in ${row.language}, whose calls follow the session's search_path`,
      );
    }
  }
}
