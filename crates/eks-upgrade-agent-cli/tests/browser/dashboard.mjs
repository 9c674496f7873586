// The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core). Run by tests/it/dashboard.rs with:
//   EUA_BIN             the eks-upgrade-agent binary
//   EUA_TEST_DATA_DIR   an empty data dir
//   EUA_SCREENSHOTS     where to save screenshots
// Scenario: serve with a read and a write token; report progress and artifacts through the
// API; the page (read token) shows them live; kill the server, write more with the CLI (another
// process), restart the server: the page catches up over its WebSocket without a reload.
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

const READ = 'dashboard-read-token-0123';
const WRITE = 'dashboard-write-token-0123';
const T = 15000;

const freePort = () => new Promise((resolve, reject) => {
  const s = net.createServer();
  s.once('error', reject);
  s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const port = await freePort();
const base = `http://127.0.0.1:${port}`;

function startServer() {
  return spawn(bin, ['--data-dir', dataDir, 'serve', '--listen', `127.0.0.1:${port}`], {
    env: { ...process.env, EUA_TOKENS: `${READ}:read,${WRITE}:write` },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
}

async function waitHealthy() {
  const end = Date.now() + 20000;
  for (;;) {
    try {
      const r = await fetch(base + '/healthz');
      if (r.ok) return;
    } catch { /* not yet */ }
    if (Date.now() > end) throw new Error('the server did not come up');
    await sleep(50);
  }
}

async function api(method, p, body, contentType = 'application/json') {
  const r = await fetch(base + p, {
    method,
    headers: { Authorization: 'Bearer ' + WRITE, 'content-type': contentType },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${p}: HTTP ${r.status} ${text}`);
  return JSON.parse(text);
}

const cli = (...args) => execFileSync(bin, ['--data-dir', dataDir, ...args], { stdio: ['ignore', 'ignore', 'inherit'] });

function taskIs(page, id, status, percent, extra = null) {
  return page.waitForFunction(([id, status, percent, extra]) => {
    const r = document.querySelector(`.task[data-task-id="${id}"]`);
    return r && r.dataset.status === status && r.querySelector('.pct').textContent === percent
      && (!extra || r.textContent.includes(extra));
  }, [id, status, percent, extra], { timeout: T });
}

let server = startServer();
let browser;
let page;
let failed = false;
try {
  await waitHealthy();
  // An upgrade with three top-level tasks (one a group with a subtask), and two artifacts.
  await api('POST', '/api/v1/upgrades', { upgrade_id: 'upg-1', plan_id: 'plan-1', cluster_name: 'prod-eu', metadata: { to: '1.30' } });
  await api('POST', '/api/v1/upgrades/upg-1/start', { phase: 'control_plane' });
  await api('POST', '/api/v1/upgrades/upg-1/tasks', [
    { task_id: 'cp', name: 'Upgrade control plane', task_type: 'upgrade_step' },
    { task_id: 'groups', name: 'Node groups', task_type: 'upgrade_step' },
    { task_id: 'ng', name: 'Node group ng-1', task_type: 'upgrade_step', total_steps: 3, parent_task_id: 'groups' },
    { task_id: 'val', name: 'Validate workloads', task_type: 'validation' },
  ]);
  const session = await api('POST', '/api/v1/sessions', { upgrade_id: 'upg-1', cluster_name: 'prod-eu' });
  const coll = await api('POST', `/api/v1/sessions/${session.session_id}/collections`, { name: 'logs' });
  const up = `/api/v1/sessions/${session.session_id}/collections/${coll.collection_id}/artifacts`;
  await api('POST', `${up}?name=kubelet.log&type=log_file&tag=node&task_id=ng`, 'kubelet started\n'.repeat(200), 'application/octet-stream');
  await api('POST', `${up}?name=junit.xml&type=test_result&tag=smoke`, '<testsuite tests="3"/>', 'application/xml');

  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  // Everything the page loads comes from the server itself (files embedded, no CDN).
  const foreign = [];
  page.on('request', (r) => {
    const u = r.url();
    if (!u.startsWith(base + '/') && !u.startsWith(base.replace('http', 'ws') + '/') && !u.startsWith('data:')) foreign.push(u);
  });
  await page.goto(`${base}/?token=${READ}`);
  await page.waitForSelector('#conn[data-state="live"]', { timeout: T });
  await page.waitForSelector('tr.upgrade[data-upgrade-id="upg-1"]', { timeout: T });
  const loadId = await page.evaluate(() => window.__eua.loadId);
  const tokenInUrl = await page.evaluate(() => location.href.includes('token='));
  if (tokenInUrl) throw new Error('the token stayed in the address bar');
  const kept = await page.evaluate(() => sessionStorage.getItem('eua-token'));
  if (kept !== READ) throw new Error('the token is not kept in session storage: ' + kept);

  // Live: a progress update through the API shows on the page.
  await api('POST', '/api/v1/upgrades/upg-1/tasks/cp/update', { percentage: 40, message: 'upgrading the API server' });
  await taskIs(page, 'cp', 'in_progress', '40.0%', 'Upgrade control plane');
  // The summary's reference keys: the current task (its task_name and percentage).
  await page.waitForFunction(() => {
    const c = document.querySelector('[data-testid="current-task"]');
    return c && c.textContent.includes('now: Upgrade control plane 40.0%');
  }, null, { timeout: T });
  await page.waitForFunction(() => {
    const r = document.querySelector('tr.upgrade[data-upgrade-id="upg-1"]');
    return r && r.querySelector('.pct').textContent === '13.3%' && r.textContent.includes('in progress');
  }, null, { timeout: T });
  await page.waitForFunction(() => document.querySelector('#timeline').textContent.includes('upgrading the API server'), null, { timeout: T });
  // The upgrades list shows cluster, phase and an ETA (a rate is known now).
  const cells = await page.evaluate(() => [...document.querySelectorAll('tr.upgrade[data-upgrade-id="upg-1"] td')].map((td) => td.textContent));
  if (cells[1] !== 'prod-eu' || cells[3] !== 'control_plane' || !/min|h$|moment/.test(cells[5])) throw new Error('upgrade row: ' + JSON.stringify(cells));
  // Steps show on the task row.
  await api('POST', '/api/v1/upgrades/upg-1/tasks/ng/step', { completed_steps: 1, current_step: 'cordon ip-10-0-1-7' });
  await page.waitForFunction(() => {
    const r = document.querySelector('.task[data-task-id="ng"] .steps');
    return r && r.textContent === '1/3 steps · cordon ip-10-0-1-7';
  }, null, { timeout: T });

  // Artifacts with working download links and filters.
  await page.waitForFunction(() => document.querySelectorAll('#artifacts tbody tr').length === 2, null, { timeout: T });
  const download = await page.evaluate(async () => {
    const a = [...document.querySelectorAll('#artifacts a')].find((x) => x.textContent === 'kubelet.log');
    const r = await fetch(a.href);
    return [r.status, (await r.text()).length];
  });
  if (download[0] !== 200 || download[1] !== 'kubelet started\n'.length * 200) throw new Error('download: ' + download);
  await page.selectOption('#artifact-type', 'test_result');
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll('#artifacts tbody tr');
    return rows.length === 1 && rows[0].textContent.includes('junit.xml');
  }, null, { timeout: T });
  await page.selectOption('#artifact-type', '');
  await page.fill('#artifact-tag', 'node');
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll('#artifacts tbody tr');
    return rows.length === 1 && rows[0].textContent.includes('kubelet.log');
  }, null, { timeout: T });
  await page.screenshot({ path: path.join(shots, '1-live.png'), fullPage: true });

  // The server dies; the agent keeps reporting through the CLI meanwhile.
  server.kill('SIGKILL');
  await new Promise((r) => server.once('exit', r));
  await page.waitForSelector('#conn[data-state="reconnecting"]', { timeout: T });
  cli('progress', 'task', 'complete', 'upg-1', 'cp', '-m', 'control plane on 1.30');
  cli('progress', 'task', 'fail', 'upg-1', 'ng', '--error', 'PodDisruptionBudget blocked the drain of web-1');
  await page.screenshot({ path: path.join(shots, '2-server-down.png'), fullPage: true });

  // Back up: the page catches up without a reload.
  server = startServer();
  await waitHealthy();
  await page.waitForSelector('#conn[data-state="live"]', { timeout: T });
  await taskIs(page, 'cp', 'completed', '100.0%');
  await taskIs(page, 'ng', 'failed', '33.3%', 'PodDisruptionBudget blocked the drain of web-1');
  // The parent takes its status from its child (hierarchy rules), with the cause.
  await taskIs(page, 'groups', 'failed', '33.3%', 'subtask "ng" failed: PodDisruptionBudget');
  await page.waitForFunction(() => {
    const c = document.querySelector('[data-testid="current-task"]');
    return c && c.textContent.includes('failed: Node group ng-1');
  }, null, { timeout: T });
  await page.waitForFunction(() => document.querySelector('#timeline').textContent.includes('control plane on 1.30'), null, { timeout: T });
  const failedHighlighted = await page.evaluate(() => {
    const e = document.querySelector('.task[data-task-id="ng"] .error');
    return e && getComputedStyle(e).color;
  });
  if (failedHighlighted !== 'rgb(207, 34, 46)') throw new Error('the failure is not highlighted: ' + failedHighlighted);
  if (await page.evaluate(() => window.__eua.loadId) !== loadId) throw new Error('the page reloaded');
  // It caught up through the stream, resuming after the last seq it had (not from scratch).
  const resumed = sockets.slice(1).map((u) => Number(new URL(u).searchParams.get('since')));
  if (sockets.length < 2 || !resumed.every((n) => n > 0)) throw new Error('reconnects without ?since=: ' + sockets.join(' '));
  await page.screenshot({ path: path.join(shots, '3-caught-up.png'), fullPage: true });

  // More artifacts than one search page (1,000): the table follows the cursor to the end.
  const many = await api('POST', `/api/v1/sessions/${session.session_id}/collections`, { name: 'many' });
  const upMany = `/api/v1/sessions/${session.session_id}/collections/${many.collection_id}/artifacts`;
  for (let i = 0; i < 1005; i++) {
    await api('POST', `${upMany}?name=f${i}.log`, `line ${i}\n`, 'application/octet-stream');
  }
  await page.fill('#artifact-tag', '');
  await page.waitForFunction(() => document.querySelectorAll('#artifacts tbody tr').length === 1007, null, { timeout: T });
  if (!(await page.evaluate(() => document.querySelector('#more-artifacts').hidden))) throw new Error('a complete list says there is more');
  // Test results: JUnit reports before and after; the upgrade page shows the comparison, the
  // gate first, then new failures (with their messages) before anything else.
  const junit = (podsFail) => '<testsuite name="smoke">'
    + '<testcase classname="api" name="test_health" time="0.1"/>'
    + '<testcase classname="api" name="test_list_pods" time="0.2">'
    + (podsFail ? '<failure message="GET /pods returned 503 after the upgrade"/>' : '') + '</testcase>'
    + '<testcase classname="api" name="test_dns" time="0.1">' + (podsFail ? '' : '<failure message="timeout"/>') + '</testcase>'
    + '</testsuite>';
  await api('POST', '/api/v1/tests/ingest?upgrade=upg-1&phase=pre&name=pre.xml', junit(false), 'application/xml');
  await api('POST', '/api/v1/tests/ingest?upgrade=upg-1&phase=post&name=post.xml', junit(true), 'application/xml');
  await api('POST', '/api/v1/upgrades/upg-1/tasks/val/update', { percentage: 50, message: 'smoke tests done' });
  await page.waitForFunction(() => {
    const box = document.querySelector('[data-testid="tests-compare"]');
    if (!box || box.hidden) return false;
    const groups = [...box.querySelectorAll('ul.tests')].map((u) => u.dataset.group);
    const nf = box.querySelector('[data-testid="tests-new-failures"]');
    const gate = box.querySelector('[data-testid="tests-gate"]');
    return groups[0] === 'new_failures' && groups.includes('fixed')
      && nf && nf.textContent.includes('test_list_pods') && nf.textContent.includes('GET /pods returned 503 after the upgrade')
      && gate && gate.textContent.startsWith('Gate failed: 1 new failure');
  }, null, { timeout: T });
  await page.screenshot({ path: path.join(shots, '4-tests-compare.png'), fullPage: true });
  if (foreign.length) throw new Error('requests left the server: ' + foreign.join(' '));
  console.log('dashboard ok: live update, artifacts (paged), reconnect catch-up with since, tests compare; screenshots in ' + shots);
} catch (e) {
  failed = true;
  console.error('dashboard test failed:', e);
  if (page) await page.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  if (browser) await browser.close();
  server.kill('SIGKILL');
}
process.exit(failed ? 1 : 0);
