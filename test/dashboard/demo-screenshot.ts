// Retakes the README's screenshot, docs/screenshots/demo-incident.png, from the demo
// itself: runs `pgwarden demo`, waits until the policy has mitigated the incident,
// and points headless Chromium (Debian's, through playwright-core, as the browser
// test does) at the dashboard URL the demo printed. Not a test: run it by hand.
//
//   node --import tsx test/dashboard/demo-screenshot.ts

import { spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const OUT = path.join(root, 'docs/screenshots/demo-incident.png');

const demo = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'demo'], {
  cwd: root,
  stdio: ['ignore', 'pipe', 'inherit'],
});
let output = '';
demo.stdout!.on('data', (d: Buffer) => {
  output += d.toString();
  process.stdout.write(d);
});
const exited = once(demo, 'exit');

async function until<T>(check: () => T | undefined, what: string, timeoutMs = 180_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

try {
  const url = await until(() => /Dashboard: (http:\/\/\S+)/.exec(output)?.[1], 'the dashboard URL');
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    chromiumSandbox: false,
    args: ['--disable-gpu', '--disable-dev-shm-usage'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 }, deviceScaleFactor: 1 });
    await page.goto(url);
    // Open the hot shape before the migration, so its chart and rules are on screen when it regresses.
    await page.locator('.shapes tbody tr', { hasText: 'where email' }).first().click({ timeout: 60_000 });
    await page.locator('#latency-chart canvas').waitFor({ timeout: 20_000 });
    // The demo keeps the shed rule for 6 s after MITIGATED before it reverts: shoot within that window.
    await until(() => (output.includes('MITIGATED') ? true : undefined), 'the policy to mitigate the incident');
    await page.locator('.incident').first().waitFor({ timeout: 5_000 });
    await page.waitForTimeout(3000); // one more poll, so every panel shows the same moment
    await page.screenshot({ path: OUT, fullPage: true, animations: 'disabled' });
    console.log(`wrote ${OUT}`);
  } finally {
    await browser.close();
  }
} finally {
  demo.kill('SIGINT');
  await exited;
}
