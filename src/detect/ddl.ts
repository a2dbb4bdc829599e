// Schema changes named from the DDL text that passes through the proxy, so a
// regression can be pinned on "DROP INDEX users_email_idx" rather than on "some
// migration". Pure: callers run loadParser() (shapes/fingerprint.ts) once first.
//
// `objects` holds the names a plan can mention (tables, indexes, views...) as the
// parser reports them: unquoted names folded to lower case, quoted ones as written,
// which is also how the catalog and EXPLAIN spell them. Only statements that change
// a schema count: not COMMENT, GRANT, VACUUM/ANALYZE, CLUSTER or REFRESH, and not
// the creation of temporary objects, which no other session's plans can see.

import { normalizeSync, parseSync, scanSync } from 'libpg-query';
import type { Node, ObjectType, RangeVar, RawStmt } from 'libpg-query';

export interface DdlChange {
  /** Statement kind, upper-case: 'DROP INDEX', 'CREATE INDEX', 'ALTER TABLE', 'TRUNCATE'... */
  readonly command: string;
  /** Tables, indexes, views... the statement touches: unqualified, case as the server stores them. */
  readonly objects: string[];
  /** The statement's normalized text (libpg_query; it leaves most DDL constants in place). */
  readonly statement: string;
  /** What else the statement says: schema-qualified relations, index columns, subcommands... */
  readonly details: Record<string, unknown>;
}

/** Without one of these words a text cannot hold DDL, and skipping the parse is what keeps this cheap. */
const DDL_WORD = /\b(?:create|alter|drop|truncate|reindex)\b/i;
const SELECT_INTO = [/\bselect\b/i, /\binto\b/i];

/** The schema changes in a (possibly multi-statement) text; [] for text without any, or that does not parse. */
export function ddlChangesOf(text: string): DdlChange[] {
  if (!DDL_WORD.test(text) && !SELECT_INTO.every((word) => word.test(text))) return [];
  let stmts: RawStmt[];
  try {
    stmts = parseSync(text).stmts ?? [];
  } catch {
    return [];
  }
  const changes: DdlChange[] = [];
  let bytes: Buffer | undefined;
  for (const raw of stmts) {
    if (raw.stmt === undefined) continue;
    const found = describe(raw.stmt);
    if (found === null) continue;
    bytes ??= Buffer.from(text);
    // Parse-tree locations are UTF-8 byte offsets into the whole text.
    const start = raw.stmt_location ?? 0;
    const piece = bytes.toString('utf8', start, raw.stmt_len ? start + raw.stmt_len : bytes.length).trim();
    const details = { ...found.details };
    if (found.index !== undefined)
      details.columns = indexColumns(piece, found.index.relationLocation - start, found.index.fallback);
    changes.push({ command: found.command, objects: unique(found.objects), statement: normalize(piece), details });
  }
  return changes;
}

interface Described {
  command: string;
  objects: string[];
  details: Record<string, unknown>;
  /** For CREATE INDEX: where to find the column list in the statement's text. */
  index?: { relationLocation: number; fallback: string[] };
}

