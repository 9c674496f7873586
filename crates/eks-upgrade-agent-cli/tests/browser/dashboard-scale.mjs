// The dashboard with many tasks, in headless Chromium (run by tests/it/dashboard.rs with the same
// environment as dashboard.mjs). Writes three upgrades with `progress apply` (1,000 tasks with a
// retried failure, 10,000 tasks with a failure near the end, and a small one, the newest), then:
// the 1,000-task upgrade renders within a second of the click (measured in the page and
// printed), also fully expanded; the 10,000-task one stays usable: few rows in the DOM, jump to
// failure and End reach rows far down.
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

const bin = process.env.EUA_BIN;
const dataDir = process.env.EUA_TEST_DATA_DIR;
const shots = process.env.EUA_SCREENSHOTS;
if (!bin || !dataDir || !shots) throw new Error('set EUA_BIN, EUA_TEST_DATA_DIR and EUA_SCREENSHOTS');
fs.mkdirSync(shots, { recursive: true });
const T = 30000;
const LIMIT_MS = 1000;

const freePort = () => new Promise((resolve, reject) => {
  const s = net.createServer();
  s.once('error', reject);
  s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pad = (n) => String(n).padStart(2, '0');

// --- the data, written through `progress apply` -------------------------------------------
const lines = [];
const op = (o) => lines.push(JSON.stringify(o));
function upgrade(id, groups, children) {
  op({ op: 'upgrade.create', upgrade_id: id, plan_id: 'p-' + id, cluster_name: 'scale' });
  op({ op: 'upgrade.start', upgrade_id: id, phase: 'node_groups' });
  const tasks = [];
  for (let g = 0; g < groups; g++) {
    tasks.push({ task_id: `g${pad(g)}`, name: `Node group ${g}`, task_type: 'upgrade_step' });
    for (let c = 0; c < children; c++) {
      tasks.push({ task_id: `g${pad(g)}-c${pad(c)}`, name: `Drain node ip-10-0-${g}-${c}`, task_type: 'upgrade_step', parent_task_id: `g${pad(g)}` });
    }
  }
  for (let i = 0; i < tasks.length; i += 1000) op({ op: 'task.add_many', upgrade_id: id, tasks: tasks.slice(i, i + 1000) });
}
const task = (u, t, o, extra = {}) => op({ op: 'task.' + o, upgrade_id: u, task_id: t, ...extra });

upgrade('big', 20, 49);
for (let g = 0; g < 16; g++) {
  for (let c = 0; c < 49; c++) {
    if (g === 15 && c >= 30) break;
    task('big', `g${pad(g)}-c${pad(c)}`, 'complete');
  }
}
task('big', 'g15-c30', 'update', { percentage: 40 });
task('big', 'g15-c30', 'fail', { error_message: 'eviction of web-7 timed out' });
task('big', 'g15-c30', 'retry');
task('big', 'g15-c30', 'fail', { error_message: 'PodDisruptionBudget blocked web-7' });
upgrade('huge', 100, 99);
task('huge', 'g97-c50', 'update', { percentage: 10 });
task('huge', 'g97-c50', 'fail', { error_message: 'node ip-10-0-97-50 not ready' });
op({ op: 'upgrade.create', upgrade_id: 'small', plan_id: 'p', cluster_name: 'scale' });
op({ op: 'task.add', upgrade_id: 'small', task_id: 'only', name: 'Only task', task_type: 'upgrade_step' });
execFileSync(bin, ['--data-dir', dataDir, 'progress', 'apply'], { input: lines.join('\n') + '\n', stdio: ['pipe', 'ignore', 'inherit'], maxBuffer: 1 << 28 });

// --- the page ----------------------------------------------------------------------------
const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const server = spawn(bin, ['--data-dir', dataDir, 'serve', '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', 'inherit', 'inherit'] });
let browser;
let page;
let failed = false;

async function waitHealthy() {
  const end = Date.now() + 20000;
  for (;;) {
    try { if ((await fetch(base + '/healthz')).ok) return; } catch { /* not yet */ }
    if (Date.now() > end) throw new Error('the server did not come up');
    await sleep(50);
  }
}

// Clicks an upgrade's row and measures, in the page, until its tasks are laid out and painted.
function open(id, tasks) {
  return page.evaluate(([id, tasks]) => new Promise((resolve, reject) => {
    const t0 = performance.now();
    document.querySelector(`tr.upgrade[data-upgrade-id="${id}"]`).click();
    const check = () => {
      const r = window.__eua.lastRender;
      if (window.__eua.selected === id && r && r.tasks === tasks && document.querySelector('#detail-title').textContent.startsWith(id + ' ')) {
        requestAnimationFrame(() => setTimeout(() => resolve({ ms: performance.now() - t0, render: r.ms, rows: r.rows,
          dom: document.querySelectorAll('#tasks .task').length }), 0));
      } else if (performance.now() - t0 > 30000) reject(new Error('not rendered: ' + id));
      else requestAnimationFrame(check);
    };
    check();
  }), [id, tasks]);
}

const fmt = (n) => Math.round(n) + ' ms';

try {
  await waitHealthy();
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  await page.goto(base + '/');
  await page.waitForFunction(() => window.__eua.selected === 'small' && window.__eua.lastRender && window.__eua.lastRender.tasks === 1, null, { timeout: T });

  // 1,000 tasks: shown within a second of the click (completed groups collapsed).
  const big = await open('big', 1000);
  console.log(`1,000 tasks: shown ${fmt(big.ms)} after the click (layout and DOM ${fmt(big.render)}; ${big.rows} rows, ${big.dom} in the DOM)`);
  if (big.ms > LIMIT_MS) throw new Error(`1,000 tasks took ${fmt(big.ms)} (limit ${LIMIT_MS} ms)`);
  const full = await page.evaluate(() => {
    const t0 = performance.now();
    document.querySelector('#expand-all').click();
    const r = window.__eua.lastRender;
    return { ms: performance.now() - t0, rows: r.rows, dom: document.querySelectorAll('#tasks .task').length };
  });
  console.log(`1,000 tasks expanded: ${fmt(full.ms)} (${full.rows} rows, ${full.dom} in the DOM)`);
  if (full.rows !== 1000 || full.ms > LIMIT_MS) throw new Error('expand all: ' + JSON.stringify(full));
  // Jump to failure: the failed task (row 15 * 50 + 31) is scrolled into view, with its retry history.
  await page.click('[data-testid="jump-to-failure"]');
  await page.waitForFunction(() => {
    const a = document.activeElement;
    const box = document.querySelector('#tasks').getBoundingClientRect();
    const r = a && a.getBoundingClientRect();
    const h = a && a.querySelector('[data-testid="retry-history"]');
    return a && a.dataset.taskId === 'g15-c30' && r.top >= box.top && r.bottom <= box.bottom
      && h && h.textContent.includes('attempt 1 failed') && h.textContent.includes('eviction of web-7 timed out');
  }, null, { timeout: T });
  await page.screenshot({ path: path.join(shots, 'scale-1000.png') });

  // 10,000 tasks: usable (virtualised rows).
  const huge = await open('huge', 10000);
  console.log(`10,000 tasks: shown ${fmt(huge.ms)} after the click (layout and DOM ${fmt(huge.render)}; ${huge.rows} rows, ${huge.dom} in the DOM)`);
  if (huge.dom > 200) throw new Error('10,000 tasks: ' + huge.dom + ' rows in the DOM');
  await page.click('[data-testid="jump-to-failure"]');
  await page.waitForFunction(() => {
    const a = document.activeElement;
    const box = document.querySelector('#tasks').getBoundingClientRect();
    const r = a && a.getBoundingClientRect();
    return a && a.dataset.taskId === 'g97-c50' && r.top >= box.top && r.bottom <= box.bottom;
  }, null, { timeout: T });
  await page.keyboard.press('End');
  await page.waitForFunction(() => document.activeElement && document.activeElement.dataset.taskId === 'g99-c98', null, { timeout: T });
  await page.keyboard.press('Home');
  await page.waitForFunction(() => document.activeElement && document.activeElement.dataset.taskId === 'g00', null, { timeout: T });
  const dom = await page.evaluate(() => document.querySelectorAll('#tasks .task').length);
  if (dom > 200) throw new Error('10,000 tasks after scrolling: ' + dom + ' rows in the DOM');
  await page.selectOption('#task-status', 'failed');
  await page.waitForFunction(() => [...document.querySelectorAll('#tasks .task')].map((t) => t.dataset.taskId).join() === 'g97,g97-c50', null, { timeout: T });
  await page.screenshot({ path: path.join(shots, 'scale-10000.png') });
  console.log('dashboard scale ok');
} catch (e) {
  failed = true;
  console.error('dashboard scale test failed:', e);
  if (page) await page.screenshot({ path: path.join(shots, 'scale-failure.png'), fullPage: true }).catch(() => {});
} finally {
  if (browser) await browser.close();
  server.kill('SIGKILL');
}
process.exit(failed ? 1 : 0);
