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
import zlib from 'node:zlib';

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

// A small RGB PNG (a red and a green half), for the image preview.
function png(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => { let c = 0xffffffff; for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const c = Buffer.alloc(4); c.writeUInt32BE(crc(td));
    return Buffer.concat([len, td, c]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 2;
  const raw = Buffer.alloc((w * 3 + 1) * h);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const o = y * (w * 3 + 1) + 1 + x * 3;
    raw[o] = x < w / 2 ? 220 : 30; raw[o + 1] = x < w / 2 ? 40 : 160; raw[o + 2] = 60;
  }
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

async function upload(p, body) {
  const r = await fetch(base + p, { method: 'POST', headers: { Authorization: 'Bearer ' + WRITE, 'content-type': 'application/octet-stream' }, body });
  if (!r.ok) throw new Error(`POST ${p}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}

const count = (page, sel) => page.evaluate((sel) => document.querySelectorAll(sel).length, sel);
const texts = (page, sel) => page.evaluate((sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent), sel);
const until = (page, f, arg) => page.waitForFunction(f, arg, { timeout: T });

const cli = (...args) => execFileSync(bin, ['--data-dir', dataDir, ...args], { stdio: ['ignore', 'ignore', 'inherit'] });

function taskIs(page, id, status, percent, extra = null) {
  return page.waitForFunction(([id, status, percent, extra]) => {
    const r = document.querySelector(`.task[data-task-id="${id}"]`);
    return r && r.dataset.status === status && r.querySelector('.pct').textContent === percent
      && (!extra || r.textContent.includes(extra));
  }, [id, status, percent, extra], { timeout: T });
}

// The upgrades list: newest first, failed badge, filters by status and cluster.
async function checkUpgradesList(page) {
  const ids = await page.evaluate(() => [...document.querySelectorAll('[data-testid="upgrade-row"]')].map((r) => r.dataset.upgradeId));
  if (ids.join() !== 'upg-1,upg-0') throw new Error('upgrades not newest first: ' + ids);
  const done = await page.evaluate(() => [...document.querySelectorAll('tr.upgrade[data-upgrade-id="upg-0"] td')].map((td) => td.textContent));
  if (done[6] !== '' || !/^\d+s$/.test(done[5])) throw new Error('a completed upgrade has a duration and no ETA: ' + JSON.stringify(done));
  await page.selectOption('#upgrade-status', 'completed');
  await until(page, () => [...document.querySelectorAll('[data-testid="upgrade-row"]')].map((r) => r.dataset.upgradeId).join() === 'upg-0');
  await page.selectOption('#upgrade-status', '');
  await page.selectOption('#upgrade-cluster', 'prod-eu');
  await until(page, () => [...document.querySelectorAll('[data-testid="upgrade-row"]')].map((r) => r.dataset.upgradeId).join() === 'upg-1');
  await page.selectOption('#upgrade-cluster', '');
  await until(page, () => document.querySelectorAll('[data-testid="upgrade-row"]').length === 2);
}

// The timeline, durations, retry history, groups, status filter and jump to failure.
async function checkTimeline(page) {
  // Red badge with the count of failed tasks (ng and its group) on the in-progress upgrade.
  await until(page, () => {
    const r = document.querySelector('tr.upgrade[data-upgrade-id="upg-1"]');
    const b = r && r.querySelector('[data-testid="failed-badge"]');
    return b && b.textContent === '2 failed' && getComputedStyle(b).backgroundColor === 'rgb(207, 34, 46)'
      && r.dataset.status === 'in_progress';
  });
  if (await count(page, 'tr.upgrade[data-upgrade-id="upg-0"] [data-testid="failed-badge"]')) throw new Error('a failed badge without failures');
  // One bar per started task, placed by start and end, coloured by status, nested rows.
  const bars = await page.evaluate(() => Object.fromEntries([...document.querySelectorAll('[data-testid="timeline"] [data-testid="timeline-bar"]')]
    .map((b) => [b.dataset.taskId, { cls: b.className, left: parseFloat(b.style.left), width: parseFloat(b.style.width), color: getComputedStyle(b).backgroundColor }])));
  for (const id of ['cp', 'ng', 'val']) if (!bars[id]) throw new Error('no timeline bar for ' + id + ': ' + JSON.stringify(bars));
  if (bars.cp.color !== 'rgb(26, 127, 55)' || bars.ng.color !== 'rgb(207, 34, 46)') throw new Error('bar colours: ' + JSON.stringify(bars));
  if (!(bars.cp.left < bars.val.left + 0.001) || !(bars.cp.width > 0)) throw new Error('bars not placed by time: ' + JSON.stringify(bars));
  const level = await page.evaluate(() => document.querySelector('.task[data-task-id="ng"]').getAttribute('aria-level'));
  if (level !== '2') throw new Error('ng is not nested under its group: ' + level);
  // Start, end and duration per task.
  const cpTimes = await page.evaluate(() => document.querySelector('.task[data-task-id="cp"] [data-testid="task-duration"]').textContent);
  if (!/^\d\d:\d\d:\d\d → \d\d:\d\d:\d\d · \d+s$/.test(cpTimes)) throw new Error('cp start/end/duration: ' + cpTimes);
  // The retry history keeps the first attempt's error and time.
  await until(page, () => {
    const h = document.querySelector('.task[data-task-id="val"] [data-testid="retry-history"]');
    return h && /^attempt 1 failed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: smoke test timed out after 300s$/.test(h.textContent);
  });
  // Completed groups start collapsed, failed ones expanded; a toggle opens one.
  const pre = await page.evaluate(() => document.querySelector('.task[data-task-id="pre"]').getAttribute('aria-expanded'));
  if (pre !== 'false' || await count(page, '.task[data-task-id="pre-1"]')) throw new Error('the completed group is not collapsed');
  if (await page.evaluate(() => document.querySelector('.task[data-task-id="groups"]').getAttribute('aria-expanded')) !== 'true') throw new Error('the failed group is collapsed');
  await page.click('.task[data-task-id="pre"] [data-testid="group-toggle"]');
  await until(page, () => !!document.querySelector('.task[data-task-id="pre-1"]'));
  // Status filter: the failed tasks and their groups only.
  await page.selectOption('#task-status', 'failed');
  await until(page, () => [...document.querySelectorAll('.task')].map((t) => t.dataset.taskId).join() === 'groups,ng');
  await page.selectOption('#task-status', '');
  await until(page, () => document.querySelectorAll('.task').length === 6);
  // Jump to failure: the failed leaf gets the focus.
  await page.click('[data-testid="jump-to-failure"]');
  await until(page, () => document.activeElement && document.activeElement.dataset.taskId === 'ng');
  await page.screenshot({ path: path.join(shots, '4-timeline.png'), fullPage: true });
}

// Task rows link to their artifacts; text opens inline with Range (256 KiB, load more, search);
// images preview inline.
async function checkArtifactViewer(page, base) {
  const ranges = [];
  page.on('request', (r) => { if (r.url().includes('/content')) ranges.push(r.headers().range || 'none'); });
  await until(page, () => [...document.querySelectorAll('.task[data-task-id="ng"] [data-testid="artifact-link"]')].map((a) => a.textContent).join() === 'kubelet.log,drain.log');
  await page.click('.task[data-task-id="ng"] [data-testid="artifact-link"]:text("drain.log")');
  await until(page, () => document.querySelector('#viewer').open && /^256\.0 KiB of \d+\.\d KiB loaded$/.test(document.querySelector('#viewer-loaded').textContent));
  if (ranges[ranges.length - 1] !== 'bytes=0-262143') throw new Error('the viewer did not read the head with Range: ' + ranges);
  const head = await page.evaluate(() => document.querySelector('#viewer-text').textContent);
  if (!head.startsWith('2026-11-30T06:00:00Z drain step 0 ok') || head.length !== 262144) throw new Error('head: ' + head.length);
  await page.fill('#viewer-search', 'END-OF-LOG-MARKER');
  await until(page, () => document.querySelector('#viewer-count').textContent.startsWith('no match'));
  await page.click('[data-testid="viewer-more"]');
  await until(page, () => document.querySelector('#viewer-loaded').textContent.startsWith('all ')
    && document.querySelector('#viewer-count').textContent === '1 match'
    && document.querySelector('#viewer-text mark.current').textContent === 'END-OF-LOG-MARKER');
  if (!ranges[ranges.length - 1].startsWith('bytes=262144-')) throw new Error('load more did not read on with Range: ' + ranges);
  await page.fill('#viewer-search', 'drain step 1234 ');
  await until(page, () => document.querySelector('#viewer-count').textContent === '1 match');
  await page.screenshot({ path: path.join(shots, '5-viewer-text.png') });
  await page.keyboard.press('Escape');
  await until(page, () => !document.querySelector('#viewer').open);
  // The image previews inline.
  await page.click('.task[data-task-id="cp"] [data-testid="artifact-link"]');
  await until(page, () => {
    const i = document.querySelector('[data-testid="viewer-image"]');
    return document.querySelector('#viewer').open && !i.hidden && i.complete && i.naturalWidth === 64 && i.naturalHeight === 32;
  });
  await page.screenshot({ path: path.join(shots, '6-viewer-image.png') });
  await page.click('#viewer-close');
  // The download link stays the verified download.
  const dl = await page.evaluate(async () => {
    const r = await fetch(document.querySelector('#viewer-download').href);
    return [r.status, r.headers.get('etag'), (await r.arrayBuffer()).byteLength];
  });
  if (dl[0] !== 200 || !/^"[0-9a-f]{64}"$/.test(dl[1]) || dl[2] < 60) throw new Error('download: ' + dl);
}

// Events: task names, date and time, filters by task and kind.
async function checkEvents(page) {
  const first = await page.evaluate(() => [...document.querySelectorAll('#events li')].map((li) => [...li.children].map((c) => c.textContent)));
  const cp = first.find((e) => e[3].includes('control plane on 1.30'));
  if (!cp || cp[1] !== 'Upgrade control plane' || !/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/.test(cp[0]) || cp[2] !== 'task.completed') {
    throw new Error('event line: ' + JSON.stringify(cp));
  }
  await page.selectOption('#event-kind', 'task.failed');
  await until(page, () => {
    const li = [...document.querySelectorAll('#events li')];
    return li.length >= 3 && li.every((x) => x.dataset.kind === 'task.failed');
  });
  await page.fill('#event-task', 'Validate workloads');
  await until(page, () => {
    const li = [...document.querySelectorAll('#events li')];
    return li.length === 1 && li[0].querySelector('.task-name').textContent === 'Validate workloads'
      && li[0].textContent.includes('smoke test timed out after 300s');
  });
  await page.selectOption('#event-kind', '');
  await until(page, () => {
    const li = [...document.querySelectorAll('#events li')];
    return li.length >= 4 && li.every((x) => x.querySelector('.task-name').textContent === 'Validate workloads')
      && li.some((x) => x.dataset.kind === 'task.retried');
  });
  await page.fill('#event-task', '');
  await until(page, () => new Set([...document.querySelectorAll('#events .task-name')].map((x) => x.textContent)).size > 3);
}

// Keyboard: rows of both lists are reached and used with the keys.
async function checkKeyboard(page) {
  await page.focus('tr.upgrade[data-upgrade-id="upg-1"]');
  await page.keyboard.press('ArrowDown');
  await page.keyboard.press('Enter');
  await until(page, () => document.querySelector('#detail-title').textContent.startsWith('upg-0'));
  await page.focus('tr.upgrade[data-upgrade-id="upg-0"]');
  await page.keyboard.press('ArrowUp');
  await page.keyboard.press(' ');
  await until(page, () => document.querySelector('#detail-title').textContent.startsWith('upg-1') && !!document.querySelector('.task[data-task-id="ng"]'));
  await page.focus('.task[data-task-id="ng"]');
  await page.keyboard.press('ArrowUp');
  await until(page, () => document.activeElement.dataset.taskId === 'groups');
  await page.keyboard.press('ArrowLeft');
  await until(page, () => !document.querySelector('.task[data-task-id="ng"]') && document.activeElement.dataset.taskId === 'groups');
  await page.keyboard.press('ArrowRight');
  await until(page, () => !!document.querySelector('.task[data-task-id="ng"]'));
  await page.keyboard.press('ArrowDown');
  await until(page, () => document.activeElement.dataset.taskId === 'ng');
  // Enter on a task with artifacts opens the first one.
  await page.keyboard.press('Enter');
  await until(page, () => document.querySelector('#viewer').open && document.querySelector('#viewer-title').textContent === 'kubelet.log');
  await page.keyboard.press('Escape');
  // Every control can be reached with Tab.
  const tabbable = await page.evaluate(() => ['#upgrade-status', '#task-status', '#jump-failure', '#event-task', '#event-kind', '#artifact-type']
    .filter((s) => { const e = document.querySelector(s); return !e || e.tabIndex < 0; }));
  if (tabbable.length) throw new Error('not reachable with Tab: ' + tabbable);
}

// Readable at 1024 px (no sideways scrolling) and on a 2560 px screen.
async function checkWidths(page) {
  for (const [w, h] of [[1024, 768], [2560, 1440]]) {
    await page.setViewportSize({ width: w, height: h });
    await sleep(200);
    const over = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    if (over > 0) throw new Error(`${w} px: the page scrolls sideways by ${over} px`);
    const fits = await page.evaluate(() => {
      const r = document.querySelector('.task[data-task-id="ng"] [data-testid="task-duration"]');
      return r.scrollWidth <= r.clientWidth + 1 && document.querySelector('[data-testid="timeline-bar"]').getBoundingClientRect().width > 0;
    });
    if (!fits) throw new Error(`${w} px: the task times are cut or the timeline is empty`);
    await page.screenshot({ path: path.join(shots, `7-width-${w}.png`), fullPage: true });
  }
  await page.setViewportSize({ width: 1280, height: 900 });
}

// An amber badge for stalled tasks, when the summary carries them (stalled_task_names).
async function checkStalledBadge(page) {
  await page.route('**/api/v1/upgrades', async (route) => {
    const r = await route.fetch();
    const list = await r.json();
    for (const s of list) if (s.upgrade_id === 'upg-1') { s.stalled_task_names = ['Node group ng-1']; s.stalled_tasks = 1; }
    await route.fulfill({ response: r, json: list });
  });
  await api('POST', '/api/v1/upgrades/upg-1/phase', { phase: 'node_groups' });
  await until(page, () => {
    const b = document.querySelector('tr.upgrade[data-upgrade-id="upg-1"] [data-testid="stalled-badge"]');
    return b && b.textContent === '1 stalled' && b.title === 'Node group ng-1' && getComputedStyle(b).backgroundColor === 'rgb(191, 135, 0)';
  });
  if (await count(page, 'tr.upgrade[data-upgrade-id="upg-0"] [data-testid="stalled-badge"]')) throw new Error('a stalled badge without stalled tasks');
  await page.unroute('**/api/v1/upgrades');
}

let server = startServer();
let browser;
let page;
let failed = false;
try {
  await waitHealthy();
  // An older upgrade, on another cluster, completed.
  await api('POST', '/api/v1/upgrades', { upgrade_id: 'upg-0', plan_id: 'plan-0', cluster_name: 'staging' });
  await api('POST', '/api/v1/upgrades/upg-0/start', {});
  await api('POST', '/api/v1/upgrades/upg-0/tasks', { task_id: 'x', name: 'Only task', task_type: 'upgrade_step' });
  await api('POST', '/api/v1/upgrades/upg-0/tasks/x/complete', {});
  await api('POST', '/api/v1/upgrades/upg-0/complete', {});
  await sleep(20);
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
  // A log longer than the viewer's first read (256 KiB), with a marker at its end, and an image.
  const bigLog = Array.from({ length: 9000 }, (_, i) => `2026-11-30T06:00:00Z drain step ${i} ok`).join('\n') + '\nEND-OF-LOG-MARKER\n';
  await upload(`${up}?name=drain.log&type=log_file&tag=big&task_id=ng`, bigLog);
  await upload(`${up}?name=screen.png&type=screenshot&tag=shot&task_id=cp`, png(64, 32));

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
  await page.waitForFunction(() => document.querySelector('#events').textContent.includes('upgrading the API server'), null, { timeout: T });
  // The upgrades list shows cluster, phase and an ETA (a rate is known now).
  const cells = await page.evaluate(() => [...document.querySelectorAll('tr.upgrade[data-upgrade-id="upg-1"] td')].map((td) => td.textContent));
  if (cells[1] !== 'prod-eu' || cells[3] !== 'control_plane' || !/^\d+s$|^\d+m \d\ds$/.test(cells[5]) || !/^in \d|^any moment$/.test(cells[6])) {
    throw new Error('upgrade row (duration, relative ETA): ' + JSON.stringify(cells));
  }
  await checkUpgradesList(page);
  // A failure, a retry, and the retried attempt completing: the retry history keeps the failure.
  await api('POST', '/api/v1/upgrades/upg-1/tasks/val/fail', { error_message: 'smoke test timed out after 300s' });
  await api('POST', '/api/v1/upgrades/upg-1/tasks/val/retry', {});
  await api('POST', '/api/v1/upgrades/upg-1/tasks/val/complete', { message: 'smoke tests passed' });
  // A completed group (collapsed by default).
  await api('POST', '/api/v1/upgrades/upg-1/tasks', [
    { task_id: 'pre', name: 'Preflight', task_type: 'validation' },
    { task_id: 'pre-1', name: 'Check add-on versions', task_type: 'validation', parent_task_id: 'pre' },
  ]);
  await api('POST', '/api/v1/upgrades/upg-1/tasks/pre-1/complete', {});
  // Steps show on the task row.
  await api('POST', '/api/v1/upgrades/upg-1/tasks/ng/step', { completed_steps: 1, current_step: 'cordon ip-10-0-1-7' });
  await page.waitForFunction(() => {
    const r = document.querySelector('.task[data-task-id="ng"] .steps');
    return r && r.textContent === '1/3 steps · cordon ip-10-0-1-7';
  }, null, { timeout: T });

  // Artifacts with working download links and filters.
  await page.waitForFunction(() => document.querySelectorAll('#artifacts tbody tr').length === 4, null, { timeout: T });
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
  await page.waitForFunction(() => document.querySelector('#events').textContent.includes('control plane on 1.30'), null, { timeout: T });
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

  await checkTimeline(page);
  await checkArtifactViewer(page, base);
  await checkEvents(page);
  await checkKeyboard(page);
  await checkWidths(page);
  await checkStalledBadge(page);

  // More artifacts than one search page (1,000): the table follows the cursor to the end.
  const many = await api('POST', `/api/v1/sessions/${session.session_id}/collections`, { name: 'many' });
  const upMany = `/api/v1/sessions/${session.session_id}/collections/${many.collection_id}/artifacts`;
  for (let i = 0; i < 1005; i++) {
    await api('POST', `${upMany}?name=f${i}.log`, `line ${i}\n`, 'application/octet-stream');
  }
  await page.fill('#artifact-tag', '');
  await page.waitForFunction(() => document.querySelectorAll('#artifacts tbody tr').length === 1009, null, { timeout: T });
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
  // Any event refreshes the page (the validation task ended earlier in this script: add one).
  await api('POST', '/api/v1/upgrades/upg-1/tasks', { task_id: 'smoke', name: 'Smoke tests', task_type: 'validation' });
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
  await page.screenshot({ path: path.join(shots, '8-tests-compare.png'), fullPage: true });
  if (foreign.length) throw new Error('requests left the server: ' + foreign.join(' '));
  console.log('dashboard ok: live update, list badges and filters, timeline, retry history, groups, jump to failure, '
    + 'artifact viewer (Range, load more, search, image), events, keyboard, 1024/2560 px, artifacts (paged), reconnect catch-up with since, tests compare; screenshots in ' + shots);
} catch (e) {
  failed = true;
  console.error('dashboard test failed:', e);
  if (page) await page.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  if (browser) await browser.close();
  server.kill('SIGKILL');
}
process.exit(failed ? 1 : 0);