function describe(node: Node): Described | null {
  if ('CreateStmt' in node) {
    const s = node.CreateStmt;
    if (isTemporary(s.relation)) return null;
    const parents = rangeVars(s.inhRelations);
    const details: Record<string, unknown> = { relation: qualified(s.relation) };
    if (parents.length > 0) details[s.partbound ? 'partitionOf' : 'inherits'] = parents.map(qualified);
    return { command: 'CREATE TABLE', objects: [...names([s.relation]), ...names(parents)], details };
  }
  if ('CreateForeignTableStmt' in node) {
    const rel = node.CreateForeignTableStmt.base?.relation;
    return { command: 'CREATE FOREIGN TABLE', objects: names([rel]), details: { relation: qualified(rel) } };
  }
  if ('CreateTableAsStmt' in node) {
    const s = node.CreateTableAsStmt;
    const rel = s.into?.rel;
    if (isTemporary(rel)) return null;
    const command =
      s.objtype === 'OBJECT_MATVIEW'
        ? 'CREATE MATERIALIZED VIEW'
        : s.is_select_into
          ? 'SELECT INTO'
          : 'CREATE TABLE AS';
    return { command, objects: names([rel]), details: { relation: qualified(rel) } };
  }
  if ('SelectStmt' in node) {
    const rel = node.SelectStmt.intoClause?.rel;
    if (rel === undefined || isTemporary(rel)) return null;
    return { command: 'SELECT INTO', objects: names([rel]), details: { relation: qualified(rel) } };
  }
  if ('ViewStmt' in node) {
    const s = node.ViewStmt;
    if (isTemporary(s.view)) return null;
    return {
      command: 'CREATE VIEW',
      objects: names([s.view]),
      details: { relation: qualified(s.view), replace: s.replace === true },
    };
  }
  if ('IndexStmt' in node) {
    const s = node.IndexStmt;
    const fallback = (s.indexParams ?? []).map((p) => ('IndexElem' in p && p.IndexElem.name) || '(expression)');
    return {
      command: 'CREATE INDEX',
      objects: [...(s.idxname ? [s.idxname] : []), ...names([s.relation])],
      details: {
        index: s.idxname ?? null,
        relation: qualified(s.relation),
        method: s.accessMethod ?? 'btree',
        unique: s.unique === true,
        concurrent: s.concurrent === true,
        partial: s.whereClause !== undefined,
      },
      index: { relationLocation: s.relation?.location ?? 0, fallback },
    };
  }
  if ('AlterTableStmt' in node) {
    const s = node.AlterTableStmt;
    const objects = names([s.relation]);
    const subcommands: string[] = [];
    for (const item of s.cmds ?? []) {
      if (!('AlterTableCmd' in item)) continue;
      const cmd = item.AlterTableCmd;
      subcommands.push(subcommandText(cmd.subtype ?? '', cmd.name, cmd.def));
      objects.push(...alterTouches(cmd.subtype ?? '', cmd.name, cmd.def));
    }
    return {
      command: `ALTER ${objectWord(s.objtype ?? 'OBJECT_TABLE')}`,
      objects,
      details: { relation: qualified(s.relation), subcommands },
    };
  }
  if ('RenameStmt' in node) {
    const s = node.RenameStmt;
    const type = s.renameType ?? 'OBJECT_TABLE';
    const details: Record<string, unknown> = {
      rename: objectWord(type).toLowerCase(),
      from: s.subname ?? null,
      to: s.newname ?? null,
    };
    if (s.relation) details.relation = qualified(s.relation);
    let objects: string[];
    let command: string;
    if (type === 'OBJECT_COLUMN' || type === 'OBJECT_TABCONSTRAINT') {
      // relationType is only filled in for columns (TABLE, VIEW...); elsewhere it reads as the enum's zero.
      const owner =
        type === 'OBJECT_COLUMN' && s.relationType && RELATION_TYPES.has(s.relationType)
          ? s.relationType
          : 'OBJECT_TABLE';
      command = `ALTER ${objectWord(owner)}`;
      // A primary key or unique constraint shares its name with its index.
      objects = [
        ...names([s.relation]),
        ...(type === 'OBJECT_TABCONSTRAINT' ? [s.subname ?? '', s.newname ?? ''] : []),
      ];
    } else if (RELATION_TYPES.has(type)) {
      command = `ALTER ${objectWord(type)}`;
      details.from = s.relation?.relname ?? null;
      objects = [...names([s.relation]), s.newname ?? ''];
    } else {
      command = `ALTER ${objectWord(type)}`;
      objects = names([s.relation]); // the table of a renamed trigger, policy or rule
    }
    return { command, objects, details };
  }
  if ('AlterObjectSchemaStmt' in node) {
    const s = node.AlterObjectSchemaStmt;
    if (!s.relation) return null; // functions, types...: no relation whose plans could move
    return {
      command: `ALTER ${objectWord(s.objectType ?? 'OBJECT_TABLE')}`,
      objects: names([s.relation]),
      details: { relation: qualified(s.relation), newSchema: s.newschema ?? null },
    };
  }
  if ('DropStmt' in node) {
    const s = node.DropStmt;
    const type = s.removeType ?? 'OBJECT_TABLE';
    const dropped = (s.objects ?? []).map(objectName);
    let objects: string[] = [];
    if (RELATION_TYPES.has(type)) objects = dropped.map((parts) => parts[parts.length - 1]);
    else if (ON_TABLE_TYPES.has(type)) objects = dropped.map((parts) => parts[parts.length - 2] ?? '');
    return {
      command: `DROP ${objectWord(type)}`,
      objects,
      details: {
        names: dropped.map((parts) => parts.join('.')),
        cascade: s.behavior === 'DROP_CASCADE',
        concurrent: s.concurrent === true,
      },
    };
  }
  if ('TruncateStmt' in node) {
    const rels = rangeVars(node.TruncateStmt.relations);
    return { command: 'TRUNCATE', objects: names(rels), details: { relations: rels.map(qualified) } };
  }
  if ('ReindexStmt' in node) {
    const s = node.ReindexStmt;
    const kind = (s.kind ?? 'REINDEX_OBJECT_INDEX').replace('REINDEX_OBJECT_', '');
    return {
      command: 'REINDEX',
      objects: names([s.relation]),
      details: { kind, name: s.relation ? qualified(s.relation) : (s.name ?? null) },
    };
  }
  if ('CreateSeqStmt' in node) {
    const rel = node.CreateSeqStmt.sequence;
    if (isTemporary(rel)) return null;
    return { command: 'CREATE SEQUENCE', objects: names([rel]), details: { relation: qualified(rel) } };
  }
  if ('AlterSeqStmt' in node) {
    const rel = node.AlterSeqStmt.sequence;
    return { command: 'ALTER SEQUENCE', objects: names([rel]), details: { relation: qualified(rel) } };
  }
  if ('CreateTrigStmt' in node) {
    const s = node.CreateTrigStmt;
    return {
      command: 'CREATE TRIGGER',
      objects: names([s.relation]),
      details: { name: s.trigname ?? null, relation: qualified(s.relation) },
    };
  }
  if ('CreatePolicyStmt' in node) {
    const s = node.CreatePolicyStmt;
    return {
      command: 'CREATE POLICY',
      objects: names([s.table]),
      details: { name: s.policy_name ?? null, relation: qualified(s.table) },
    };
  }
  if ('AlterPolicyStmt' in node) {
    const s = node.AlterPolicyStmt;
    return {
      command: 'ALTER POLICY',
      objects: names([s.table]),
      details: { name: s.policy_name ?? null, relation: qualified(s.table) },
    };
  }
  if ('RuleStmt' in node) {
    const s = node.RuleStmt;
    return {
      command: 'CREATE RULE',
      objects: names([s.relation]),
      details: { name: s.rulename ?? null, relation: qualified(s.relation) },
    };
  }
  if ('CreateStatsStmt' in node) {
    const s = node.CreateStatsStmt;
    const rels = rangeVars(s.relations);
    return {
      command: 'CREATE STATISTICS',
      objects: names(rels),
      details: { name: strings(s.defnames).join('.'), relations: rels.map(qualified) },
    };
  }
  if ('CreateFunctionStmt' in node) {
    // SQL functions are inlined into the plans that call them.
    const s = node.CreateFunctionStmt;
    return {
      command: s.is_procedure ? 'CREATE PROCEDURE' : 'CREATE FUNCTION',
      objects: [],
      details: { name: strings(s.funcname).join('.'), replace: s.replace === true },
    };
  }
  if ('CreateSchemaStmt' in node) {
    return { command: 'CREATE SCHEMA', objects: [], details: { name: node.CreateSchemaStmt.schemaname ?? null } };
  }
  if ('CreateExtensionStmt' in node) {
    // Extensions bring operator classes and index methods with them.
    return { command: 'CREATE EXTENSION', objects: [], details: { name: node.CreateExtensionStmt.extname ?? null } };
  }
  return null;
}

