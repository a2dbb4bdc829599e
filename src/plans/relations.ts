// Relation names as plans and the timeline carry them: schema-qualified when the
// source knows the schema (a VERBOSE plan, the catalog watch: "tenant_b.users"),
// bare when it does not (a DDL statement that did not qualify its table, older
// plans). Tenants whose search_path points at their own schema run the same query
// on different tables, so a change to tenant_a's index must not count as a change
// to tenant_b's plan, while a bare name, whose schema is unknown, may be anyone's.

/** "users" of "tenant_b.users" (split at the last dot; names with dots of their own are not told apart). */
export function bareName(name: string): string {
  return name.slice(name.lastIndexOf('.') + 1);
}

/** What callers need of a RelationSet (a plain Set of bare names is one too). */
export interface RelationLookup extends Iterable<string> {
  has(name: string): boolean;
}

/**
 * A set of relation names, lower-cased, that answers "does this touch one of
 * them?": a bare name matches a member of that name in any schema; a qualified
 * name matches itself, or a bare member (whose schema is unknown). Iterates over
 * the members as added.
 */
export class RelationSet implements RelationLookup {
  private readonly members = new Set<string>();
  private readonly bare = new Set<string>();

  constructor(names: Iterable<string> = []) {
    for (const name of names) this.add(name);
  }

  add(name: string): this {
    const lower = name.toLowerCase();
    this.members.add(lower);
    this.bare.add(bareName(lower));
    return this;
  }

  has(name: string): boolean {
    const lower = name.toLowerCase();
    const bare = bareName(lower);
    if (bare === lower) return this.bare.has(lower);
    return this.members.has(lower) || this.members.has(bare);
  }

  get size(): number {
    return this.members.size;
  }

  [Symbol.iterator](): Iterator<string> {
    return this.members[Symbol.iterator]();
  }
}
