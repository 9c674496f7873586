// The dashboard: a live list of upgrades and, for the selected one, its task tree, events and
// artifacts. One WebSocket (/api/v1/ws) keeps it live; after a drop it reconnects with
// ?since=<last seq> and the server replays what was missed, so the page catches up without a
// reload. No framework, no CDN: this file is embedded in the server binary.
'use strict';
(() => {
  const ARTIFACT_TYPES = ['log_file', 'test_result', 'configuration', 'screenshot', 'metrics_data', 'backup', 'report', 'diagnostic'];
  const TIMELINE_MAX = 300;
  // Listings follow X-Next-Cursor up to these, then say how many they show.
  const UPGRADES_MAX = 10000;
  const ARTIFACTS_MAX = 5000;
  const $ = (s) => document.querySelector(s);
  const state = {
    token: null,
    upgrades: new Map(),
    selected: null,
    lastSeq: 0,
    ws: null,
    retry: 0,
    shown: new Set(),
    maxShown: 0,
    timers: {},
    loadId: Math.random().toString(36).slice(2),
  };
  // Tests check that a reconnect did not reload the page.
  window.__eua = state;

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    return e;
  }

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

  async function get(path) {
    const headers = state.token ? { Authorization: 'Bearer ' + state.token } : {};
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
  async function pages(path, max) {
    const items = [];
    let cursor = null;
    for (;;) {
      const sep = path.includes('?') ? '&' : '?';
      const r = await get(path + (cursor ? sep + 'cursor=' + encodeURIComponent(cursor) : ''));
      items.push(...await r.json());
      cursor = r.headers.get('x-next-cursor');
      if (!cursor) return { items, more: false };
      if (items.length >= max) return { items, more: true };
    }
  }

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

  const pct = (v) => (Math.round((v || 0) * 10) / 10).toFixed(1) + '%';
  const statusBadge = (s) => el('span', { class: 'status ' + s, dataset: { status: s } }, s.replace('_', ' '));
  function bar(v, status) {
    const b = el('span', { class: 'bar ' + status }, el('span'));
    b.firstChild.style.width = Math.max(0, Math.min(100, v || 0)) + '%';
    return b;
  }
  function eta(s) {
    if (s.status === 'completed') return 'done';
    if (!s.estimated_completion) return '';
    const ms = new Date(s.estimated_completion) - Date.now();
    if (ms <= 0) return 'any moment';
    const m = Math.round(ms / 60000);
    return m < 1 ? '< 1 min' : m < 120 ? m + ' min' : Math.round(m / 60) + ' h';
  }
  function size(n) {
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + ' ' + u[i];
  }

  // --- upgrades list ---------------------------------------------------------------------

  function renderUpgrades() {
    const body = $('#upgrades tbody');
    body.replaceChildren();
    const list = [...state.upgrades.values()].sort((a, b) => String(b.started_at || '').localeCompare(String(a.started_at || '')));
    $('#no-upgrades').hidden = list.length > 0;
    for (const s of list) {
      const tr = el('tr', { class: 'upgrade' + (s.upgrade_id === state.selected ? ' selected' : ''), dataset: { upgradeId: s.upgrade_id } },
        el('td', {}, s.upgrade_id),
        el('td', {}, s.cluster_name),
        el('td', {}, statusBadge(s.status)),
        el('td', {}, s.current_phase || ''),
        el('td', {}, bar(s.overall_percentage, s.status), ' ', el('span', { class: 'pct' }, pct(s.overall_percentage))),
        el('td', {}, eta(s)));
      tr.addEventListener('click', () => select(s.upgrade_id));
      body.append(tr);
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

  function later(name, ms, f) {
    if (state.timers[name]) return;
    state.timers[name] = setTimeout(() => {
      state.timers[name] = null;
      f().catch((e) => console.warn(name, e));
    }, ms);
  }

  // --- one upgrade -----------------------------------------------------------------------

  function select(id) {
    if (state.selected !== id) {
      state.selected = id;
      state.shown = new Set();
      state.maxShown = 0;
      $('#timeline').replaceChildren();
      history.replaceState(null, '', '#u=' + encodeURIComponent(id));
    }
    renderUpgrades();
    loadDetail().catch((e) => console.warn(e));
    loadTimeline().catch((e) => console.warn(e));
    loadArtifacts().catch((e) => console.warn(e));
    loadTestsCompare().catch((e) => console.warn(e));
  }

  async function loadDetail() {
    const id = state.selected;
    if (!id) return;
    const u = await api('/api/v1/upgrades/' + encodeURIComponent(id));
    if (id !== state.selected) return;
    $('#detail').hidden = false;
    $('#detail-title').textContent = u.upgrade_id + ' on ' + u.cluster_name;
    $('#detail-summary').replaceChildren(
      statusBadge(u.status), ' ', pct(u.overall_percentage), ' overall · ',
      (u.current_phase ? 'phase ' + u.current_phase + ' · ' : ''),
      u.completed_tasks + '/' + u.total_tasks + ' tasks done',
      (u.failed_tasks ? ' · ' + u.failed_tasks + ' failed' : ''),
      (u.current_task
        ? el('span', { 'data-testid': 'current-task' }, ' · ' + (u.current_task.status === 'failed' ? 'failed: ' : 'now: ')
          + u.current_task.task_name + ' ' + pct(u.current_task.percentage))
        : ''));
    const err = $('#detail-error');
    err.hidden = !u.error_message;
    err.textContent = u.error_message || '';
    state.upgrades.set(u.upgrade_id, { ...state.upgrades.get(u.upgrade_id), ...u });
    renderTasks(u.tasks || []);
    const more = $('#more-tasks');
    more.hidden = !u.tasks_next_cursor;
    more.textContent = u.tasks_next_cursor
      ? 'Showing the first ' + u.tasks.length + ' of ' + u.total_tasks + ' tasks; the CLI shows them all.'
      : '';
  }

  function renderTasks(tasks) {
    const children = new Map();
    for (const t of tasks) {
      const p = t.parent_task_id || '';
      if (!children.has(p)) children.set(p, []);
      children.get(p).push(t);
    }
    const box = $('#tasks');
    box.replaceChildren();
    const walk = (parent, depth) => {
      for (const t of children.get(parent) || []) {
        const steps = t.total_steps ? t.completed_steps + '/' + t.total_steps + ' steps' + (t.current_step ? ' · ' + t.current_step : '') : (t.current_step || '');
        const row = el('div', { class: 'task ' + t.status, dataset: { taskId: t.task_id, status: t.status } },
          el('span', { class: 'name', title: t.task_id }, t.task_name),
          el('span', { class: 'steps' }, steps),
          statusBadge(t.status),
          el('span', {}, bar(t.percentage, t.status), ' ', el('span', { class: 'pct' }, pct(t.percentage))),
          t.error_message ? el('div', { class: 'error' }, t.error_message) : null);
        row.firstChild.style.paddingLeft = depth * 1.2 + 'rem';
        box.append(row);
        walk(t.task_id, depth + 1);
      }
    };
    walk('', 0);
  }

  function addTimeline(e) {
    if (state.shown.has(e.seq)) return;
    state.shown.add(e.seq);
    state.maxShown = Math.max(state.maxShown, e.seq);
    const what = (e.task_id ? e.task_id + ' ' : '') + e.kind.replace('_', ' ') + ' → ' + e.status + ' ' + pct(e.percentage);
    const li = el('li', { class: e.status, value: e.seq, dataset: { seq: e.seq } },
      el('span', { class: 'muted' }, new Date(e.timestamp).toLocaleTimeString() + ' '),
      what, e.message ? ': ' + e.message : '');
    const list = $('#timeline');
    // Newest first, ordered by seq even when replayed events arrive after live ones.
    let before = null;
    for (const c of list.children) if (Number(c.dataset.seq) < e.seq) { before = c; break; }
    list.insertBefore(li, before);
    while (list.children.length > TIMELINE_MAX) list.lastChild.remove();
  }

  async function loadTimeline() {
    const id = state.selected;
    // After a reconnect, only what is newer than what the timeline shows.
    // First the newest events; after a reconnect, only what is newer than what is shown.
    const q = state.maxShown ? 'since=' + state.maxShown + '&limit=10000' : 'latest=' + TIMELINE_MAX;
    const events = await api('/api/v1/upgrades/' + encodeURIComponent(id) + '/events?' + q);
    if (id !== state.selected) return;
    for (const e of events.slice(-TIMELINE_MAX)) addTimeline(e);
  }

  async function loadArtifacts() {
    const id = state.selected;
    const type = $('#artifact-type').value;
    const tag = $('#artifact-tag').value.trim();
    const sessions = await api('/api/v1/sessions?upgrade_id=' + encodeURIComponent(id));
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
    const note = $('#more-artifacts');
    note.hidden = !more;
    note.textContent = more
      ? 'Showing ' + rows.length + ' artifacts; more match: narrow the filters, or search with the CLI (artifacts search --all).'
      : '';
    if (id !== state.selected) return;
    const body = $('#artifacts tbody');
    body.replaceChildren();
    for (const a of rows.filter((a) => a.status !== 'deleted')) {
      body.append(el('tr', { dataset: { artifactId: a.artifact_id } },
        el('td', {}, el('a', { href: withToken('/api/v1/artifacts/' + encodeURIComponent(a.artifact_id) + '/content'), download: a.export_name }, a.name)),
        el('td', {}, a.artifact_type),
        el('td', {}, (a.tags || []).join(', ')),
        el('td', {}, size(a.file_size)),
        el('td', {}, a.task_id || '')));
    }
    $('#no-artifacts').hidden = rows.length > 0;
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
          addTimeline(e);
          later('detail', 100, loadDetail);
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

  async function start() {
    initToken();
    const sel = $('#artifact-type');
    for (const t of ARTIFACT_TYPES) sel.append(el('option', { value: t }, t.replace('_', ' ')));
    sel.addEventListener('change', () => loadArtifacts().catch((e) => console.warn(e)));
    $('#artifact-tag').addEventListener('input', () => later('filter', 250, loadArtifacts));
    $('#login').addEventListener('submit', (ev) => {
      ev.preventDefault();
      sessionStorage.setItem('eua-token', $('#token-input').value.trim());
      location.reload();
    });
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
