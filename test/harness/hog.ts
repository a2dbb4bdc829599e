// A noisy neighbour for tests: child processes that spin on the CPU (one per core
// by default) until stopped, so a test can show what host contention does.

import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import os from 'node:os';

export interface CpuHog {
  stop(): Promise<void>;
}

/** Spins `processes` children, each for at most `maxSeconds` (a test that dies without stopping them leaves no spinner for long). */
export function startCpuHog(processes = os.availableParallelism(), maxSeconds = 120): CpuHog {
  const children: ChildProcess[] = [];
  for (let i = 0; i < processes; i++) {
    children.push(
      spawn(process.execPath, ['-e', `const end = Date.now() + ${maxSeconds * 1000}; while (Date.now() < end) {}`], {
        stdio: 'ignore',
      }),
    );
  }
  return {
    async stop() {
      await Promise.all(
        children.map(async (child) => {
          if (child.exitCode !== null || child.signalCode !== null) return;
          const exited = once(child, 'exit');
          child.kill('SIGKILL');
          await exited;
        }),
      );
    },
  };
}
