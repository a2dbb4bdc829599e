// Leaves nothing behind: servers, proxies and temp dirs are released in reverse
// order of creation when the benchmark ends, fails or is interrupted.
//
// Ctrl-C aborts the run (pgbench is killed through the abort signal) and lets
// the normal path release everything; if the process exits anyway, a
// synchronous backstop kills what is left by PID.

export interface Resource {
  name: string;
  release(): Promise<void>;
  /** Synchronous last resort, run on process 'exit' if release() never ran. */
  releaseNow(): void;
}

const SIGNALS = ['SIGINT', 'SIGTERM'] as const;

export class Cleanup {
  private readonly resources: Resource[] = [];
  private readonly controller = new AbortController();
  readonly signal = this.controller.signal;

  constructor() {
    // Our listeners also tell test/harness/postgres.ts that we own the shutdown order.
    for (const name of SIGNALS) process.on(name, this.onSignal);
    process.on('exit', this.onExit);
  }

  add(resource: Resource): void {
    this.resources.push(resource);
  }

  /** Releases one resource early (e.g. a proxy that died) and forgets it. */
  async release(resource: Resource): Promise<void> {
    const index = this.resources.indexOf(resource);
    if (index >= 0) this.resources.splice(index, 1);
    await resource.release();
  }

  /** Throws if the run was interrupted; call between steps. */
  check(): void {
    this.signal.throwIfAborted();
  }

  async releaseAll(): Promise<void> {
    while (this.resources.length > 0) {
      const resource = this.resources.pop()!;
      try {
        await resource.release();
      } catch (error) {
        console.error(`cleanup: could not release ${resource.name}: ${(error as Error).message}`);
        resource.releaseNow();
      }
    }
    for (const name of SIGNALS) process.off(name, this.onSignal);
    process.off('exit', this.onExit);
  }

  private readonly onSignal = (signal: NodeJS.Signals): void => {
    if (this.signal.aborted) {
      console.error(`\n${signal} again: still cleaning up, please wait`);
      return;
    }
    console.error(`\n${signal}: stopping the benchmark and cleaning up`);
    this.controller.abort(new Interrupted(signal));
  };

  private readonly onExit = (): void => {
    for (const resource of this.resources.reverse()) resource.releaseNow();
  };
}

export class Interrupted extends Error {
  constructor(readonly signalName: NodeJS.Signals) {
    super(`interrupted by ${signalName}`);
  }
}
