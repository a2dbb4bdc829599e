// Plan fingerprints and readable plan diffs, from what `EXPLAIN (FORMAT JSON)`
// returns. A shape's plan is worth an event only when its structure changes (an
// index swapped, a join strategy flipped), never when costs or constants move, so
// the fingerprint hashes the tree's shape and nothing the planner recomputes per
// execution. Descriptions follow text EXPLAIN's wording ("Index Scan Backward
// using x on t", "Hash Left Join", "HashAggregate") because that is what every
// PostgreSQL user already reads fluently.
//
// Plans are taken with VERBOSE, which names each relation's schema: the same
// query run by tenants whose search_path points at different schemas reads
// different tables, and a plan must say which. Relations and indexes are listed
// schema-qualified ("tenant_b.users"); descriptions qualify a relation outside
// `public` only ("Seq Scan on tenant_b.users", "Seq Scan on users"), so the common
// case reads as it always has. Temporary schemas (pg_temp_3) all read "pg_temp".

import { createHash } from 'node:crypto';

export interface PlanNode {
  /** "Node Type" as EXPLAIN's JSON spells it ("Aggregate", "ModifyTable", "Hash Join"). */
  nodeType: string;
  relation?: string;
  /** The relation's schema (EXPLAIN VERBOSE), pg_temp_N as "pg_temp"; absent without VERBOSE. */
  schema?: string;
  index?: string;
  /** "Forward" / "Backward" / "NoMovement", index scans only. */
  scanDirection?: string;
  /** "Inner", "Left", "Semi", "Right Anti"..., joins only. */
  joinType?: string;
  /** One line in text EXPLAIN's style, e.g. "Index Scan using users_email_idx on users". */
  description: string;
  /** 0 for the root; with the pre-order this is enough to rebuild the tree. */
  depth: number;
  /** The planner's row estimate ("Plan Rows"); not part of the fingerprint. */
  planRows?: number;
}

export interface PlanSummary {
  /** 16 hex digits: sha256 of the tree's structure. */
  fingerprint: string;
  /** Depth-first pre-order, InitPlans and SubPlans included where EXPLAIN puts them. */
  nodes: PlanNode[];
  /** Relations read or written, in order of first appearance; "schema.name" when the plan names the schema. */
  relations: string[];
  /** Indexes used, in order of first appearance; qualified by their table's schema when known. */
  indexes: string[];
  /** The schemas of the relations, sorted: which tenant's tables a plan reads. */
  schemas: string[];
  /** The root's estimates; 0 when the plan was taken with COSTS OFF. */
  totalCost: number;
  planRows: number;
}

export interface PlanDiff {
  /** The most telling change in one line; "" when the plans are identical. */
  headline: string;
  /** Node descriptions that disappeared (multiset difference, order of appearance). */
  removed: string[];
  /** Node descriptions that appeared. */
  added: string[];
}

type JsonNode = Record<string, unknown>;

/** Summarizes a plan: EXPLAIN's row array, its single element, or either as a JSON string. */
export function summarizePlan(explainJson: unknown): PlanSummary {
  const root = rootPlan(explainJson);
  const nodes: PlanNode[] = [];
  const hash = createHash('sha256');
  hash.update(JSON.stringify(walk(root, 0, '$.Plan', nodes)));
  const relations: string[] = [];
  const indexes: string[] = [];
  const schemas = new Set<string>();
  for (const node of nodes) {
    const qualify = (name: string) => (node.schema === undefined ? name : `${node.schema}.${name}`);
    if (node.schema !== undefined) schemas.add(node.schema);
    if (node.relation !== undefined && !relations.includes(qualify(node.relation)))
      relations.push(qualify(node.relation));
    if (node.index !== undefined && !indexes.includes(qualify(node.index))) indexes.push(qualify(node.index));
  }
  return {
    fingerprint: hash.digest('hex').slice(0, 16),
    nodes,
    relations,
    indexes,
    schemas: [...schemas].sort(),
    totalCost: optionalNumber(root, 'Total Cost', '$.Plan') ?? 0,
    planRows: optionalNumber(root, 'Plan Rows', '$.Plan') ?? 0,
  };
}

/** What disappeared and appeared between two plans of one shape, with a one-line headline. */
export function diffPlans(before: PlanSummary, after: PlanSummary): PlanDiff {
  if (before.fingerprint === after.fingerprint) return { headline: '', removed: [], added: [] };
  const removed = multisetMinus(
    before.nodes.map((n) => n.description),
    after.nodes.map((n) => n.description),
  );
  const added = multisetMinus(
    after.nodes.map((n) => n.description),
    before.nodes.map((n) => n.description),
  );
  return { headline: headline(before, after, removed, added), removed, added };
}