/** Object kinds that are relations: their own names can appear in a plan. */
const RELATION_TYPES = new Set<ObjectType>([
  'OBJECT_TABLE',
  'OBJECT_INDEX',
  'OBJECT_VIEW',
  'OBJECT_MATVIEW',
  'OBJECT_SEQUENCE',
  'OBJECT_FOREIGN_TABLE',
]);
/** Object kinds named "name ON table": the DropStmt list ends with the table, then the name. */
const ON_TABLE_TYPES = new Set<ObjectType>(['OBJECT_TRIGGER', 'OBJECT_POLICY', 'OBJECT_RULE']);

const OBJECT_WORDS: Partial<Record<ObjectType, string>> = {
  OBJECT_MATVIEW: 'MATERIALIZED VIEW',
  OBJECT_STATISTIC_EXT: 'STATISTICS',
  OBJECT_TABCONSTRAINT: 'CONSTRAINT',
  OBJECT_FDW: 'FOREIGN DATA WRAPPER',
  OBJECT_FOREIGN_SERVER: 'SERVER',
  OBJECT_TSCONFIGURATION: 'TEXT SEARCH CONFIGURATION',
  OBJECT_TSDICTIONARY: 'TEXT SEARCH DICTIONARY',
  OBJECT_TSPARSER: 'TEXT SEARCH PARSER',
  OBJECT_TSTEMPLATE: 'TEXT SEARCH TEMPLATE',
};

