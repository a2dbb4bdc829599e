// Captured SQL is never planned with more privileges than it needs. Planning
// is not harmless: the planner folds IMMUTABLE (and, for estimates, STABLE)
// functions called with constant arguments, compares constants with the
// column's most common values through the operator's own function, and
// evaluates partial-index predicates and index expressions. A captured text
// calling a function whoever can create functions wrote would run that
// function as the check's role (typically one that can run migrations).
//
// Unless the check runs its EXPLAINs as a role of its own (--explain-role) or
// the operator allows it (--allow-user-functions), a shape is planned only if
// everything it resolves to lives in pg_catalog. What it resolves to comes
// from the server itself without planning: PREPARE only parses, analyzes and
// rewrites (views expanded, column defaults and row-level security policies
// added), and with debug_print_rewritten that rewritten tree comes back as a
// LOG message carrying the OIDs of every function and operator. Functions
// referenced by the relations it touches (index expressions and predicates,
// constraints, defaults, extended statistics) are looked up in pg_depend.
// PostgreSQL before 15 does not print that tree for PREPARE: shapes are then
// not planned at all without --explain-role or --allow-user-functions.

import type pg from 'pg';

export interface Vetting {
  /** Functions and operators implemented outside pg_catalog, as regprocedure/regoperator print them. */
  readonly outside: readonly string[];
  /** False when the server did not show the rewritten tree (PostgreSQL < 15). */
  readonly verified: boolean;
}

const FUNCTION_FIELDS = /:(?:funcid|opfuncid|aggfnoid|winfnoid|hashfuncid|negfuncid|tsmhandler)\s+(\d+)/g;
const OPERATOR_FIELDS = /:(?:opno|eqop|sortop)\s+(\d+)/g;
const OPERATOR_LISTS = /:opnos\s+\(o((?:\s+\d+)*)\)/g;
const RELATIONS = /:relid\s+(\d+)/g;

/** The OIDs a rewritten query tree (nodeToString's text) refers to. */
export function treeReferences(trees: readonly string[]): {
  functions: string[];
  operators: string[];
  relations: string[];
} {
  const functions = new Set<string>();
  const operators = new Set<string>();
  const relations = new Set<string>();
  for (const tree of trees) {
    for (const m of tree.matchAll(FUNCTION_FIELDS)) if (m[1] !== '0') functions.add(m[1]);
    for (const m of tree.matchAll(OPERATOR_FIELDS)) if (m[1] !== '0') operators.add(m[1]);
    for (const m of tree.matchAll(OPERATOR_LISTS))
      for (const oid of m[1].trim().split(/\s+/)) if (oid !== '' && oid !== '0') operators.add(oid);
    for (const m of tree.matchAll(RELATIONS)) if (m[1] !== '0') relations.add(m[1]);
  }
  return { functions: [...functions], operators: [...operators], relations: [...relations] };
}

/**
 * Which functions and operators outside pg_catalog the trees (and the
 * relations they read) involve. `trees`: the "rewritten parse tree" LOG
 * messages the PREPARE produced.
 */
export async function vet(client: pg.ClientBase, trees: readonly string[]): Promise<Vetting> {
  const queries = trees.filter((t) => /:commandType\s+[1-5]\b/.test(t));
  if (queries.length === 0) return { outside: [], verified: false };
  const refs = treeReferences(queries);
  const { rows } = await client.query<{ name: string }>(
    `with rel as (select unnest($3::oid[]) as oid),
          objs as (
            select d.refclassid, d.refobjid from pg_depend d
             where (d.classid = 'pg_class'::regclass and d.objid in (select indexrelid from pg_index where indrelid in (select oid from rel)))
                or (d.classid = 'pg_constraint'::regclass and d.objid in (select oid from pg_constraint where conrelid in (select oid from rel)))
                or (d.classid = 'pg_attrdef'::regclass and d.objid in (select oid from pg_attrdef where adrelid in (select oid from rel)))
                or (d.classid = 'pg_statistic_ext'::regclass and d.objid in (select oid from pg_statistic_ext where stxrelid in (select oid from rel)))
                or (d.classid = 'pg_policy'::regclass and d.objid in (select oid from pg_policy where polrelid in (select oid from rel)))),
          funcs as (select unnest($1::oid[]) as oid union select refobjid from objs where refclassid = 'pg_proc'::regclass),
          ops as (select unnest($2::oid[]) as oid union select refobjid from objs where refclassid = 'pg_operator'::regclass)
     select 'function ' || p.oid::regprocedure::text as name from pg_proc p
      where p.oid in (select oid from funcs) and p.pronamespace <> 'pg_catalog'::regnamespace
     union
     select 'operator ' || o.oid::regoperator::text from pg_operator o join pg_proc p on p.oid = o.oprcode
      where o.oid in (select oid from ops) and (o.oprnamespace <> 'pg_catalog'::regnamespace or p.pronamespace <> 'pg_catalog'::regnamespace)
     order by 1`,
    [refs.functions, refs.operators, refs.relations],
  );
  return { outside: rows.map((r) => r.name), verified: true };
}