/**
 * The plan's scans with the planner's row estimates, for explaining a plan that
 * flipped on new statistics: "Index Scan using t_kind_idx on t (est. 1 rows)".
 */
export function describeEstimates(summary: PlanSummary): string {
  const out: string[] = [];
  for (const node of summary.nodes) {
    if (!node.nodeType.endsWith(' Scan')) continue;
    out.push(
      node.planRows === undefined ? node.description : `${node.description} (est. ${Math.round(node.planRows)} rows)`,
    );
  }
  return out.join('; ');
}

/** The plan's scans on one line, for lists: "Seq Scan on users; Index Scan using orders_pkey on orders". */
export function describePlan(summary: PlanSummary): string {
  const scans = accessPaths(summary.nodes).map((p) => p.text);
  if (scans.length > 0) return scans.join('; ');
  return summary.nodes[0]?.description ?? '';
}

// ---------------------------------------------------------------------------

function rootPlan(input: unknown): JsonNode {
  let value = input;
  if (typeof value === 'string') {
    try {
      value = JSON.parse(value);
    } catch (error) {
      throw new Error(`summarizePlan: not JSON: ${(error as Error).message}`, { cause: error });
    }
  }
  // A whole result row ({"QUERY PLAN": [...]}) is accepted too: it is what a
  // caller holding `rows[0]` naturally passes.
  if (isObject(value) && !('Plan' in value) && 'QUERY PLAN' in value) return rootPlan(value['QUERY PLAN']);
  if (Array.isArray(value)) {
    if (value.length !== 1) {
      throw new Error(
        `summarizePlan: expected EXPLAIN (FORMAT JSON) output, an array of one plan, got ${value.length} elements`,
      );
    }
    value = value[0];
  }
  if (!isObject(value) || !isObject(value.Plan)) {
    throw new Error(`summarizePlan: expected EXPLAIN (FORMAT JSON) output with a "Plan" object, got ${preview(value)}`);
  }
  return value.Plan;
}

/**
 * Appends node (and its subtree) to `out` in pre-order and returns the node's
 * structural key: everything that makes two plans "the same plan" and nothing
 * that varies with constants or statistics (costs, rows, widths, conditions,
 * filters, worker counts, aliases of real relations).
 */
function walk(node: JsonNode, depth: number, where: string, out: PlanNode[]): unknown[] {
  const nodeType = requiredString(node, 'Node Type', where);
  const relation = optionalString(node, 'Relation Name', where);
  // VERBOSE gives function scans a "Schema" too: only a relation's counts here.
  const schema = relation === undefined ? undefined : schemaOf(optionalString(node, 'Schema', where));
  const index = optionalString(node, 'Index Name', where);
  const scanDirection = optionalString(node, 'Scan Direction', where);
  const joinType = optionalString(node, 'Join Type', where);
  const target = scanTarget(node, where);
  const description = describeNode(
    node,
    nodeType,
    target !== undefined && target === relation && schema !== undefined && schema !== 'public'
      ? `${quoteIdentifier(schema)}.${quoteIdentifier(target)}`
      : target === undefined
        ? undefined
        : quoteIdentifier(target),
    where,
  );
  const planNode: PlanNode = { nodeType, description, depth };
  const planRows = optionalNumber(node, 'Plan Rows', where);
  if (planRows !== undefined) planNode.planRows = planRows;
  if (relation !== undefined) planNode.relation = relation;
  if (schema !== undefined) planNode.schema = schema;
  if (index !== undefined) planNode.index = index;
  if (scanDirection !== undefined) planNode.scanDirection = scanDirection;
  if (joinType !== undefined) planNode.joinType = joinType;
  out.push(planNode);

  const children = node.Plans;
  if (children !== undefined && !Array.isArray(children))
    throw new Error(`summarizePlan: ${where}.Plans is not an array`);
  const childKeys = (children ?? []).map((child, i) => {
    const childWhere = `${where}.Plans[${i}]`;
    if (!isObject(child)) throw new Error(`summarizePlan: ${childWhere} is not a plan node, got ${preview(child)}`);
    return walk(child, depth + 1, childWhere, out);
  });
  return [
    nodeType,
    optionalString(node, 'Strategy', where) ?? null,
    optionalString(node, 'Partial Mode', where) ?? null,
    optionalString(node, 'Operation', where) ?? null,
    optionalString(node, 'Command', where) ?? null,
    optionalString(node, 'Custom Plan Provider', where) ?? null,
    node['Parallel Aware'] === true,
    node['Async Capable'] === true,
    // Another schema's table is another plan. `public` hashes as the bare name, as
    // plans without VERBOSE (check-migration's, workload files exported before
    // schemas were read) have it, so their fingerprints still compare.
    (schema === undefined || schema === 'public' ? relation : `${schema}.${relation}`) ?? null,
    target ?? null,
    index ?? null,
    scanDirection ?? null,
    joinType ?? null,
    // "InitPlan" / "SubPlan" / "Outer" / "Inner" / "Member": which side a child
    // hangs on is structure (a join whose inputs swap is a different plan).
    optionalString(node, 'Parent Relationship', where) ?? null,
    childKeys,
  ];
}

