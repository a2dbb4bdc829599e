// Where rules (and, with a control database, incidents) are kept beyond the
// process: a local state file for a single instance, or a control database shared
// by a fleet. The rule store talks only to this interface.

import type { Rule } from './rule.ts';

export interface RulePersistence {
  /** The rules stored, as of now (expired ones included: the store drops them). */
  load(): Promise<Rule[]>;
  /** Stores a new rule (and tells the other instances, if any). */
  add(rule: Rule): Promise<void>;
  /** Removes a rule by id (and tells the other instances, if any); unknown ids are not an error. */
  remove(id: string): Promise<void>;
  /**
   * Called with the full rule set whenever another instance changed it. Local-only
   * persistence never calls it.
   */
  onExternalChange(listener: (rules: Rule[]) => void): void;
  close(): Promise<void>;
}

/** Shared incidents, for persistence that spans instances (the control database). */
export interface IncidentSharing {
  /** Publishes this instance's incident (insert or update, keyed by its id). */
  publishIncident(incident: { id: string } & Record<string, unknown>): Promise<void>;
  /** Incidents of every instance, newest first, as last read from the control database. */
  sharedIncidents(): Array<{ id: string; instance: string } & Record<string, unknown>>;
}