/** The SQL words for an object kind: OBJECT_FOREIGN_TABLE -> 'FOREIGN TABLE'. */
function objectWord(type: ObjectType): string {
  return OBJECT_WORDS[type] ?? type.replace(/^OBJECT_/, '').replace(/_/g, ' ');
}

const SUBCOMMAND_WORDS: Record<string, string> = {
  AT_ColumnDefault: 'ALTER COLUMN SET/DROP DEFAULT',
  AT_AlterColumnType: 'ALTER COLUMN TYPE',
  AT_SetNotNull: 'ALTER COLUMN SET NOT NULL',
  AT_DropNotNull: 'ALTER COLUMN DROP NOT NULL',
  AT_SetStatistics: 'ALTER COLUMN SET STATISTICS',
  AT_SetTableSpace: 'SET TABLESPACE',
  AT_SetRelOptions: 'SET (options)',
  AT_ResetRelOptions: 'RESET (options)',
  AT_EnableRowSecurity: 'ENABLE ROW LEVEL SECURITY',
  AT_DisableRowSecurity: 'DISABLE ROW LEVEL SECURITY',
};

/** 'ADD COLUMN x', 'ALTER COLUMN TYPE y', 'ADD CONSTRAINT fk'... for an AlterTableCmd. */
function subcommandText(subtype: string, name: string | undefined, def: Node | undefined): string {
  // AT_DropColumn -> DROP COLUMN: the enum names follow the SQL words closely enough.
  const words =
    SUBCOMMAND_WORDS[subtype] ??
    subtype
      .replace(/^AT_/, '')
      .replace(/([a-z])([A-Z])/g, '$1 $2')
      .toUpperCase();
  let target = name;
  if (def !== undefined && 'ColumnDef' in def) target ??= def.ColumnDef.colname;
  if (def !== undefined && 'Constraint' in def) {
    if (!def.Constraint.conname && subtype === 'AT_AddConstraint')
      return `ADD ${constraintWord(def.Constraint.contype ?? '')}`;
    target ??= def.Constraint.conname;
  }
  if (def !== undefined && 'PartitionCmd' in def) target ??= qualified(def.PartitionCmd.name) ?? undefined;
  return target ? `${words} ${target}` : words;
}