/** A relation's schema as plans are compared: every session's temporary schema is one. */
function schemaOf(schema: string | undefined): string | undefined {
  if (schema === undefined) return undefined;
  return /^pg_temp_\d+$/.test(schema) ? 'pg_temp' : schema;
}

/** What text EXPLAIN prints after " on": the relation, function, CTE... or, lacking a name, the alias. */
function scanTarget(node: JsonNode, where: string): string | undefined {
  return (
    optionalString(node, 'Relation Name', where) ??
    optionalString(node, 'Function Name', where) ??
    optionalString(node, 'CTE Name', where) ??
    optionalString(node, 'Tuplestore Name', where) ??
    optionalString(node, 'Table Function Name', where) ??
    // Subquery and Values scans (and multi-function scans) have only an alias,
    // and text EXPLAIN prints it as their target.
    optionalString(node, 'Alias', where)
  );
}

const AGGREGATE_NAMES: Record<string, string> = {
  Plain: 'Aggregate',
  Sorted: 'GroupAggregate',
  Hashed: 'HashAggregate',
  Mixed: 'MixedAggregate',
};

// Mirrors ExplainNode() in PostgreSQL's explain.c: the JSON "Node Type" is its
// `sname`, the text line starts with its `pname`, which folds in the strategy,
// partial mode, operation or join type. `target` comes quoted (and qualified) already.
function describeNode(node: JsonNode, nodeType: string, target: string | undefined, where: string): string {
  let name = nodeType;
  const strategy = optionalString(node, 'Strategy', where);
  const joinType = optionalString(node, 'Join Type', where);
  const operation = optionalString(node, 'Operation', where);
  switch (nodeType) {
    case 'Aggregate':
      name = AGGREGATE_NAMES[strategy ?? 'Plain'] ?? 'Aggregate';
      break;
    case 'SetOp': {
      name = strategy === 'Hashed' ? 'HashSetOp' : 'SetOp';
      const command = optionalString(node, 'Command', where);
      if (command !== undefined) name += ` ${command}`;
      break;
    }
    case 'ModifyTable':
      name = operation ?? 'ModifyTable';
      break;
    case 'Foreign Scan':
      if (operation !== undefined && operation !== 'Select') name = `Foreign ${operation}`;
      break;
    case 'Custom Scan': {
      const provider = optionalString(node, 'Custom Plan Provider', where);
      if (provider !== undefined) name = `Custom Scan (${provider})`;
      break;
    }
    case 'Nested Loop':
    case 'Hash Join':
    case 'Merge Join':
      if (joinType !== undefined && joinType !== 'Inner') {
        name = `${nodeType === 'Nested Loop' ? 'Nested Loop' : nodeType.slice(0, -' Join'.length)} ${joinType} Join`;
      }
      break;
  }
  const partialMode = optionalString(node, 'Partial Mode', where);
  if (partialMode !== undefined && partialMode !== 'Simple') name = `${partialMode} ${name}`;
  if (node['Async Capable'] === true) name = `Async ${name}`;
  if (node['Parallel Aware'] === true) name = `Parallel ${name}`;

  const index = optionalString(node, 'Index Name', where);
  if (nodeType === 'Bitmap Index Scan') return index === undefined ? name : `${name} on ${quoteIdentifier(index)}`;
  if (index !== undefined) {
    if (optionalString(node, 'Scan Direction', where) === 'Backward') name += ' Backward';
    name += ` using ${quoteIdentifier(index)}`;
  }
  return target === undefined ? name : `${name} on ${target}`;
}

/** quote_identifier() without the keyword list: enough for names to read as EXPLAIN prints them. */
function quoteIdentifier(name: string): string {
  return /^[a-z_][a-z0-9_]*$/.test(name) ? name : `"${name.replaceAll('"', '""')}"`;
}

