// The dashboard in a real browser (Debian's Chromium through playwright-core), in
// front of a real pgwarden and PostgreSQL with a live workload: the shapes table
// fills and sorts, a shape's chart draws, Block and Unblock take effect for a
// node-postgres client, and the incident replay (an index dropped out-of-band)
// appears as a banner naming the plan change and the dropped index. Screenshots go
// to test/dashboard/output/; with PGWARDEN_UPDATE_SCREENSHOTS=1 the final two also
// replace docs/screenshots/overview.png and incident.png (the README shows the
// demo's own, docs/screenshots/demo-incident.png: retaken by test/dashboard/demo-screenshot.ts).

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test, type TestContext } from 'node:test';
import pg from 'pg';
import { chromium, type Browser, type Page } from 'playwright-core';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { createUsersTable, dropUsersTable, fastDetection } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const CHROMIUM = '/usr/bin/chromium';
const HAVE_CHROMIUM = fs.existsSync(CHROMIUM);
const SKIP_MESSAGE = `no Chromium at ${CHROMIUM} (apt-get install -y chromium): browser tests skipped`;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const OUTPUT = path.join(root, 'test/dashboard/output');
const DOCS = path.join(root, 'docs/screenshots');

const TABLE = 'pgw_dash_users';
const INDEX = 'pgw_dash_users_email_idx';
const WRONG_INDEX = 'pgw_dash_users_name_idx';
const ROWS = 300_000;
const HOT_QUERY = `select id, name from ${TABLE} where email = $1`;
const SLOW_QUERY = 'select pg_sleep(0.05)';
/** Literals are normalized: the shape of SLOW_QUERY. */
const SLOW_SHAPE = 'select pg_sleep($1)';

interface Row {
  fingerprint: string;
  query: string;
  status: string;
  calls: number;
  p95: number;
}