/** For unnamed constraints: 'ADD CONSTRAINT PRIMARY KEY'. */
function constraintWord(contype: string): string {
  if (contype === 'CONSTR_PRIMARY' || contype === 'CONSTR_FOREIGN') return `${contype.slice(7)} KEY`;
  return contype.replace(/^CONSTR_/, '').replace(/_/g, ' ');
}

/** Relations an ALTER TABLE subcommand touches besides the table itself. */
function alterTouches(subtype: string, name: string | undefined, def: Node | undefined): string[] {
  if (def !== undefined && 'PartitionCmd' in def) return names([def.PartitionCmd.name]);
  if (def !== undefined && 'Constraint' in def) {
    const c = def.Constraint;
    // The referenced table of a foreign key; the index behind a key constraint.
    return [
      ...names([c.pktable]),
      ...(c.indexname ? [c.indexname] : []),
      ...(c.conname && HAS_INDEX.has(c.contype ?? '') ? [c.conname] : []),
    ];
  }
  // Dropping a primary key or unique constraint drops the index of the same name.
  if (subtype === 'AT_DropConstraint' && name) return [name];
  return [];
}
const HAS_INDEX = new Set(['CONSTR_PRIMARY', 'CONSTR_UNIQUE', 'CONSTR_EXCLUSION']);

/**
 * The index's column list as written ("lower(email)", "created_at DESC"), cut from
 * the statement's tokens: the first parenthesis after the table name opens it.
 * Falls back to the plain column names when the tokens do not line up.
 */
function indexColumns(piece: string, relationOffset: number, fallback: string[]): string[] {
  let tokens;
  try {
    tokens = scanSync(piece).tokens;
  } catch {
    return fallback;
  }
  const bytes = Buffer.from(piece);
  const columns: string[] = [];
  let depth = 0;
  let first = -1;
  let last = -1;
  for (const token of tokens) {
    if (depth === 0) {
      if (token.start >= relationOffset && token.text === '(') depth = 1;
      continue;
    }
    if (token.text === '(') depth++;
    else if (token.text === ')') depth--;
    if ((depth === 1 && token.text === ',') || depth === 0) {
      if (first >= 0) columns.push(bytes.toString('utf8', first, last));
      first = -1;
      if (depth === 0) break;
      continue;
    }
    if (first < 0) first = token.start;
    last = token.end;
  }
  return columns.length === fallback.length ? columns : fallback;
}

function normalize(piece: string): string {
  try {
    return normalizeSync(piece).trim();
  } catch {
    return piece;
  }
}

function isTemporary(rel: RangeVar | undefined): boolean {
  return rel?.relpersistence === 't';
}

function rangeVars(nodes: Node[] | undefined): RangeVar[] {
  const out: RangeVar[] = [];
  for (const n of nodes ?? []) if ('RangeVar' in n) out.push(n.RangeVar);
  return out;
}

function names(rels: (RangeVar | undefined)[]): string[] {
  const out: string[] = [];
  for (const rel of rels) if (rel?.relname) out.push(rel.relname);
  return out;
}

function qualified(rel: RangeVar | undefined): string | null {
  if (!rel?.relname) return null;
  return rel.schemaname ? `${rel.schemaname}.${rel.relname}` : rel.relname;
}

function strings(nodes: Node[] | undefined): string[] {
  const out: string[] = [];
  for (const n of nodes ?? []) if ('String' in n && n.String.sval !== undefined) out.push(n.String.sval);
  return out;
}

/** A dropped object's name parts: List of Strings, a bare String, a TypeName, or a function signature. */
function objectName(node: Node): string[] {
  if ('List' in node) return strings(node.List.items);
  if ('String' in node) return node.String.sval !== undefined ? [node.String.sval] : [];
  if ('TypeName' in node) return strings(node.TypeName.names);
  if ('ObjectWithArgs' in node) return strings(node.ObjectWithArgs.objname);
  return [];
}

function unique(objects: string[]): string[] {
  return [...new Set(objects.filter((o) => o !== ''))];
}