interface AccessPath {
  /** The relation (or other scan target) read; undefined for a scan of no relation. */
  relation: string | undefined;
  /** The scan's description; a bitmap heap scan carries its index scans in parentheses. */
  text: string;
}

/**
 * The plan's scans, one per read of a relation: a Bitmap Heap Scan and the
 * Bitmap Index Scans beneath it (through BitmapAnd/BitmapOr) form one access
 * path, since the index scans carry no relation name of their own.
 */
function accessPaths(nodes: readonly PlanNode[]): AccessPath[] {
  const paths: AccessPath[] = [];
  for (let i = 0; i < nodes.length; i++) {
    const node = nodes[i];
    if (!node.nodeType.endsWith(' Scan') || node.nodeType === 'Bitmap Index Scan') continue;
    let text = node.description;
    if (node.nodeType === 'Bitmap Heap Scan') {
      const inner: string[] = [];
      for (let j = i + 1; j < nodes.length && nodes[j].depth > node.depth; j++) {
        if (nodes[j].nodeType === 'Bitmap Index Scan') inner.push(nodes[j].description);
      }
      if (inner.length > 0) text += ` (${inner.join(', ')})`;
    }
    const relation =
      node.relation === undefined || node.schema === undefined ? node.relation : `${node.schema}.${node.relation}`;
    paths.push({ relation, text });
  }
  return paths;
}

function headline(before: PlanSummary, after: PlanSummary, removed: string[], added: string[]): string {
  const beforePaths = accessPaths(before.nodes);
  const afterPaths = accessPaths(after.nodes);
  const gone = minusBy(beforePaths, afterPaths);
  const came = minusBy(afterPaths, beforePaths);
  const scanned = [...gone, ...came].filter((p) => p.relation !== undefined);
  if (scanned.length > 0) {
    const relations = [...new Set(scanned.map((p) => p.relation))];
    return relations
      .map((relation) => {
        const from = gone.filter((p) => p.relation === relation).map((p) => p.text);
        const to = came.filter((p) => p.relation === relation).map((p) => p.text);
        if (from.length > 0 && to.length > 0) return `${from.join(', ')} -> ${to.join(', ')}`;
        return from.length > 0 ? `- ${from.join(', ')}` : `+ ${to.join(', ')}`;
      })
      .join('; ');
  }
  if (removed.length > 0 && added.length > 0) return `${removed[0]} -> ${added[0]}`;
  if (added.length > 0) return `+ ${added[0]}`;
  if (removed.length > 0) return `- ${removed[0]}`;
  // Same nodes, different nesting (join inputs swapped, a Sort moved): the scan
  // order usually shows it; if not, say so plainly rather than print nothing.
  const from = describePlan(before);
  const to = describePlan(after);
  return from === to ? 'same nodes, different nesting' : `${from} -> ${to}`;
}

function minusBy(a: readonly AccessPath[], b: readonly AccessPath[]): AccessPath[] {
  const texts = multisetMinus(
    a.map((p) => p.text),
    b.map((p) => p.text),
  );
  const out: AccessPath[] = [];
  for (const path of a) {
    const at = texts.indexOf(path.text);
    if (at !== -1) {
      texts.splice(at, 1);
      out.push(path);
    }
  }
  return out;
}

/** Elements of a not matched one-for-one in b, in a's order. */
function multisetMinus(a: readonly string[], b: readonly string[]): string[] {
  const remaining = new Map<string, number>();
  for (const item of b) remaining.set(item, (remaining.get(item) ?? 0) + 1);
  const out: string[] = [];
  for (const item of a) {
    const left = remaining.get(item) ?? 0;
    if (left > 0) remaining.set(item, left - 1);
    else out.push(item);
  }
  return out;
}

function isObject(value: unknown): value is JsonNode {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function requiredString(node: JsonNode, key: string, where: string): string {
  const value = node[key];
  if (typeof value !== 'string' || value === '') {
    throw new Error(`summarizePlan: ${where} has no "${key}" string, got ${preview(value)}`);
  }
  return value;
}

function optionalString(node: JsonNode, key: string, where: string): string | undefined {
  const value = node[key];
  if (value === undefined) return undefined;
  if (typeof value !== 'string')
    throw new Error(`summarizePlan: ${where}."${key}" is not a string, got ${preview(value)}`);
  return value;
}

function optionalNumber(node: JsonNode, key: string, where: string): number | undefined {
  const value = node[key];
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw new Error(`summarizePlan: ${where}."${key}" is not a number, got ${preview(value)}`);
  }
  return value;
}

function preview(value: unknown): string {
  if (value === undefined) return 'undefined';
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}
