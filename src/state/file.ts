// Rules of a single instance without a control database, kept in a local JSON
// file so they survive a restart. Every change rewrites the whole file atomically
// (temp file in the same directory, fsync, rename), one change at a time, so a
// crash leaves either the old rules or the new ones, never half a file. A file
// that cannot be read is an error, not "no rules": silently forgetting a block
// rule would let the query it blocks run again. The detector's baselines and
// incident history live in the same file under "detector"; each kind of write
// keeps the other's part as it was.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import type { DetectorState, DetectorStateStore } from '../detect/incidents.ts';
import { isRule, type Rule } from '../rules/rule.ts';
import type { RulePersistence } from '../rules/persistence.ts';

const VERSION = 1;

interface StateFileContents {
  version: typeof VERSION;
  rules: Rule[];
  detector?: DetectorState;
}

export class StateFile implements RulePersistence, DetectorStateStore {
  /** Every operation runs after the previous one settled, so rewrites never interleave. */
  private queue: Promise<unknown> = Promise.resolve();
  /**
   * Entries of the file that are not valid rules, as last read: never applied, but
   * written back untouched, so an entry from a newer version or a hand edit with a
   * typo is not erased by the next change.
   */
  private invalid: unknown[] = [];

  constructor(
    private readonly path: string,
    private readonly log: Logger,
  ) {}

  load(): Promise<Rule[]> {
    return this.serialized(() => this.read());
  }

  add(rule: Rule): Promise<void> {
    return this.serialized(async () => {
      const contents = await this.readContents();
      const rules = contents.rules.filter((r) => r.id !== rule.id);
      rules.push(rule);
      await this.write({ ...contents, rules });
    });
  }

  remove(id: string): Promise<void> {
    return this.serialized(async () => {
      const contents = await this.readContents();
      const kept = contents.rules.filter((r) => r.id !== id);
      if (kept.length !== contents.rules.length) await this.write({ ...contents, rules: kept });
    });
  }

  /** The detector's saved baselines and incidents, or null if none were saved. */
  loadDetectorState(): Promise<DetectorState | null> {
    return this.serialized(async () => {
      const detector = (await this.readContents()).detector;
      return typeof detector === 'object' &&
        detector !== null &&
        Array.isArray(detector.baselines) &&
        Array.isArray(detector.incidents)
        ? detector
        : null;
    });
  }

  saveDetectorState(state: DetectorState): Promise<void> {
    return this.serialized(async () => {
      const contents = await this.readContents();
      await this.write({ ...contents, detector: state });
    });
  }

  /** A state file belongs to one instance: nobody else changes it. */
  onExternalChange(_listener: (rules: Rule[]) => void): void {}

  /** Waits for the changes already asked for. */
  async close(): Promise<void> {
    await this.queue.catch(() => undefined);
  }

  private serialized<T>(operation: () => Promise<T>): Promise<T> {
    const result = this.queue.then(operation, operation);
    this.queue = result.catch(() => undefined);
    return result;
  }

  private async read(): Promise<Rule[]> {
    return (await this.readContents()).rules;
  }

  private async readContents(): Promise<StateFileContents> {
    let text: string;
    try {
      text = await fs.readFile(this.path, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { version: VERSION, rules: [] };
      throw new Error(`state file ${this.path}: cannot read it: ${(error as Error).message}`, { cause: error });
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (error) {
      throw new Error(
        `state file ${this.path}: not valid JSON (${(error as Error).message}); ` +
          'refusing to start without its rules: repair or remove the file',
        { cause: error },
      );
    }
    const contents = parsed as Partial<StateFileContents> | null;
    if (typeof contents !== 'object' || contents === null || Array.isArray(contents)) {
      throw new Error(
        `state file ${this.path}: expected an object { "version": ${VERSION}, "rules": [...] }, got ${describe(parsed)}`,
      );
    }
    if (contents.version !== VERSION) {
      throw new Error(
        `state file ${this.path}: unsupported version ${JSON.stringify(contents.version)} (this pgwarden reads version ${VERSION})`,
      );
    }
    if (!Array.isArray(contents.rules)) {
      throw new Error(`state file ${this.path}: "rules" must be an array, got ${describe(contents.rules)}`);
    }
    const rules: Rule[] = [];
    const invalid: unknown[] = [];
    contents.rules.forEach((entry: unknown, index) => {
      if (isRule(entry)) rules.push(entry);
      else {
        invalid.push(entry);
        const id = (entry as { id?: unknown } | null)?.id;
        this.log.warn(
          { file: this.path, index, id: typeof id === 'string' ? id : undefined },
          'state file: an entry is not a valid rule; it is NOT applied, and kept in the file untouched until you repair or remove it',
        );
      }
    });
    this.invalid = invalid;
    return { version: VERSION, rules, ...(contents.detector !== undefined ? { detector: contents.detector } : {}) };
  }

  private async write(contents: StateFileContents): Promise<void> {
    const dir = path.dirname(this.path);
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const temp = path.join(dir, `.${path.basename(this.path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
    let handle: fs.FileHandle | undefined;
    try {
      handle = await fs.open(temp, 'wx', 0o600);
      // Rules indented for people who read the file; the detector's bulk on one line.
      // Entries that failed validation are written back untouched, for the operator to repair.
      const { detector, ...rest } = { ...contents, rules: [...contents.rules, ...this.invalid] };
      const text = JSON.stringify(rest, null, 2);
      await handle.writeFile(
        detector === undefined ? `${text}\n` : `${text.slice(0, -2)},\n  "detector": ${JSON.stringify(detector)}\n}\n`,
        'utf8',
      );
      await handle.sync();
      await handle.close();
      handle = undefined;
      await fs.rename(temp, this.path);
    } catch (error) {
      await handle?.close().catch(() => undefined);
      await fs.rm(temp, { force: true }).catch(() => undefined);
      throw new Error(`state file ${this.path}: cannot write it: ${(error as Error).message}`, { cause: error });
    }
    // The rename is durable once the directory entry is; not every platform can
    // fsync a directory, and the new contents are already safe in the file.
    try {
      const dirHandle = await fs.open(dir, 'r');
      try {
        await dirHandle.sync();
      } finally {
        await dirHandle.close();
      }
    } catch (error) {
      this.log.debug({ err: error, dir }, 'state file: cannot fsync the directory');
    }
  }
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value;
}
