// The dashboard: a live list of upgrades and, for the selected one, its tasks as a tree with a
// timeline, their retry history and artifacts, an artifact viewer, and the events. One
// WebSocket (/api/v1/ws) keeps it live; after a drop it reconnects with ?since=<last seq> and the
// server replays what was missed, so the page catches up without a reload. No framework, no
// CDN: this file is embedded in the server binary. Each part of the page has its own section of
// functions below (upgrades list, task tree and timeline, artifacts and viewer, events, stream).
'use strict';
(() => {
  const ARTIFACT_TYPES = ['log_file', 'test_result', 'configuration', 'screenshot', 'metrics_data', 'backup', 'report', 'diagnostic'];
  const STATUSES = ['failed', 'in_progress', 'paused', 'not_started', 'completed', 'cancelled'];
  const EVENT_KINDS = ['upgrade.created', 'upgrade.started', 'upgrade.phase_changed', 'upgrade.completed', 'upgrade.failed',
    'task.added', 'task.started', 'task.progress', 'task.step', 'task.completed', 'task.failed', 'task.paused',
    'task.resumed', 'task.cancelled', 'task.retried'];
  const EVENTS_MAX = 300;
  // Listings follow X-Next-Cursor up to these, then say how many they show.
  const UPGRADES_MAX = 10000;
  const ARTIFACTS_MAX = 5000;
  const TASKS_MAX = 50000;
  // The artifact viewer reads text this many bytes at a time, with Range.
  const VIEW_CHUNK = 256 * 1024;
  // Task rows: one line of LINE px, plus SUB px per error, retry or artifacts line (app.css).
  const LINE = 27;
  const SUB = 20;
  const OVERSCAN = 600;
  const $ = (s) => document.querySelector(s);
  const state = {
    token: null,
    upgrades: new Map(),
    selected: null,
    lastSeq: 0,
    ws: null,
    retry: 0,
    timers: {},
    loadId: Math.random().toString(36).slice(2),
    // The selected upgrade's tasks.
    upgrade: null,
    tasks: [],
    byId: new Map(),
    children: new Map(),
    collapsed: new Map(),
    rows: [],
    span: null,
    activeTask: null,
    retries: new Map(),
    artifactsByTask: new Map(),
    // Events of the selected upgrade (newest EVENTS_MAX), or of one task when filtered.
    events: new Map(),
    taskEvents: null,
    viewer: null,
    // The last render of the task tree: { tasks, rows, ms }.
    lastRender: null,
  };
  // Tests check that a reconnect did not reload the page, and read render times.
  window.__eua = state;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else if (k === 'testid') e.dataset.testid = v;
      else if (k === 'style') e.style.cssText = v;
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children) if (c !== null && c !== undefined && c !== '') e.append(c instanceof Node ? c : String(c));
    return e;
  }

  // --- the API ---------------------------------------------------------------------------

  function initToken() {
    const u = new URL(location.href);
    const t = u.searchParams.get('token');
    if (t) {
      sessionStorage.setItem('eua-token', t);
      u.searchParams.delete('token');
      history.replaceState(null, '', u.pathname + u.search + u.hash);
    }
    state.token = sessionStorage.getItem('eua-token');
  }

  function withToken(path) {
    if (!state.token) return path;
    return path + (path.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(state.token);
  }

  async function get(path, extraHeaders) {
    const headers = { ...(state.token ? { Authorization: 'Bearer ' + state.token } : {}), ...(extraHeaders || {}) };
    const r = await fetch(path, { headers, cache: 'no-store' });
    if (r.status === 401) {
      showLogin(state.token ? 'The token was refused.' : 'This server needs a token.');
      throw new Error('unauthorized');
    }
    if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
    return r;
  }

  async function api(path) {
    return (await get(path)).json();
  }

  // Follows X-Next-Cursor until the end or `max` items; says whether more were left.
  async function pages(path, max, first) {
    const items = [];
    let cursor = first || null;
    for (;;) {
      const sep = path.includes('?') ? '&' : '?';
      const r = await get(path + (cursor ? sep + 'cursor=' + encodeURIComponent(cursor) : ''));
      items.push(...await r.json());
      cursor = r.headers.get('x-next-cursor');
      if (!cursor) return { items, more: false };
      if (items.length >= max) return { items, more: true };
    }
  }

  const upgradePath = (id) => '/api/v1/upgrades/' + encodeURIComponent(id);
  const contentPath = (a) => '/api/v1/artifacts/' + encodeURIComponent(a.artifact_id) + '/content';

  function setConn(s, text) {
    const c = $('#conn');
    c.className = 'conn ' + s;
    c.dataset.state = s;
    c.textContent = text || s;
  }

  function showLogin(message) {
    setConn('unauthorized', 'token needed');
    $('#login').hidden = false;
    $('#login-error').textContent = message;
  }

  function later(name, ms, f) {
    if (state.timers[name]) return;
    state.timers[name] = setTimeout(() => {
      state.timers[name] = null;
      f().catch((e) => console.warn(name, e));
    }, ms);
  }

  // --- formatting ------------------------------------------------------------------------

  const pct = (v) => (Math.round((v || 0) * 10) / 10).toFixed(1) + '%';
  const human = (s) => s.replace('_', ' ');
  const statusBadge = (s) => el('span', { class: 'status ' + s, dataset: { status: s } }, human(s));
  function bar(v, status) {
    const b = el('span', { class: 'bar ' + status }, el('span'));
    b.firstChild.style.width = Math.max(0, Math.min(100, v || 0)) + '%';
    return b;
  }
  const pad = (n) => String(n).padStart(2, '0');
  function clock(d) {
    d = new Date(d);
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function dateTime(d) {
    d = new Date(d);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + clock(d);
  }
  function duration(sec) {
    if (sec === null || sec === undefined || !isFinite(sec)) return '';
    let s = Math.max(0, Math.round(sec));
    if (s < 60) return s + 's';
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 60) return m + 'm ' + pad(s) + 's';
    const h = Math.floor(m / 60);
    m %= 60;
    return h + 'h ' + pad(m) + 'm';
  }
  const ENDED = new Set(['completed', 'failed', 'cancelled']);
  // The ETA as a duration from now; none for ended upgrades.
  function eta(s) {
    if (ENDED.has(s.status) || !s.estimated_completion) return '';
    const sec = (new Date(s.estimated_completion) - Date.now()) / 1000;
    if (sec <= 0) return 'any moment';
    return 'in ' + duration(sec < 60 ? sec : Math.round(sec / 60) * 60).replace(/ 00s$/, '');
  }
  function size(n) {
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + ' ' + u[i];
  }

  // --- upgrades list ---------------------------------------------------------------------

  function upgradeBadges(s) {
    const out = [];
    if (s.failed_tasks > 0) {
      out.push(el('span', { class: 'badge failed', testid: 'failed-badge', title: (s.failed_task_names || []).join(', ') },
        s.failed_tasks + ' failed'));
    }
    // Stalled tasks (the summary's stalled_task_names / stalled_tasks, when the server has them).
    const stalledNames = Array.isArray(s.stalled_task_names) ? s.stalled_task_names : [];
    const stalled = typeof s.stalled_tasks === 'number' ? s.stalled_tasks : stalledNames.length;
    if (stalled > 0) {
      out.push(el('span', { class: 'badge stalled', testid: 'stalled-badge', title: stalledNames.join(', ') }, stalled + ' stalled'));
    }
    return out;
  }

  function upgradeFilterOptions(list) {
    const sel = $('#upgrade-cluster');
    const clusters = [...new Set(list.map((s) => s.cluster_name))].sort();
    const have = [...sel.options].slice(1).map((o) => o.value);
    if (have.join('\n') !== clusters.join('\n')) {
      const keep = sel.value;
      sel.replaceChildren(el('option', { value: '' }, 'all'), ...clusters.map((c) => el('option', { value: c }, c)));
      sel.value = clusters.includes(keep) ? keep : '';
    }
  }

  function renderUpgrades() {
    const body = $('#upgrades tbody');
    const all = [...state.upgrades.values()].sort((a, b) =>
      String(b.created_at || b.started_at || '').localeCompare(String(a.created_at || a.started_at || ''))
      || String(b.upgrade_id).localeCompare(String(a.upgrade_id)));
    upgradeFilterOptions(all);
    const status = $('#upgrade-status').value;
    const cluster = $('#upgrade-cluster').value;
    const list = all.filter((s) => (!status || s.status === status) && (!cluster || s.cluster_name === cluster));
    const focused = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.upgradeId;
    body.replaceChildren();
    $('#no-upgrades').hidden = list.length > 0;
    $('#no-upgrades').textContent = all.length ? 'No upgrade matches the filters.' : 'No upgrades yet.';
    for (const s of list) {
      const tr = el('tr', { class: 'upgrade' + (s.upgrade_id === state.selected ? ' selected' : ''), testid: 'upgrade-row', tabindex: 0,
        'aria-selected': s.upgrade_id === state.selected ? 'true' : 'false', dataset: { upgradeId: s.upgrade_id, status: s.status } },
        el('td', {}, s.upgrade_id),
        el('td', {}, s.cluster_name),
        el('td', {}, statusBadge(s.status), ...upgradeBadges(s)),
        el('td', {}, s.current_phase || ''),
        el('td', {}, bar(s.overall_percentage, s.status), ' ', el('span', { class: 'pct' }, pct(s.overall_percentage))),
        el('td', { class: 'num', testid: 'upgrade-duration' }, duration(s.duration)),
        el('td', { class: 'num', testid: 'upgrade-eta' }, eta(s)));
      tr.addEventListener('click', () => select(s.upgrade_id));
      tr.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); select(s.upgrade_id); }
        else if (ev.key === 'ArrowDown' && tr.nextElementSibling) { ev.preventDefault(); tr.nextElementSibling.focus(); }
        else if (ev.key === 'ArrowUp' && tr.previousElementSibling) { ev.preventDefault(); tr.previousElementSibling.focus(); }
      });
      body.append(tr);
      if (focused === s.upgrade_id) tr.focus();
    }
    if (!state.selected && list.length) select(list[0].upgrade_id);
  }

  function setUpgrades(list) {
    state.upgrades = new Map(list.map((s) => [s.upgrade_id, s]));
    renderUpgrades();
  }

  async function refreshUpgrades() {
    const { items, more } = await pages('/api/v1/upgrades', UPGRADES_MAX);
    setUpgrades(items);
    const note = $('#more-upgrades');
    note.hidden = !more;
    note.textContent = more ? 'Showing the first ' + items.length + ' upgrades; the CLI lists them all.' : '';
  }

  // --- one upgrade -----------------------------------------------------------------------

  function select(id) {
    if (state.selected !== id) {
      state.selected = id;
      state.upgrade = null;
      state.tasks = [];
      state.collapsed = new Map();
      state.retries = new Map();
      state.artifactsByTask = new Map();
      state.events = new Map();
      state.taskEvents = null;
      state.activeTask = null;
      $('#event-task').value = '';
      $('#events').replaceChildren();
      $('#tasks').scrollTop = 0;
      history.replaceState(null, '', '#u=' + encodeURIComponent(id));
    }
    renderUpgrades();
    loadDetail().catch((e) => console.warn(e));
    loadEvents().catch((e) => console.warn(e));
    loadArtifacts().catch((e) => console.warn(e));
    loadTestsCompare().catch((e) => console.warn(e));
  }

  async function loadDetail() {
    const id = state.selected;
    if (!id) return;
    const r = await get(upgradePath(id));
    const u = await r.json();
    if (id !== state.selected) return;
    let tasks = u.tasks || [];
    let more = false;
    if (u.tasks_next_cursor) {
      const rest = await pages(upgradePath(id) + '/tasks', TASKS_MAX - tasks.length, u.tasks_next_cursor);
      if (id !== state.selected) return;
      tasks = tasks.concat(rest.items);
      more = rest.more;
    }
    state.upgrade = u;
    renderSummary(u);
    state.upgrades.set(u.upgrade_id, { ...state.upgrades.get(u.upgrade_id), ...u, tasks: undefined });
    setTasks(tasks);
    const note = $('#more-tasks');
    note.hidden = !more;
    note.textContent = more ? 'Showing the first ' + tasks.length + ' of ' + u.total_tasks + ' tasks; the CLI shows them all.' : '';
  }

  function renderSummary(u) {
    $('#detail').hidden = false;
    $('#detail-title').textContent = u.upgrade_id + ' on ' + u.cluster_name;
    $('#detail-summary').replaceChildren(
      statusBadge(u.status), ...upgradeBadges(u), ' ', pct(u.overall_percentage), ' overall · ',
      (u.current_phase ? 'phase ' + u.current_phase + ' · ' : ''),
      u.completed_tasks + '/' + u.total_tasks + ' tasks done',
      (u.started_at ? ' · started ' + dateTime(u.started_at) : ''),
      (u.duration !== null && u.duration !== undefined ? ' · ' + duration(u.duration) : ''),
      (eta(u) ? ' · ETA ' + eta(u) : ''),
      (u.current_task
        ? el('span', { 'data-testid': 'current-task' }, ' · ' + (u.current_task.status === 'failed' ? 'failed: ' : 'now: ')
          + u.current_task.task_name + ' ' + pct(u.current_task.percentage))
        : ''));
    const err = $('#detail-error');
    err.hidden = !u.error_message;
    err.textContent = u.error_message || '';
  }

  // --- task tree and timeline --------------------------------------------------------------
  // Rows have computed heights (LINE + SUB per extra line) and absolute positions; only the rows
  // in view (plus OVERSCAN px) are in the DOM, so 10,000 tasks scroll like 10.

  function setTasks(tasks) {
    state.tasks = tasks;
    state.byId = new Map(tasks.map((t) => [t.task_id, t]));
    state.children = new Map();
    for (const t of tasks) {
      const p = t.parent_task_id && state.byId.has(t.parent_task_id) ? t.parent_task_id : '';
      if (!state.children.has(p)) state.children.set(p, []);
      state.children.get(p).push(t);
    }
    // A group that was never started itself spans its subtasks' times.
    const walkTimes = (t) => {
      const kids = state.children.get(t.task_id) || [];
      let s = t.started_at ? Date.parse(t.started_at) : Infinity;
      let e = t.completed_at ? Date.parse(t.completed_at) : -Infinity;
      for (const k of kids) {
        const [ks, ke] = walkTimes(k);
        if (!t.started_at && ks < s) s = ks;
        if (!t.completed_at && ENDED.has(t.status) && ke > e) e = ke;
      }
      if (!t.started_at && isFinite(s)) t.started_at = new Date(s).toISOString();
      if (!t.completed_at && ENDED.has(t.status) && isFinite(e)) t.completed_at = new Date(e).toISOString();
      if (t.completed_at && t.started_at && (t.duration === null || t.duration === undefined)) {
        t.duration = (Date.parse(t.completed_at) - Date.parse(t.started_at)) / 1000;
      }
      return [s, e];
    };
    for (const t of state.children.get('') || []) walkTimes(t);
    const names = $('#task-names');
    if (names.childElementCount !== Math.min(tasks.length, 2000)) {
      names.replaceChildren(...tasks.slice(0, 2000).map((t) => el('option', { value: t.task_name || t.name })));
    }
    $('#jump-failure').disabled = !tasks.some((t) => t.status === 'failed');
    layoutTasks();
    // Events name their tasks.
    renderEvents();
  }

  function hasChildren(t) {
    return state.children.has(t.task_id);
  }

  // Groups start expanded, except completed ones; the user's toggles win.
  function isOpen(t) {
    if (!hasChildren(t)) return false;
    if (state.filtering) return true;
    const c = state.collapsed.get(t.task_id);
    return c === undefined ? t.status !== 'completed' : !c;
  }

  function retryLines(t) {
    if (!(t.retry_count > 0)) return 0;
    const r = state.retries.get(t.task_id);
    return r && r.items ? Math.max(1, r.items.length) : 1;
  }

  function extraLines(t) {
    return (t.error_message ? 1 : 0) + retryLines(t) + (state.artifactsByTask.has(t.task_id) ? 1 : 0);
  }

  function timeSpan() {
    const u = state.upgrade || {};
    let t0 = u.started_at ? Date.parse(u.started_at) : Infinity;
    let t1 = u.completed_at ? Date.parse(u.completed_at) : -Infinity;
    let running = !ENDED.has(u.status) && u.status !== 'not_started';
    for (const t of state.tasks) {
      if (!t.started_at) continue;
      const s = Date.parse(t.started_at);
      if (s < t0) t0 = s;
      const e = t.completed_at ? Date.parse(t.completed_at) : s;
      if (e > t1) t1 = e;
      if (!t.completed_at && t.status === 'in_progress') running = true;
    }
    if (!isFinite(t0)) return null;
    if (running) t1 = Math.max(t1, Date.now());
    if (!(t1 > t0)) t1 = t0 + 1000;
    return { t0, t1 };
  }

  function layoutTasks() {
    const started = performance.now();
    const f = $('#task-status').value;
    state.filtering = !!f;
    let include = null;
    if (f) {
      include = new Set();
      for (const t of state.tasks) {
        if (t.status !== f) continue;
        for (let x = t; x && !include.has(x.task_id); x = state.byId.get(x.parent_task_id)) include.add(x.task_id);
      }
    }
    const rows = [];
    let top = 0;
    const walk = (parent, depth) => {
      for (const t of state.children.get(parent) || []) {
        if (include && !include.has(t.task_id)) continue;
        const h = LINE + SUB * extraLines(t);
        rows.push({ t, depth, top, h });
        top += h;
        if (isOpen(t)) walk(t.task_id, depth + 1);
      }
    };
    walk('', 0);
    state.rows = rows;
    state.rowIndex = new Map(rows.map((r, i) => [r.t.task_id, i]));
    state.span = timeSpan();
    $('#tasks-inner').style.height = top + 'px';
    $('#tasks').style.height = Math.min(top, Math.max(320, Math.round(window.innerHeight * 0.7))) + 2 + 'px';
    $('#task-count').textContent = (include ? rows.length + ' shown of ' : '') + state.tasks.length + ' tasks';
    const span = state.span;
    $('#axis-start').textContent = span ? clock(span.t0) : '';
    $('#axis-end').textContent = span ? clock(span.t1) : '';
    renderWindow();
    state.lastRender = { tasks: state.tasks.length, rows: rows.length, ms: performance.now() - started };
  }

  // The rows in view, re-rendered on scroll and on every change.
  function renderWindow() {
    const box = $('#tasks');
    const inner = $('#tasks-inner');
    const rows = state.rows;
    const viewTop = box.scrollTop - OVERSCAN;
    const viewBottom = box.scrollTop + (box.clientHeight || 900) + OVERSCAN;
    let lo = 0;
    let hi = rows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (rows[mid].top + rows[mid].h <= viewTop) lo = mid + 1; else hi = mid;
    }
    const focusedId = document.activeElement && document.activeElement.closest && document.activeElement.closest('.task')
      ? document.activeElement.closest('.task').dataset.taskId : null;
    const nodes = [];
    const need = [];
    for (let i = lo; i < rows.length && rows[i].top < viewBottom; i++) {
      nodes.push(taskRow(rows[i]));
      const t = rows[i].t;
      if (t.retry_count > 0) need.push(t);
    }
    inner.replaceChildren(...nodes);
    if (focusedId) {
      const n = inner.querySelector(`.task[data-task-id="${CSS.escape(focusedId)}"]`);
      if (n) n.focus({ preventScroll: true });
    }
    for (const t of need) loadRetries(t);
  }

  function taskTimes(t) {
    if (!t.started_at) return '';
    const end = t.completed_at ? Date.parse(t.completed_at) : null;
    const sec = t.duration !== null && t.duration !== undefined ? t.duration
      : (t.status === 'in_progress' ? (Date.now() - Date.parse(t.started_at)) / 1000 : null);
    return clock(t.started_at) + ' → ' + (end ? clock(end) : t.status === 'in_progress' ? 'now' : '…')
      + (sec !== null ? ' · ' + duration(sec) : '');
  }

  function timelineBar(t) {
    const span = state.span;
    if (!span || !t.started_at) return null;
    const s = Date.parse(t.started_at);
    const e = t.completed_at ? Date.parse(t.completed_at) : (t.status === 'in_progress' ? Math.max(Date.now(), s) : s);
    const w = span.t1 - span.t0;
    const left = Math.max(0, Math.min(100, (s - span.t0) / w * 100));
    const width = Math.max(0, Math.min(100 - left, (e - s) / w * 100));
    return el('span', { class: 'tbar ' + t.status, testid: 'timeline-bar', dataset: { taskId: t.task_id },
      style: 'left:' + left.toFixed(3) + '%;width:' + width.toFixed(3) + '%',
      title: (t.task_name || t.name) + ': ' + dateTime(s) + (t.completed_at ? ' → ' + dateTime(e) : '') });
  }

  function taskRow(r) {
    const t = r.t;
    const open = isOpen(t);
    const steps = t.total_steps ? t.completed_steps + '/' + t.total_steps + ' steps' + (t.current_step ? ' · ' + t.current_step : '') : (t.current_step || '');
    const toggle = hasChildren(t)
      ? el('button', { type: 'button', class: 'toggle', tabindex: -1, testid: 'group-toggle', 'aria-label': (open ? 'collapse ' : 'expand ') + t.task_name }, open ? '▾' : '▸')
      : el('span', { class: 'toggle-spacer' });
    if (hasChildren(t)) toggle.addEventListener('click', (ev) => { ev.stopPropagation(); toggleTask(t, !open); });
    const name = el('span', { class: 'namecell', style: 'padding-left:' + (r.depth * 1.1) + 'rem' },
      toggle, el('span', { class: 'name', title: t.task_name + ' (' + t.task_id + ')' }, t.task_name || t.name), el('span', { class: 'steps' }, steps));
    const row = el('div', {
      class: 'task ' + t.status + (state.flash === t.task_id ? ' flash' : ''), role: 'treeitem', 'aria-level': r.depth + 1,
      'aria-expanded': hasChildren(t) ? String(open) : null, tabindex: (state.activeTask || (state.rows[0] && state.rows[0].t.task_id)) === t.task_id ? 0 : -1,
      dataset: { taskId: t.task_id, status: t.status }, style: 'top:' + r.top + 'px;height:' + r.h + 'px',
    },
    el('div', { class: 'line' }, name, el('span', {}, statusBadge(t.status)),
      el('span', {}, bar(t.percentage, t.status), ' ', el('span', { class: 'pct' }, pct(t.percentage))),
      el('span', { class: 'times', testid: 'task-duration', title: t.started_at ? 'started ' + dateTime(t.started_at) + (t.completed_at ? ', ended ' + dateTime(t.completed_at) : '') : 'not started' }, taskTimes(t)),
      el('span', { class: 'lane' }, timelineBar(t))));
    if (t.error_message) row.append(el('div', { class: 'sub error', title: t.error_message }, t.error_message));
    if (t.retry_count > 0) row.append(retryHistory(t));
    const arts = state.artifactsByTask.get(t.task_id);
    if (arts) {
      const line = el('div', { class: 'sub artifacts' }, el('span', { class: 'muted' }, 'artifacts: '));
      for (const a of arts.slice(0, 4)) line.append(artifactLink(a, 'artifact-link'));
      if (arts.length > 4) line.append(el('span', { class: 'muted' }, '+' + (arts.length - 4) + ' more in the table below'));
      row.append(line);
    }
    row.addEventListener('focus', () => { state.activeTask = t.task_id; });
    row.addEventListener('click', () => { state.activeTask = t.task_id; });
    return row;
  }

  function retryHistory(t) {
    const r = state.retries.get(t.task_id);
    const box = el('div', { class: 'retry-history', testid: 'retry-history' });
    if (!r || !r.items) {
      box.append(el('div', { class: 'sub' }, 'retried ' + t.retry_count + '×; loading the failed attempts…'));
      return box;
    }
    if (!r.items.length) box.append(el('div', { class: 'sub' }, 'retried ' + t.retry_count + '× (no failed attempt recorded)'));
    for (const a of r.items) {
      const text = 'attempt ' + a.attempt + ' failed ' + dateTime(a.timestamp) + ': ' + (a.message || '');
      box.append(el('div', { class: 'sub retry', title: text }, text));
    }
    return box;
  }

  // The failed attempts of a retried task, from its events (newest first on the wire).
  function loadRetries(t) {
    const key = t.retry_count + ':' + t.status + ':' + (t.completed_at || '');
    const have = state.retries.get(t.task_id);
    if (have && have.key === key) return;
    state.retries.set(t.task_id, { key, items: have && have.items });
    const id = state.selected;
    api(upgradePath(id) + '/tasks/' + encodeURIComponent(t.task_id) + '/events?kind=task.failed,task.retried&limit=1000')
      .then((events) => {
        if (id !== state.selected) return;
        const items = [];
        let attempt = 1;
        for (const e of events.slice().reverse()) {
          if (e.kind === 'task.retried') attempt++;
          else items.push({ attempt, timestamp: e.timestamp, message: e.message });
        }
        const cur = state.retries.get(t.task_id);
        if (!cur || cur.key !== key) return;
        const changed = !cur.items || cur.items.length !== items.length;
        cur.items = items;
        if (changed) layoutTasks(); else renderWindow();
      })
      .catch((e) => { console.warn(e); state.retries.delete(t.task_id); });
  }

  function toggleTask(t, open) {
    state.collapsed.set(t.task_id, !open);
    state.activeTask = t.task_id;
    layoutTasks();
    focusTask(t.task_id);
  }

  function scrollToTask(id) {
    const i = state.rowIndex.get(id);
    if (i === undefined) return;
    const box = $('#tasks');
    const r = state.rows[i];
    if (r.top < box.scrollTop || r.top + r.h > box.scrollTop + box.clientHeight) {
      box.scrollTop = Math.max(0, r.top - box.clientHeight / 3);
    }
    renderWindow();
  }

  function focusTask(id) {
    state.activeTask = id;
    scrollToTask(id);
    const n = $('#tasks-inner').querySelector(`.task[data-task-id="${CSS.escape(id)}"]`);
    if (n) {
      for (const o of $('#tasks-inner').querySelectorAll('.task[tabindex="0"]')) o.tabIndex = -1;
      n.tabIndex = 0;
      n.focus({ preventScroll: true });
    }
  }

  // The deepest failed task first (the cause), its groups expanded.
  function jumpToFailure() {
    const failed = state.tasks.filter((t) => t.status === 'failed');
    if (!failed.length) return;
    const leaf = failed.find((t) => !hasChildren(t) || !state.children.get(t.task_id).some((c) => c.status === 'failed')) || failed[0];
    for (let p = state.byId.get(leaf.parent_task_id); p; p = state.byId.get(p.parent_task_id)) state.collapsed.set(p.task_id, false);
    if ($('#task-status').value && $('#task-status').value !== 'failed') $('#task-status').value = '';
    state.flash = leaf.task_id;
    setTimeout(() => { if (state.flash === leaf.task_id) state.flash = null; }, 1500);
    layoutTasks();
    $('#timeline').scrollIntoView({ block: 'start' });
    focusTask(leaf.task_id);
  }

  function onTaskKey(ev) {
    const row = ev.target.closest && ev.target.closest('.task');
    if (!row) return;
    const i = state.rowIndex.get(row.dataset.taskId);
    if (i === undefined) return;
    const t = state.rows[i].t;
    const go = (j) => { ev.preventDefault(); if (state.rows[j]) focusTask(state.rows[j].t.task_id); };
    switch (ev.key) {
      case 'ArrowDown': go(i + 1); break;
      case 'ArrowUp': go(i - 1); break;
      case 'Home': go(0); break;
      case 'End': go(state.rows.length - 1); break;
      case 'PageDown': go(Math.min(state.rows.length - 1, i + 15)); break;
      case 'PageUp': go(Math.max(0, i - 15)); break;
      case 'ArrowRight':
        ev.preventDefault();
        if (hasChildren(t) && !isOpen(t)) toggleTask(t, true); else go(i + 1);
        break;
      case 'ArrowLeft':
        ev.preventDefault();
        if (hasChildren(t) && isOpen(t)) toggleTask(t, false);
        else if (state.byId.has(t.parent_task_id)) focusTask(t.parent_task_id);
        break;
      case 'Enter':
      case ' ':
        ev.preventDefault();
        if (hasChildren(t)) toggleTask(t, !isOpen(t));
        else { const a = state.artifactsByTask.get(t.task_id); if (a) openViewer(a[0]); }
        break;
      default: break;
    }
  }

  function setAll(open) {
    for (const t of state.tasks) if (hasChildren(t)) state.collapsed.set(t.task_id, !open);
    layoutTasks();
  }

  // --- artifacts and the viewer ----------------------------------------------------------

  const TEXT = /\.(log|txt|xml|json|ya?ml|toml|csv|md|out|err|conf|cfg|ini|html?)$/i;
  const IMAGE = /\.(png|jpe?g|svg)$/i;
  const kindOf = (a) => (IMAGE.test(a.name) ? 'image'
    : TEXT.test(a.name) || ['log_file', 'test_result', 'configuration', 'report', 'diagnostic'].includes(a.artifact_type) ? 'text' : null);

  function artifactLink(a, testid) {
    const link = el('a', { href: withToken(contentPath(a)), download: a.export_name, testid, dataset: { artifactId: a.artifact_id } }, a.name);
    if (kindOf(a)) {
      link.addEventListener('click', (ev) => {
        if (ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
        ev.preventDefault();
        openViewer(a);
      });
      link.title = 'open ' + a.name + ' here (ctrl-click downloads)';
    }
    return link;
  }

  // The artifacts of the upgrade's sessions, with the table's filters.
  async function fetchArtifacts(sessions, type, tag) {
    const rows = [];
    let more = false;
    for (const s of sessions) {
      let q = '/api/v1/artifacts?limit=1000&session=' + encodeURIComponent(s.session_id);
      if (type) q += '&type=' + encodeURIComponent(type);
      if (tag) q += '&tag=' + encodeURIComponent(tag);
      const page = await pages(q, ARTIFACTS_MAX - rows.length);
      rows.push(...page.items);
      more = more || page.more;
      if (rows.length >= ARTIFACTS_MAX) break;
    }
    return { rows, more };
  }

  async function loadArtifacts() {
    const id = state.selected;
    const type = $('#artifact-type').value;
    const tag = $('#artifact-tag').value.trim();
    const sessions = await api('/api/v1/sessions?upgrade_id=' + encodeURIComponent(id));
    const { rows, more } = await fetchArtifacts(sessions, type, tag);
    // Task rows link to every artifact of their task, not only those the filters show.
    const all = type || tag ? (await fetchArtifacts(sessions, '', '')).rows : rows;
    if (id !== state.selected) return;
    const note = $('#more-artifacts');
    note.hidden = !more;
    note.textContent = more
      ? 'Showing ' + rows.length + ' artifacts; more match: narrow the filters, or search with the CLI (artifacts search --all).'
      : '';
    const live = rows.filter((a) => a.status !== 'deleted');
    const body = $('#artifacts tbody');
    body.replaceChildren();
    for (const a of live) {
      const task = a.task_id ? state.byId.get(a.task_id) : null;
      const view = kindOf(a) ? el('button', { type: 'button', class: 'link', testid: 'artifact-view' }, 'view') : null;
      if (view) view.addEventListener('click', () => openViewer(a));
      body.append(el('tr', { dataset: { artifactId: a.artifact_id } },
        el('td', {}, el('a', { href: withToken(contentPath(a)), download: a.export_name }, a.name)),
        el('td', {}, a.artifact_type),
        el('td', {}, (a.tags || []).join(', ')),
        el('td', { class: 'num' }, size(a.file_size)),
        el('td', { title: a.task_id || '' }, task ? task.task_name || task.name : a.task_id || ''),
        el('td', {}, view)));
    }
    $('#no-artifacts').hidden = rows.length > 0;
    {
      const byTask = new Map();
      for (const a of all.filter((x) => x.status !== 'deleted')) {
        if (!a.task_id) continue;
        if (!byTask.has(a.task_id)) byTask.set(a.task_id, []);
        byTask.get(a.task_id).push(a);
      }
      for (const list of byTask.values()) list.sort((x, y) => String(x.created_at).localeCompare(String(y.created_at)));
      const same = byTask.size === state.artifactsByTask.size
        && [...byTask].every(([k, v]) => (state.artifactsByTask.get(k) || []).map((a) => a.artifact_id).join() === v.map((a) => a.artifact_id).join());
      state.artifactsByTask = byTask;
      if (!same) layoutTasks();
    }
  }

  function openViewer(a) {
    const kind = kindOf(a);
    const v = { a, kind, loaded: 0, text: '', decoder: new TextDecoder('utf-8'), match: -1, busy: false };
    state.viewer = v;
    const d = $('#viewer');
    $('#viewer-title').textContent = a.name;
    $('#viewer-meta').textContent = a.artifact_type + ' · ' + size(a.file_size);
    const dl = $('#viewer-download');
    dl.href = withToken(contentPath(a));
    dl.setAttribute('download', a.export_name || a.name);
    $('#viewer-error').hidden = true;
    $('#viewer-search').value = '';
    $('#viewer-count').textContent = '';
    $('#viewer-tools').hidden = kind !== 'text';
    $('#viewer-text').hidden = kind !== 'text';
    $('#viewer-text').replaceChildren();
    const img = $('#viewer-image');
    img.hidden = kind !== 'image';
    img.removeAttribute('src');
    if (kind === 'image') {
      img.alt = a.name;
      img.src = withToken(contentPath(a));
    }
    if (!d.open) d.showModal();
    if (kind === 'text') viewerMore().catch((e) => viewerError(e));
  }

  function viewerError(e) {
    const p = $('#viewer-error');
    p.hidden = false;
    p.textContent = 'Could not read the artifact (' + e.message + '); the server checks each read against its digest.';
  }

  // The next VIEW_CHUNK bytes, with Range.
  async function viewerMore() {
    const v = state.viewer;
    if (!v || v.busy) return;
    const total = v.a.file_size;
    if (v.loaded < total) {
      v.busy = true;
      try {
        const end = Math.min(total, v.loaded + VIEW_CHUNK) - 1;
        const r = await get(contentPath(v.a), { Range: 'bytes=' + v.loaded + '-' + end });
        const buf = await r.arrayBuffer();
        if (state.viewer !== v) return;
        if (r.status === 206) v.loaded += buf.byteLength;
        else { v.loaded = buf.byteLength; v.text = ''; v.decoder = new TextDecoder('utf-8'); }
        v.text += v.decoder.decode(buf, { stream: v.loaded < total });
      } finally {
        v.busy = false;
      }
    }
    $('#viewer-loaded').textContent = v.loaded >= total ? 'all ' + size(total) + ' loaded' : size(v.loaded) + ' of ' + size(total) + ' loaded';
    $('#viewer-more').hidden = v.loaded >= total;
    renderViewerText();
  }

  // The loaded text, with the matches of the search marked (the first 2,000).
  function renderViewerText() {
    const v = state.viewer;
    const pre = $('#viewer-text');
    const q = $('#viewer-search').value;
    if (!q) {
      pre.textContent = v.text;
      $('#viewer-count').textContent = '';
      return;
    }
    const hay = v.text.toLowerCase();
    const needle = q.toLowerCase();
    const frag = document.createDocumentFragment();
    let at = 0;
    let n = 0;
    for (let i = hay.indexOf(needle); i >= 0 && n < 2000; i = hay.indexOf(needle, i + needle.length)) {
      frag.append(v.text.slice(at, i), el('mark', {}, v.text.slice(i, i + needle.length)));
      at = i + needle.length;
      n++;
    }
    frag.append(v.text.slice(at));
    pre.replaceChildren(frag);
    let all = n;
    if (n >= 2000) for (let i = hay.indexOf(needle, at); i >= 0; i = hay.indexOf(needle, i + needle.length)) all++;
    $('#viewer-count').textContent = all ? all + (all === 1 ? ' match' : ' matches') + (v.loaded < v.a.file_size ? ' in the loaded text' : '')
      : 'no match' + (v.loaded < v.a.file_size ? ' in the loaded text (load more)' : '');
    v.match = -1;
    nextMatch();
  }

  function nextMatch() {
    const marks = $('#viewer-text').querySelectorAll('mark');
    if (!marks.length) return;
    const v = state.viewer;
    if (marks[v.match]) marks[v.match].classList.remove('current');
    v.match = (v.match + 1) % marks.length;
    marks[v.match].classList.add('current');
    marks[v.match].scrollIntoView({ block: 'center' });
  }

  // --- events ----------------------------------------------------------------------------

  function taskName(id) {
    const t = state.byId.get(id);
    return t ? t.task_name || t.name : id;
  }

  // The task the filter names (by name or id), or null.
  function eventTaskFilter() {
    const q = $('#event-task').value.trim();
    if (!q) return null;
    if (state.byId.has(q)) return q;
    const t = state.tasks.find((x) => (x.task_name || x.name) === q);
    return t ? t.task_id : undefined;
  }

  function addEvent(e) {
    state.events.set(e.seq, e);
    if (state.events.size > EVENTS_MAX) {
      const drop = [...state.events.keys()].sort((a, b) => a - b).slice(0, state.events.size - EVENTS_MAX);
      for (const k of drop) state.events.delete(k);
    }
    if (state.taskEvents && e.task_id === state.taskEvents.task && !state.taskEvents.items.some((x) => x.seq === e.seq)) {
      state.taskEvents.items.push(e);
    }
  }

  function renderEvents() {
    const kind = $('#event-kind').value;
    const task = eventTaskFilter();
    let list;
    if (task === undefined) list = [];
    else if (task) list = state.taskEvents && state.taskEvents.task === task ? state.taskEvents.items : [...state.events.values()].filter((e) => e.task_id === task);
    else list = [...state.events.values()];
    list = list.filter((e) => !kind || e.kind === kind).sort((a, b) => b.seq - a.seq).slice(0, EVENTS_MAX);
    const ol = $('#events');
    ol.replaceChildren(...list.map((e) => el('li', { class: e.status, dataset: { seq: e.seq, kind: e.kind }, testid: 'event' },
      el('span', { class: 'when', title: new Date(e.timestamp).toString() }, dateTime(e.timestamp)),
      el('span', { class: 'task-name', title: e.task_id || '' }, e.task_id ? taskName(e.task_id) : 'upgrade'),
      el('span', {}, e.kind),
      el('span', { title: e.message || '' }, human(e.status) + ' ' + pct(e.percentage) + (e.message ? ': ' + e.message : '')))));
    $('#no-events').hidden = list.length > 0;
    $('#no-events').textContent = task === undefined ? 'No task has this name or id.' : 'No events match.';
  }

  async function loadEvents() {
    const id = state.selected;
    // First the newest events; after a reconnect, only what is newer than what is shown.
    const maxShown = Math.max(0, ...state.events.keys());
    const q = maxShown ? 'since=' + maxShown + '&limit=10000' : 'latest=' + EVENTS_MAX;
    const events = await api(upgradePath(id) + '/events?' + q);
    if (id !== state.selected) return;
    for (const e of events.slice(-EVENTS_MAX)) addEvent(e);
    await loadTaskEvents();
  }

  // With a task filter: that task's own newest events (kind-filtered by the server).
  async function loadTaskEvents() {
    const id = state.selected;
    const task = eventTaskFilter();
    if (!task) {
      state.taskEvents = null;
      renderEvents();
      return;
    }
    const kind = $('#event-kind').value;
    const items = await api(upgradePath(id) + '/tasks/' + encodeURIComponent(task) + '/events?limit=' + EVENTS_MAX + (kind ? '&kind=' + encodeURIComponent(kind) : ''));
    if (id !== state.selected || eventTaskFilter() !== task) return;
    state.taskEvents = { task, items };
    renderEvents();
  }

  // --- test results: the upgrade's pre → post comparison (self-contained) ----------------

  // Fills #tests-compare from GET /api/v1/upgrades/{u}/tests/compare: the gate, then the
  // groups worst first, new failures first with their messages. Hidden when the upgrade has
  // no pre and post runs (404).
  async function loadTestsCompare() {
    const id = state.selected;
    const box = $('#tests-compare');
    const headers = state.token ? { Authorization: 'Bearer ' + state.token } : {};
    const r = await fetch('/api/v1/upgrades/' + encodeURIComponent(id) + '/tests/compare', { headers, cache: 'no-store' });
    if (id !== state.selected) return;
    if (!r.ok) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const c = await r.json();
    const groups = [
      ['new_failures', 'New failures'], ['new_errors', 'New errors'], ['missing', 'Missing'],
      ['still_failing', 'Still failing'], ['duration_regressions', 'Slower'], ['flaky', 'Flaky'],
      ['newly_skipped', 'Newly skipped'], ['fixed', 'Fixed'], ['added', 'Added'],
    ];
    const children = [
      el('h3', {}, 'Tests: pre → post'),
      el('p', { 'data-testid': 'tests-gate', class: c.gate.passed ? 'gate passed' : 'gate failed' },
        c.gate.passed ? 'Gate passed' : 'Gate failed: ' + c.gate.reasons.join(', '),
        el('span', { class: 'muted' }, ' · pre ' + c.run_a.passed + '/' + c.run_a.tests + ' passed, post '
          + c.run_b.passed + '/' + c.run_b.tests + ' passed')),
    ];
    for (const [key, title] of groups) {
      const list = c[key] || [];
      if (!list.length) continue;
      const ul = el('ul', { class: 'tests ' + key, dataset: { group: key } });
      for (const t of list.slice(0, 200)) {
        const name = (t.classname && t.classname !== t.suite && t.classname !== t.name ? t.classname + ' › ' : '') + t.name;
        const li = el('li', { 'data-testid': 'tests-' + key.replace(/_/g, '-'), dataset: { testId: t.test_id } },
          el('span', { class: 'muted' }, t.suite + ' › '), name,
          el('span', { class: 'muted' }, ' [' + (t.before || '-') + ' → ' + (t.after || '-') + ']'));
        if (t.message && ['new_failures', 'new_errors', 'still_failing'].includes(key)) {
          li.append(el('div', { class: 'error' }, t.message.split('\n')[0]));
        }
        ul.append(li);
      }
      children.push(el('h4', {}, title + ' (' + list.length + ')'), ul);
    }
    box.replaceChildren(...children);
    box.hidden = false;
  }

  // --- the live stream -------------------------------------------------------------------

  function detailDelay() {
    return state.tasks.length > 2000 ? 1000 : 100;
  }

  function onMessage(m) {
    if (typeof m.seq === 'number' && m.type !== 'progress_event') state.lastSeq = Math.max(state.lastSeq, m.seq);
    switch (m.type) {
      case 'progress_summary':
        if (Array.isArray(m.data)) setUpgrades(m.data);
        if (state.selected) select(state.selected);
        break;
      case 'resync':
        // We fell too far behind: start over from fresh state, without reloading the page.
        refreshUpgrades().then(() => state.selected && select(state.selected)).catch((e) => console.warn(e));
        break;
      case 'progress_event': {
        state.lastSeq = Math.max(state.lastSeq, m.seq);
        const e = m.data;
        const s = state.upgrades.get(e.upgrade_id);
        if (s && e.kind.startsWith('upgrade')) {
          s.status = e.status;
          s.overall_percentage = e.percentage;
        }
        later('list', 150, refreshUpgrades);
        if (e.upgrade_id === state.selected) {
          addEvent(e);
          later('events', 100, async () => renderEvents());
          later('detail', detailDelay(), loadDetail);
          later('artifacts', 1000, loadArtifacts);
          later('tests', 1000, loadTestsCompare);
        }
        break;
      }
      default:
        break;
    }
    $('#seq').textContent = 'seq ' + state.lastSeq;
  }

  function connect() {
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    let path = '/api/v1/ws';
    if (state.lastSeq > 0) path += '?since=' + state.lastSeq;
    const ws = new WebSocket(proto + '://' + location.host + withToken(path));
    state.ws = ws;
    ws.onopen = () => {
      state.retry = 0;
      setConn('live');
    };
    ws.onmessage = (ev) => {
      try { onMessage(JSON.parse(ev.data)); } catch (e) { console.warn(e); }
    };
    ws.onclose = () => {
      if (state.ws !== ws) return;
      setConn('reconnecting', 'reconnecting…');
      const wait = Math.min(5000, 250 * 2 ** state.retry++);
      setTimeout(connect, wait);
    };
    // A ping keeps proxies from closing an idle socket.
    clearInterval(state.timers.ping);
    state.timers.ping = setInterval(() => ws.readyState === 1 && ws.send('{"type":"ping"}'), 20000);
  }

  // --- wiring ----------------------------------------------------------------------------

  function wire() {
    for (const s of STATUSES) {
      $('#upgrade-status').append(el('option', { value: s }, human(s)));
      $('#task-status').append(el('option', { value: s }, human(s)));
    }
    for (const k of EVENT_KINDS) $('#event-kind').append(el('option', { value: k }, k));
    const sel = $('#artifact-type');
    for (const t of ARTIFACT_TYPES) sel.append(el('option', { value: t }, human(t)));
    sel.addEventListener('change', () => loadArtifacts().catch((e) => console.warn(e)));
    $('#artifact-tag').addEventListener('input', () => later('filter', 250, loadArtifacts));
    $('#upgrade-status').addEventListener('change', renderUpgrades);
    $('#upgrade-cluster').addEventListener('change', renderUpgrades);
    $('#task-status').addEventListener('change', () => { $('#tasks').scrollTop = 0; layoutTasks(); });
    $('#jump-failure').addEventListener('click', jumpToFailure);
    $('#expand-all').addEventListener('click', () => setAll(true));
    $('#collapse-all').addEventListener('click', () => setAll(false));
    let frame = 0;
    $('#tasks').addEventListener('scroll', () => {
      if (frame) return;
      frame = requestAnimationFrame(() => { frame = 0; renderWindow(); });
    });
    $('#tasks').addEventListener('keydown', onTaskKey);
    $('#tasks').addEventListener('focus', (ev) => {
      // Tabbing into the tree lands on the active row.
      if (ev.target === $('#tasks') && state.rows.length) focusTask(state.activeTask || state.rows[0].t.task_id);
    });
    $('#event-task').addEventListener('input', () => later('event-task', 200, loadTaskEvents));
    $('#event-kind').addEventListener('change', () => loadTaskEvents().catch((e) => console.warn(e)));
    $('#viewer-close').addEventListener('click', () => $('#viewer').close());
    // Escape closes the viewer, also from its search field (where it would only clear the text).
    $('#viewer').addEventListener('keydown', (ev) => { if (ev.key === 'Escape') { ev.preventDefault(); $('#viewer').close(); } });
    $('#viewer').addEventListener('close', () => { state.viewer = null; $('#viewer-image').removeAttribute('src'); });
    $('#viewer-more').addEventListener('click', () => viewerMore().catch((e) => viewerError(e)));
    $('#viewer-search').addEventListener('input', () => later('viewer-search', 150, async () => renderViewerText()));
    $('#viewer-search').addEventListener('keydown', (ev) => { if (ev.key === 'Enter') { ev.preventDefault(); nextMatch(); } });
    $('#viewer-image').addEventListener('error', () => { if (state.viewer && state.viewer.kind === 'image') viewerError(new Error('the image did not load')); });
    // Running tasks' bars and durations grow with the clock.
    setInterval(() => {
      if (state.upgrade && !ENDED.has(state.upgrade.status) && state.tasks.some((t) => t.status === 'in_progress')) {
        state.span = timeSpan();
        renderWindow();
      }
    }, 5000);
    $('#login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      sessionStorage.setItem('eua-token', $('#token-input').value.trim());
      location.reload();
    });
  }

  async function start() {
    initToken();
    wire();
    const m = /#u=([^&]+)/.exec(location.hash);
    if (m) state.selected = decodeURIComponent(m[1]);
    try {
      await refreshUpgrades();
    } catch (e) {
      if (e.message === 'unauthorized') return;
    }
    connect();
  }

  start();
})();