describe('the dashboard in a browser', { timeout: 300_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;
  let browser: Browser;
  let page: Page;
  let base: string;
  let hot: string;
  const pageErrors: string[] = [];

  before(async () => {
    if (!HAVE_CHROMIUM) return;
    fs.mkdirSync(OUTPUT, { recursive: true });
    await createUsersTable(TABLE, INDEX, ROWS, { events: true });
    pgw = await startTestApp({ ...fastDetection(), mitigation: 'off' });
    let n = 0;
    const email = () => `user${1 + ((n++ * 7919) % ROWS)}@example.com`;
    workload = await startWorkload(pgw.url(), [
      { next: () => ({ text: HOT_QUERY, values: [email()] }) },
      { next: (i) => ({ text: `select email from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 2 },
      { next: (i) => ({ text: `insert into ${TABLE}_events (user_id) values ($1)`, values: [i] }), pauseMs: 5 },
      // Few calls but the highest p95: sorting by calls and by p95 must disagree.
      { next: () => ({ text: SLOW_QUERY }), pauseMs: 100 },
    ]);
    // launch() gives every run a fresh temporary profile (user data dir), removed at close.
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      chromiumSandbox: false,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on('pageerror', (err) => pageErrors.push(`pageerror: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error') pageErrors.push(`console: ${msg.text()}`);
    });
    base = `http://127.0.0.1:${pgw.app.adminPort}`;
  });

  after(async () => {
    await browser?.close();
    await workload?.stop();
    await pgw?.stop();
    if (HAVE_CHROMIUM) await dropUsersTable(TABLE);
  });

  function skipWithoutChromium(t: TestContext): boolean {
    if (HAVE_CHROMIUM) return false;
    t.skip(SKIP_MESSAGE);
    return true;
  }

  // A string, not a function: tsx would wrap named inner functions in a helper the page does not have.
  const READ_ROWS = `[...document.querySelectorAll('#shapes-table tbody tr[data-fingerprint]')].map((tr) => {
    const cell = (column) => tr.querySelector('td[data-column="' + column + '"]');
    return {
      fingerprint: tr.dataset.fingerprint,
      query: cell('query').title.split('\\n')[0],
      status: cell('status').querySelector('[data-status]')?.dataset.status ?? '',
      calls: Number(cell('calls').dataset.value),
      p95: Number(cell('p95_ms').dataset.value),
    };
  })`;

  function rows(): Promise<Row[]> {
    return page.evaluate(READ_ROWS) as Promise<Row[]>;
  }

  const descending = (values: number[]) => values.every((v, i) => i === 0 || values[i - 1] >= v);

  async function screenshot(name: string, target: Page | ReturnType<Page['locator']> = page): Promise<string> {
    const file = path.join(OUTPUT, name);
    await target.screenshot({ path: file, animations: 'disabled' });
    return file;
  }

  test('the token in the URL fragment opens a live shapes table', async (t) => {
    if (skipWithoutChromium(t)) return;
    await page.goto(`${base}/#token=${encodeURIComponent(pgw.config.admin_token!)}`);
    const first = await waitFor(
      async () => {
        const list = await rows();
        return list.length >= 4 && list.some((r) => r.query === HOT_QUERY) && list.some((r) => r.query === SLOW_SHAPE)
          ? list
          : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 250, what: 'the shapes table to list the workload' },
    );
    hot = first.find((r) => r.query === HOT_QUERY)!.fingerprint;
    const callsBefore = first.find((r) => r.fingerprint === hot)!.calls;
    await waitFor(async () => ((await rows()).find((r) => r.fingerprint === hot)?.calls ?? 0) > callsBefore, {
      timeoutMs: 10_000,
      intervalMs: 250,
      what: 'the hot shape\u2019s call count to grow on the next refresh',
    });
    assert.equal(await page.textContent('#connection-text'), 'Live');
    assert.equal(new URL(page.url()).hash, '', 'the token is taken out of the address bar');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('pgwarden.admin_token')), pgw.config.admin_token);
    assert.equal(await page.isVisible('#login'), false);
    assert.match((await page.textContent('#incidents')) ?? '', /No active incidents/);
  });

  test('sorting by calls and by p95 reorders the shapes', async (t) => {
    if (skipWithoutChromium(t)) return;
    const sortedBy = async (sort: string, label: string, key: 'calls' | 'p95') => {
      await page.click(`button[data-sort="${sort}"]`);
      return waitFor(
        async () => {
          const sortedHeader = await page.getAttribute(`th:has(button[data-sort="${sort}"])`, 'aria-sort');
          if (
            sortedHeader !== 'descending' ||
            !((await page.textContent('#shapes-hint')) ?? '').includes(`by ${label}`)
          )
            return undefined;
          const list = await rows();
          return list.length >= 4 && descending(list.map((r) => r[key])) ? list : undefined;
        },
        { timeoutMs: 10_000, intervalMs: 200, what: `the table sorted by ${label}` },
      );
    };
    const byCalls = await sortedBy('calls', 'calls', 'calls');
    assert.equal(byCalls[0].query, HOT_QUERY, 'the back-to-back lookup has the most calls');
    const byP95 = await sortedBy('p95', 'p95', 'p95');
    assert.equal(byP95[0].query, SLOW_SHAPE, 'the 50 ms sleep has the highest p95');
    assert.notDeepEqual(
      byCalls.map((r) => r.fingerprint),
      byP95.map((r) => r.fingerprint),
    );
    await page.click('button[data-sort="total_time"]');
  });

  test('selecting a shape shows its latency chart, plan and stats', async (t) => {
    if (skipWithoutChromium(t)) return;
    await page.click(`#shapes-table tr[data-fingerprint="${hot}"]`);
    await page.locator('#detail').waitFor({ state: 'visible' });
    assert.match((await page.textContent('#detail-title')) ?? '', new RegExp(hot));
    await page.locator('#latency-chart canvas').first().waitFor({ state: 'attached', timeout: 10_000 });
    assert.equal(await page.getAttribute(`#shapes-table tr[data-fingerprint="${hot}"]`, 'aria-selected'), 'true');
    await waitFor(async () => ((await page.textContent('#detail .detail-plans')) ?? '').includes(INDEX), {
      timeoutMs: 20_000,
      intervalMs: 250,
      what: 'the detail to show the index plan',
    });
    const chartBox = await page.locator('#latency-chart canvas').first().boundingBox();
    assert.ok(
      chartBox && chartBox.width > 300 && chartBox.height > 150,
      `chart drawn at a readable size: ${JSON.stringify(chartBox)}`,
    );
    await screenshot('detail-before.png', page.locator('#detail'));
  });

  test('Block with confirmation refuses the shape with 42501, Unblock lets it run again', async (t) => {
    if (skipWithoutChromium(t)) return;
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      await page.click('#detail button[data-action="block"]');
      await page.locator('#modal').waitFor({ state: 'visible' });
      await page.fill('#modal textarea[name="reason"]', 'dashboard test: stop the lookup');
      await screenshot('block-dialog.png');
      await page.click('#modal button[data-action="confirm"]');
      await page.locator('#modal').waitFor({ state: 'detached' });
      await page.locator('#detail .detail-rules [data-rule]').waitFor({ state: 'visible', timeout: 10_000 });
      await waitFor(async () => (await rows()).find((r) => r.fingerprint === hot)?.status === 'blocked', {
        timeoutMs: 10_000,
        intervalMs: 200,
        what: 'the shape to show as blocked',
      });

      await assert.rejects(client.query(HOT_QUERY, ['user1@example.com']), (err: Error & { code?: string }) => {
        assert.equal(err.code, '42501');
        assert.match(err.message, /^pgwarden:/);
        return true;
      });

      await page.click('#detail .detail-rules button[data-action="lift"]');
      await page.locator('#modal').waitFor({ state: 'visible' });
      assert.match((await page.textContent('#modal')) ?? '', /Unblock this shape/);
      await page.click('#modal button[data-action="confirm"]');
      await page.locator('#modal').waitFor({ state: 'detached' });
      await waitFor(async () => ((await page.textContent('#detail .detail-rules')) ?? '').includes('No rules'), {
        timeoutMs: 10_000,
        intervalMs: 200,
        what: 'the rule to be gone',
      });
      const { rows: found } = await client.query(HOT_QUERY, ['user1@example.com']);
      assert.equal(found.length, 1);
      assert.deepEqual((await pgw.api('/api/rules')).body, []);
    } finally {
      await client.end();
    }
  });

  test('an index dropped out-of-band shows as an incident banner naming the plan change and the dropped index', async (t) => {
    if (skipWithoutChromium(t)) return;
    // As in the replay: the hot shape needs its index plan and a baseline first.
    await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/shapes/${hot}`);
        return body.plans?.current?.nodes?.some((n: string) => n.includes(INDEX)) && body.series.length >= 8;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the hot shape to have an index plan and a baseline' },
    );
    await withClient(async (c) => {
      await c.query(`drop index ${INDEX}`);
      await c.query(`create index ${WRONG_INDEX} on ${TABLE} (name)`);
    });
    const banner = page.locator(`#incidents .incident[data-fingerprint="${hot}"]`);
    await waitFor(
      async () => {
        if ((await banner.count()) === 0) return undefined;
        const plan = (await banner.locator('.cause-plan').allTextContents()).join('\n');
        const schema = (await banner.locator('.cause-schema').allTextContents()).join('\n');
        return plan.includes(`Seq Scan on ${TABLE}`) && schema.includes(INDEX) && /dropped|DROP/.test(schema);
      },
      { timeoutMs: 40_000, intervalMs: 250, what: 'an incident banner naming the Seq Scan and the dropped index' },
    );
    const text = (await banner.textContent()) ?? '';
    assert.match(text, /p95 latency/);
    assert.match(text, /× slower/);
    assert.match(text, /before the onset|after the onset|at the onset/);
    assert.match(text, /Ruled out/);
    assert.equal(
      await page.locator(`#shapes-table tr[data-fingerprint="${hot}"] [data-status]`).getAttribute('data-status'),
      'regressed',
    );

    // The overview as someone arriving at the incident sees it: no shape opened yet.
    await page.click('#detail button[aria-label="Close shape detail"]');
    await page.evaluate(() => window.scrollTo(0, 0));
    const overview = await screenshot('overview-incident.png');

    await banner.locator('button[data-action="open"]').click();
    await waitFor(async () => ((await page.textContent('#detail .detail-plans')) ?? '').includes('Seq Scan'), {
      timeoutMs: 15_000,
      intervalMs: 250,
      what: 'the shape detail to show the plan change',
    });
    const detail = await screenshot('detail-incident.png', page.locator('#detail'));

    if (process.env.PGWARDEN_UPDATE_SCREENSHOTS === '1') {
      fs.mkdirSync(DOCS, { recursive: true });
      fs.copyFileSync(overview, path.join(DOCS, 'overview.png'));
      fs.copyFileSync(detail, path.join(DOCS, 'incident.png'));
    }
    assert.deepEqual(pageErrors, [], 'no script errors or CSP violations in the page');
  });

  test('a wrong token shows the login form, and the right one signs in', async (t) => {
    if (skipWithoutChromium(t)) return;
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    try {
      const other = await context.newPage();
      await other.goto(`${base}/#token=not-the-admin-token-at-all`);
      await other.locator('#login').waitFor({ state: 'visible', timeout: 10_000 });
      assert.match((await other.textContent('#login-error')) ?? '', /rejected/);
      assert.equal(await other.isVisible('#app'), false);
      assert.equal(
        await other.evaluate(() => sessionStorage.getItem('pgwarden.admin_token')),
        null,
        'a rejected token is not kept',
      );
      await other.screenshot({ path: path.join(OUTPUT, 'login.png') });
      await other.fill('#login-token', pgw.config.admin_token!);
      await other.click('#login-form button[type="submit"]');
      await other
        .locator('#shapes-table tbody tr[data-fingerprint]')
        .first()
        .waitFor({ state: 'visible', timeout: 10_000 });
      assert.equal(await other.isVisible('#login'), false);
    } finally {
      await context.close();
    }
  });
});
