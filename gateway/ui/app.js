// The UniDesk web UI: plain modules, no framework, every asset served by the
// gateway. Reads the REST API and follows /api/v1/live for changes.

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
const TOKEN_KEY = "unidesk.token";
const SSO_KEY = "unidesk.sso-started";
const TERMINAL = ["succeeded", "failed", "timed_out", "cancelled"];
const STATES = ["pending", "assigned", "running", "disconnected", "cancelling", ...TERMINAL];

// ---- small helpers -------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const token = () => localStorage.getItem(TOKEN_KEY);
const shortId = (id) => (id ? String(id).slice(0, 8) : "");
const stateBadge = (s) => h("span", { class: `state ${s}`, "data-state": s }, s.replace("_", " "));

function when(t) {
  if (!t) return "";
  const d = new Date(typeof t === "number" ? t : t);
  return isNaN(d) ? String(t) : d.toLocaleString();
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round((Date.now() - new Date(t).getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function debounce(fn, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}

function flash(text, ok = false) {
  const f = $("#flash");
  f.textContent = text;
  f.className = ok ? "ok" : "";
  f.hidden = !text;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: `Bearer ${token()}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, { error: "network", message: `the server cannot be reached (${e.message})` });
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { message: text }; }
  if (resp.status === 401) { signOut("Your token was refused: sign in again."); throw new ApiError(401, data); }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// ---- live updates --------------------------------------------------------

// One WebSocket to /api/v1/live. Remembers the last sequence of each stream
// it has seen and resumes from there after a reconnect (exponential backoff
// with full jitter), so no event is missed.
class Live {
  constructor(follow, onMessage) {
    this.follow = follow; // {tasks?: {after?}, nodes?: {after?}, log?: {after?}, task_id?}
    this.onMessage = onMessage;
    this.cursor = {};
    for (const k of ["tasks", "nodes", "log", "pipelines"]) this.cursor[k] = follow[k]?.after;
    this.attempt = 0;
    this.stopped = false;
    this.open();
  }

  open() {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/live`);
    this.ws = ws;
    ws.onopen = () => {
      const hello = { token: token() };
      if (this.follow.task_id) hello.task_id = this.follow.task_id;
      for (const k of ["tasks", "nodes", "log", "pipelines"]) {
        if (this.follow[k]) hello[k] = this.cursor[k] === undefined ? {} : { after: this.cursor[k] };
      }
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch { return; }
      if (m.type === "ready") {
        this.attempt = 0;
        setLive(true);
        if (this.follow.tasks && this.cursor.tasks === undefined) this.cursor.tasks = m.tasks_seq;
        if (this.follow.nodes && this.cursor.nodes === undefined) this.cursor.nodes = m.nodes_seq;
        if (this.follow.pipelines && this.cursor.pipelines === undefined) this.cursor.pipelines = m.pipelines_seq;
      } else if (m.type === "event") {
        this.cursor[m.stream] = m.seq;
      } else if (m.type === "log") {
        this.cursor.log = m.seq;
      }
      this.onMessage(m);
    };
    ws.onclose = (e) => {
      if (this.stopped) return;
      setLive(false);
      if (e.code === 4401) { signOut("Your token was refused: sign in again."); return; }
      // The request itself was refused (e.g. a task the token may not see): retrying cannot help.
      if (e.code === 4400) { this.stopped = true; return; }
      const delay = Math.random() * Math.min(15000, 500 * 2 ** this.attempt);
      this.attempt += 1;
      this.timer = setTimeout(() => this.open(), delay);
    };
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.ws?.close();
  }
}

function setLive(on) {
  const el = $("#live");
  el.hidden = false;
  el.textContent = on ? "live" : "reconnecting";
  el.className = on ? "live on" : "live";
}

// ---- routing -------------------------------------------------------------

let cleanup = [];
function onLeave(fn) { cleanup.push(fn); }

function route() {
  for (const fn of cleanup) fn();
  cleanup = [];
  flash("");
  main.replaceChildren();
  // Back from the identity provider with a token of one's own.
  // Only when this tab started the sign-in: a link with someone else's
  // token must not sign anyone in as them.
  const signedIn = location.hash.match(/^#\/signed-in\/([^/]+)$/);
  if (signedIn) {
    if (sessionStorage.getItem(SSO_KEY)) localStorage.setItem(TOKEN_KEY, decodeURIComponent(signedIn[1]));
    sessionStorage.removeItem(SSO_KEY);
    history.replaceState(null, "", "#/tasks");
  }
  if (!token()) return signInPage();
  $("#nav").hidden = false;
  $("#signout").hidden = false;
  const [page, id] = location.hash.replace(/^#\/?/, "").split("/");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === (page || "tasks"));
  const pages = {
    tasks: id ? () => taskPage(id) : tasksPage,
    pipelines: id ? () => pipelinePage(id) : pipelinesPage,
    schedules: schedulesPage,
    projects: projectsPage,
    nodes: nodesPage, submit: submitPage, overview: overviewPage,
  };
  (pages[page] || tasksPage)();
}

function signOut(message) {
  localStorage.removeItem(TOKEN_KEY);
  $("#nav").hidden = true;
  $("#signout").hidden = true;
  $("#live").hidden = true;
  route();
  if (message) flash(message);
}

// ---- sign in -------------------------------------------------------------

function signInPage() {
  const input = h("input", { type: "password", name: "token", autocomplete: "current-password", required: true });
  const err = h("p", { class: "error", id: "signin-error" });
  const form = h("form", { class: "card signin", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    const t = input.value.trim();
    const resp = await fetch("/api/v1/tasks?limit=1", { headers: { Authorization: `Bearer ${t}` } }).catch(() => null);
    if (!resp) { err.textContent = "The server cannot be reached."; return; }
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      err.textContent = body.message || `Refused (HTTP ${resp.status}).`;
      return;
    }
    localStorage.setItem(TOKEN_KEY, t);
    location.hash = "#/tasks";
    route();
  } },
  h("h1", {}, "Sign in"),
  h("label", {}, "API token", input),
  h("p", { class: "muted" }, "Ask an administrator for a token (unidesk token issue)."),
  err,
  h("button", { type: "submit" }, "Sign in"));
  const sso = h("p", { id: "sso" });
  main.append(form, sso);
  input.focus();
  // Sign-in through the organisation's identity provider, when it is set.
  fetch("/api/v1/auth").then((r) => r.json()).then((m) => {
    if (m.oidc) {
      sso.replaceChildren(h("a", { href: m.login_url, class: "button",
        onclick: () => sessionStorage.setItem(SSO_KEY, "1") }, "Sign in with your organisation"));
    }
  }).catch(() => {});
}

// ---- tasks ---------------------------------------------------------------

function tasksPage() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const f = {
    state: h("select", { name: "state" }, h("option", { value: "" }, "any state"), STATES.map((s) => h("option", { value: s }, s))),
    project: h("input", { name: "project", placeholder: "any project", size: 14 }),
    queue: h("input", { name: "queue", placeholder: "any queue", size: 12 }),
    node: h("input", { name: "node", placeholder: "node id", size: 14 }),
  };
  for (const [k, el] of Object.entries(f)) el.value = params.get(k) || "";
  const body = h("tbody");
  const more = h("button", { class: "secondary", hidden: true }, "Older tasks");
  const count = h("span", { class: "muted" });
  let before = null;

  const query = () => {
    const q = new URLSearchParams();
    for (const [k, el] of Object.entries(f)) if (el.value.trim()) q.set(k, el.value.trim());
    return q;
  };
  const row = (t) => h("tr", { "data-task": t.id },
    h("td", {}, h("a", { href: `#/tasks/${t.id}`, class: "mono" }, shortId(t.id))),
    h("td", {}, t.name || ""),
    h("td", {}, t.project),
    h("td", {}, t.spec?.queue || "default"),
    h("td", {}, stateBadge(t.state), t.waiting_reason ? h("div", { class: "muted" }, t.waiting_reason) : ""),
    h("td", { class: "mono" }, t.node_id ? h("a", { href: `#/nodes` }, shortId(t.node_id)) : ""),
    h("td", {}, when(t.submitted_at)),
    h("td", {}, when(t.updated_at)));

  let seen = 0; // the newest task event seen live
  const load = async () => {
    try {
      const q = query();
      q.set("limit", "100");
      if (seen) q.set("projected_seq", String(seen));
      const page = await api("GET", `/api/v1/tasks?${q}`);
      body.replaceChildren(...page.items.map(row));
      before = page.next;
      more.hidden = !before;
      count.textContent = `${page.items.length}${before ? "+" : ""} tasks`;
    } catch (e) { if (e.status !== 401) flash(e.message); }
  };
  more.onclick = async () => {
    const q = query();
    q.set("limit", "100");
    q.set("before", before);
    const page = await api("GET", `/api/v1/tasks?${q}`).catch((e) => (flash(e.message), null));
    if (!page) return;
    body.append(...page.items.map(row));
    before = page.next;
    more.hidden = !before;
  };
  const apply = (e) => {
    e?.preventDefault();
    history.replaceState(null, "", `#/tasks?${query()}`);
    load();
  };
  for (const el of Object.values(f)) el.addEventListener("change", apply);

  main.append(
    h("h1", {}, "Tasks"),
    h("form", { class: "filters", onsubmit: apply },
      h("label", {}, "State", f.state), h("label", {}, "Project", f.project),
      h("label", {}, "Queue", f.queue), h("label", {}, "Node", f.node),
      h("button", { type: "submit", class: "secondary" }, "Filter"), count),
    h("table", { id: "tasks" },
      h("thead", {}, h("tr", {}, ["Task", "Name", "Project", "Queue", "State", "Node", "Submitted", "Updated"].map((c) => h("th", {}, c)))),
      body),
    more);

  // Ready comes once the read model holds everything before it: load then,
  // and again (coalesced) whenever a task event arrives.
  const refresh = debounce(load, 200);
  const live = new Live({ tasks: {} }, (m) => {
    // A live event can come before the read model has it: the list is read
    // once the read model includes the newest event seen.
    if (m.type === "event") seen = Math.max(seen, m.seq);
    if (m.type === "ready" || m.type === "event") refresh();
  });
  onLeave(() => live.stop());
}

function versionRows(t) {
  const s = t.spec || {};
  const p = t.prepared || {};
  const same = (a, b) => (b && a !== b ? h("span", { class: "error" }, ` (ran ${b})`) : "");
  return [
    ["Code repository", s.code_repo_url],
    ["Code commit", h("span", { class: "mono" }, s.code_commit_id, same(s.code_commit_id, p.code_commit_id))],
    ["Environment repository", s.env_repo_url],
    ["Environment commit", h("span", { class: "mono" }, s.env_commit_id, same(s.env_commit_id, p.env_commit_id))],
    ["Dockerfile", s.dockerfile_path],
    ["Dockerfile SHA-256", s.image ? "" : p.dockerfile_digest ? h("span", { class: "mono" }, p.dockerfile_digest) : h("span", { class: "muted" }, "not prepared yet")],
    ["Image named", s.image ? h("span", { class: "mono" }, s.image) : ""],
    ["Image", p.image_id ? h("span", { class: "mono" }, p.image_id) : ""],
  ];
}

function dl(rows) {
  return h("dl", {}, rows.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function eventSummary(e) {
  const d = e.data || {};
  const parts = [];
  for (const k of ["node_id", "attempt", "step", "exit_code", "reason", "priority", "mode"]) {
    if (d[k] !== undefined && d[k] !== null && d[k] !== "") parts.push(`${k.replace("_", " ")}: ${k === "node_id" ? shortId(d[k]) : d[k]}`);
  }
  return parts.join(" · ");
}

function taskPage(id) {
  const head = h("div");
  const details = h("div", { class: "grid" });
  const steps = h("div");
  const outputs = h("div");
  const timeline = h("tbody");
  const log = h("pre", { class: "log", id: "log" });
  const logNote = h("span", { class: "muted" });
  let task = null;
  let logLines = 0;

  const cancel = h("button", { class: "danger", id: "cancel", onclick: async () => {
    cancel.disabled = true;
    try { await api("POST", `/api/v1/tasks/${id}/cancel`); flash("Cancel requested.", true); }
    catch (e) { flash(e.message); cancel.disabled = false; }
  } }, "Cancel");
  const rerun = h("button", { class: "secondary", id: "rerun", onclick: async () => {
    try {
      const a = await api("POST", `/api/v1/tasks/${id}/rerun?wait=projected`);
      location.hash = `#/tasks/${a.task_id}`;
    } catch (e) { flash(e.message); }
  } }, "Rerun");

  // A session opens at its own origin, through a one-minute link.
  const openSession = h("button", { id: "open-session", onclick: async () => {
    try {
      const l = await api("POST", `/api/v1/tasks/${id}/session`);
      window.open(l.url, "_blank", "noopener");
    } catch (e) { flash(e.message); }
  } }, "Open session");

  const render = () => {
    const t = task;
    const session = t.spec?.session ? [openSession] : [];
    openSession.disabled = t.state !== "running";
    head.replaceChildren(
      h("h1", {}, t.name || "Task", " ", h("span", { class: "mono muted" }, t.id), " ", stateBadge(t.state)),
      h("div", { class: "actions" }, ...session, cancel, rerun));
    cancel.disabled = TERMINAL.includes(t.state) || t.state === "cancelling";
    details.replaceChildren(
      h("div", { class: "card" }, h("h2", {}, "Run"), dl([
        ["Project", t.project], ["Queue", t.spec?.queue || "default"], ["Priority", t.priority],
        ["Node", t.node_id ? h("span", { class: "mono" }, t.node_id) : h("span", { class: "muted" }, "not placed")],
        ["Attempt", t.attempt], ["Exit code", t.exit_code], ["Reason", t.reason],
        ["Waiting", t.waiting_reason],
        ["Preparing", t.preparing ? `${t.preparing.step} since ${when(t.preparing.since)}` : ""],
        ["Submitted", `${when(t.submitted_at)} by ${t.submitted_by}`], ["Finished", when(t.finished_at)],
        ["Command", h("code", {}, [...(t.spec?.command || []), ...(t.spec?.args || [])].join(" "))],
        ["Resources", resourcesText(t.spec?.resources)],
      ])),
      h("div", { class: "card" }, h("h2", {}, "Versions"), dl(versionRows(t))));
    const st = t.prepared?.steps || [];
    steps.replaceChildren(st.length
      ? h("table", { id: "steps" }, h("thead", {}, h("tr", {}, h("th", {}, "Preparing step"), h("th", {}, "Took"))),
        h("tbody", {}, st.map((s) => h("tr", {}, h("td", {}, s.name), h("td", {}, `${(s.millis / 1000).toFixed(2)} s`)))))
      : h("p", { class: "muted" }, "Not prepared yet."));
    const outs = t.outputs || [];
    outputs.replaceChildren(
      outs.length
        ? h("table", { id: "outputs" }, h("thead", {}, h("tr", {}, ["Path", "Size", "SHA-256"].map((c) => h("th", {}, c)))),
          h("tbody", {}, outs.map((o) => h("tr", {},
            h("td", {}, o.download ? h("a", { href: o.download.url, download: o.path }, o.path) : o.path),
            h("td", {}, bytes(o.size)), h("td", { class: "mono" }, (o.sha256 || "").slice(0, 16))))))
        : h("p", { class: "muted" }, t.spec?.outputs?.length ? "No outputs stored yet." : "The task declares no outputs."),
      t.log_archive ? h("p", {}, h("a", { href: t.log_archive.url }, "Whole log (archived)")) : "");
  };

  let seen = 0; // the newest event of this task seen live
  const load = async () => {
    try {
      const t = await api("GET", `/api/v1/tasks/${id}${seen ? `?projected_seq=${seen}` : ""}`);
      if (left) return; // answered after the page was left: not ours to show
      task = t;
      if (!main.contains(head)) main.replaceChildren(...layout);
      render();
    } catch (e) {
      if (left) return;
      // Not (yet) in the read model: the live connection still brings the
      // task's events if it exists and may be seen, and each one loads again;
      // for a task that is not there it closes, and this stays.
      if (e.status === 404) { if (!task) main.replaceChildren(h("h1", {}, "No such task"), h("p", { class: "muted" }, "It does not exist, or your token may not see its project.")); }
      else if (e.status !== 401) flash(e.message);
    }
  };
  const refresh = debounce(load, 150);

  let left = false;
  onLeave(() => { left = true; });
  const layout = [head, details,
    h("h2", {}, "Preparing steps"), steps,
    h("h2", {}, "Log ", logNote), log,
    h("h2", {}, "Outputs"), outputs,
    h("h2", {}, "Timeline"),
    h("table", { id: "timeline" }, h("thead", {}, h("tr", {}, ["#", "Event", "When", "By", "Details"].map((c) => h("th", {}, c)))), timeline)];
  main.append(...layout);

  load();
  // The task's whole history and log come over the live connection from the
  // start of the streams; after a reconnect it resumes where it stopped.
  const live = new Live({ task_id: id, tasks: { after: 0 }, log: {} }, (m) => {
    if (m.type === "ready") { refresh(); return; }
    if (m.type === "event") {
      // Read the task once the read model includes this event.
      seen = Math.max(seen, m.seq);
      timeline.append(h("tr", { "data-type": m.event_type },
        h("td", { class: "mono" }, m.seq), h("td", {}, m.event_type), h("td", {}, when(m.stored_at)),
        h("td", {}, m.actor), h("td", {}, eventSummary(m))));
      refresh();
    } else if (m.type === "log") {
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(h("span", { class: m.stream }, m.text));
      logLines += 1;
      if (logLines > 5000) log.firstChild?.remove();
      logNote.textContent = `(attempt ${m.attempt})`;
      if (atEnd) log.scrollTop = log.scrollHeight;
    } else if (m.type === "error") {
      flash(m.message);
    }
  });
  onLeave(() => live.stop());
}

// ---- pipelines -----------------------------------------------------------

function pipelinesPage() {
  const body = h("tbody");
  const row = (p) => {
    const ended = p.steps.filter((s) => !["waiting", "running"].includes(s.state)).length;
    return h("tr", { "data-pipeline": p.id },
      h("td", {}, h("a", { href: `#/pipelines/${p.id}`, class: "mono" }, shortId(p.id))),
      h("td", {}, p.name || ""), h("td", {}, p.project),
      h("td", {}, stateBadge(p.status)), h("td", {}, `${ended} / ${p.steps.length}`),
      h("td", {}, when(p.submitted_at)), h("td", {}, when(p.updated_at)));
  };
  let seen = 0;
  const load = async () => {
    try {
      const page = await api("GET", `/api/v1/pipelines?limit=100${seen ? `&projected_seq=${seen}` : ""}`);
      body.replaceChildren(...page.items.map(row));
    } catch (e) { if (e.status !== 401) flash(e.message); }
  };
  main.append(h("h1", {}, "Pipelines"),
    h("p", { class: "muted" }, "Submit one with ", h("code", {}, "unidesk pipeline submit FILE.yaml"), " or POST /api/v1/pipelines."),
    h("table", { id: "pipelines" },
      h("thead", {}, h("tr", {}, ["Pipeline", "Name", "Project", "Status", "Steps ended", "Submitted", "Updated"].map((c) => h("th", {}, c)))),
      body));
  const refresh = debounce(load, 200);
  const live = new Live({ pipelines: {} }, (m) => {
    if (m.type === "event") seen = Math.max(seen, m.seq);
    if (m.type === "ready" || m.type === "event") refresh();
  });
  onLeave(() => live.stop());
}

// ---- projects ------------------------------------------------------------

// What each project's tasks hold now and used this month, against its quota.
function projectsPage() {
  const body = h("tbody");
  const fmt = (n) => (Number.isInteger(n) ? String(n) : n.toFixed(1));
  const cell = (what, used, limit) => {
    if (limit == null) return h("td", { "data-what": what }, fmt(used));
    const full = limit === 0 ? 1 : Math.min(1, used / limit);
    return h("td", { "data-what": what, class: full >= 1 ? "at-limit" : "" },
      `${fmt(used)} / ${fmt(limit)}`, h("meter", { min: 0, max: 1, value: full }));
  };
  const row = (p) => {
    const q = p.quota || {}, u = p.usage;
    const cpus = (m) => (m == null ? null : m / 1000);
    return h("tr", { "data-project": p.project },
      h("td", {}, p.project),
      cell("tasks", u.tasks, q.max_tasks), cell("cpus", cpus(u.cpu_millis), cpus(q.max_cpu_millis)),
      cell("memory", u.memory_mb, q.max_memory_mb), cell("gpus", u.gpus, q.max_gpus),
      cell("gpu-hours", u.gpu_hours, q.gpu_hours_per_month),
      h("td", { class: "muted" }, p.quota ? `set by ${p.updated_by}` : "no quota"));
  };
  const month = h("span");
  const load = async () => {
    try {
      const list = await api("GET", "/api/v1/quotas");
      month.textContent = list.length ? list[0].month : "";
      body.replaceChildren(...list.map(row));
    } catch (e) { if (e.status !== 401) flash(e.message); }
  };
  main.append(h("h1", {}, "Projects"),
    h("p", { class: "muted" }, "What each project's tasks hold now and the GPU-hours they used in ", month,
      " (UTC), against its quota. A task over its project's quota waits until enough frees. Admins set quotas with ",
      h("code", {}, "unidesk quota set PROJECT --gpus 4 --gpu-hours 500"), "."),
    h("table", { id: "projects" },
      h("thead", {}, h("tr", {}, ["Project", "Tasks", "CPUs", "Memory MiB", "GPUs", "GPU-hours", ""].map((c) => h("th", {}, c)))),
      body));
  const teams = h("div", { id: "teams" });
  main.append(h("h2", {}, "Members"),
    h("p", { class: "muted" }, "A viewer reads, a member also submits and changes its own tasks, an owner also manages members, secrets, webhooks and anyone's tasks."),
    teams);
  load();
  loadTeams(teams);
  const refresh = debounce(load, 500);
  const live = new Live({ tasks: {} }, (m) => { if (m.type === "event") refresh(); });
  onLeave(() => live.stop());
}

const ROLES = ["viewer", "member", "owner"];

// Each project's members; its owners change them here.
async function loadTeams(root) {
  let list;
  try { list = await api("GET", "/api/v1/projects"); } catch (e) { if (e.status !== 401) flash(e.message); return; }
  const again = () => loadTeams(root);
  const change = async (method, p, user, body) => {
    try {
      await api(method, `/api/v1/projects/${p.name}/members/${encodeURIComponent(user)}`, body);
      again();
    } catch (e) { flash(e.message); }
  };
  const card = (p) => {
    const owner = p.your_role === "owner" && !p.archived_at;
    const rows = p.members.map((m) => h("tr", { "data-user": m.user },
      h("td", {}, m.user),
      h("td", { "data-what": "role" }, owner
        ? h("select", { "aria-label": `role of ${m.user}`, onchange: (e) => change("PUT", p, m.user, { role: e.target.value }) },
          ROLES.map((r) => h("option", { value: r, ...(r === m.role ? { selected: "" } : {}) }, r)))
        : m.role),
      h("td", { class: "muted" }, when(m.since)),
      h("td", {}, owner ? h("button", { class: "link", "data-action": "remove", onclick: () => change("DELETE", p, m.user) }, "remove") : "")));
    const user = h("input", { name: "user", placeholder: "user (e.g. ada@example.org)", required: true });
    const role = h("select", { name: "role" }, ROLES.map((r) => h("option", { value: r }, r)));
    const add = owner ? h("form", { class: "filters", "data-form": "add-member", onsubmit: (e) => {
      e.preventDefault();
      change("PUT", p, user.value.trim(), { role: role.value });
    } }, user, role, h("button", { type: "submit" }, "Add member")) : "";
    return h("section", { class: "card", "data-team": p.name },
      h("h3", {}, p.name, " ", h("span", { class: "muted" }, `your role: ${p.your_role || "-"}${p.archived_at ? " (archived)" : ""}`)),
      p.description ? h("p", {}, p.description) : "",
      h("table", {}, h("thead", {}, h("tr", {}, ["User", "Role", "Since", ""].map((c) => h("th", {}, c)))), h("tbody", {}, rows)),
      add);
  };
  root.replaceChildren(...(list.length ? list.map(card)
    : [h("p", { class: "muted" }, "No project you may see has members yet. Admins make one with ", h("code", {}, "unidesk project create NAME --owner USER"), ".")]));
}

// ---- schedules -----------------------------------------------------------

function schedulesPage() {
  const body = h("tbody");
  const act = (s, what) => h("button", { class: "link", "data-action": what, onclick: async () => {
    try {
      await api("POST", `/api/v1/schedules/${s.id}/${what}?wait=projected`, what === "pause" ? {} : undefined);
      load();
    } catch (e) { flash(e.message); }
  } }, what);
  const row = (s) => {
    const last = s.last_task_id
      ? h("a", { href: `#/tasks/${s.last_task_id}`, class: "mono" }, shortId(s.last_task_id))
      : s.last_pipeline_id ? h("a", { href: `#/pipelines/${s.last_pipeline_id}`, class: "mono" }, shortId(s.last_pipeline_id)) : "";
    return h("tr", { "data-schedule": s.id, "data-fired": s.fired },
      h("td", {}, s.name), h("td", {}, s.project),
      h("td", {}, h("code", {}, s.cron), ` ${s.timezone}`),
      h("td", {}, s.task ? "task" : "pipeline"),
      h("td", {}, stateBadge(s.state), s.paused_reason ? h("span", { class: "muted" }, ` ${s.paused_reason}`) : ""),
      h("td", {}, when(s.next_due)), h("td", { class: "fired" }, String(s.fired)),
      h("td", {}, when(s.last_due), " ", last, s.last_error ? h("span", { class: "error" }, ` ${s.last_error}`) : ""),
      h("td", {}, s.state === "active" ? act(s, "pause") : s.state === "paused" ? act(s, "resume") : ""));
  };
  const load = async () => {
    try {
      const list = await api("GET", "/api/v1/schedules");
      body.replaceChildren(...list.items.map(row));
    } catch (e) { if (e.status !== 401) flash(e.message); }
  };
  main.append(h("h1", {}, "Schedules"),
    h("p", { class: "muted" }, "Make one with ", h("code", {}, "unidesk schedule create NAME --cron \"0 3 * * *\" ..."), " or POST /api/v1/schedules."),
    h("table", { id: "schedules" },
      h("thead", {}, h("tr", {}, ["Name", "Project", "When", "Submits", "State", "Next", "Fired", "Last", ""].map((c) => h("th", {}, c)))),
      body));
  load();
  // A firing submits work: the page follows the task and pipeline events,
  // and looks again every few seconds (the next times move on by themselves).
  const refresh = debounce(load, 300);
  const live = new Live({ tasks: {}, pipelines: {} }, (m) => {
    if (m.type === "event" && m.event_type.endsWith(".submitted")) refresh();
  });
  const timer = setInterval(load, 5000);
  onLeave(() => { live.stop(); clearInterval(timer); });
}

// Columns by depth (the longest chain of needs before a step), one row per
// step within its column; edges from each need to the step.
function layoutGraph(steps) {
  const byName = new Map(steps.map((s) => [s.name, s]));
  const depth = new Map();
  const depthOf = (s, path = new Set()) => {
    if (depth.has(s.name)) return depth.get(s.name);
    if (path.has(s.name)) return 0;
    path.add(s.name);
    const d = Math.max(-1, ...s.needs.map((n) => (byName.has(n) ? depthOf(byName.get(n), path) : -1))) + 1;
    depth.set(s.name, d);
    return d;
  };
  const columns = [];
  for (const s of steps) {
    const d = depthOf(s);
    (columns[d] ||= []).push(s);
  }
  const W = 170, H = 46, GX = 60, GY = 16;
  const at = new Map();
  columns.forEach((col, x) => col.forEach((s, y) => at.set(s.name, { x: 10 + x * (W + GX), y: 10 + y * (H + GY) })));
  const width = 20 + columns.length * (W + GX) - GX;
  const height = 20 + Math.max(1, ...columns.map((c) => c.length)) * (H + GY) - GY;
  return { at, W, H, width, height };
}

const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function pipelinePage(id) {
  const head = h("div");
  const graph = h("div", { class: "graph card" });
  const panel = h("div", { id: "step" });
  let pipeline = null;
  let selected = null;
  let stepLive = null;

  const cancel = h("button", { class: "danger", id: "cancel", onclick: async () => {
    cancel.disabled = true;
    try { await api("POST", `/api/v1/pipelines/${id}/cancel`); flash("Cancel requested.", true); }
    catch (e) { flash(e.message); cancel.disabled = false; }
  } }, "Cancel");
  const rerun = h("button", { class: "secondary", id: "rerun", onclick: async () => {
    try {
      await api("POST", `/api/v1/pipelines/${id}/rerun`, selected ? { step: selected } : {});
      flash(selected ? `Running ${selected} and the steps after it again.` : "Running every step again.", true);
    } catch (e) { flash(e.message); }
  } }, "Rerun");

  const info = h("div");
  const log = h("pre", { class: "log", id: "step-log" });
  let logTask = null;
  const showStep = (name) => {
    selected = name;
    const st = pipeline.steps.find((x) => x.name === name);
    if (!st) return;
    for (const g of graph.querySelectorAll("g.step")) g.classList.toggle("selected", g.dataset.step === name);
    rerun.textContent = `Rerun from ${name}`;
    info.replaceChildren(
      h("h2", {}, "Step ", h("span", { class: "mono" }, name), " ", stateBadge(st.state)),
      dl([["Task", st.task_id ? h("a", { href: `#/tasks/${st.task_id}`, class: "mono" }, st.task_id) : h("span", { class: "muted" }, "none yet")],
        ["Needs", st.needs.join(", ")], ["When", st.when], ["Runs", st.runs], ["Reason", st.reason]]));
    if (!panel.contains(info)) panel.replaceChildren(info, h("h2", {}, "Log"), log);
    // The log of the step's latest task, followed from its first chunk.
    if (st.task_id === logTask) return;
    logTask = st.task_id;
    stepLive?.stop();
    stepLive = null;
    log.replaceChildren();
    if (st.task_id) {
      stepLive = new Live({ task_id: st.task_id, log: {} }, (m) => {
        if (m.type === "log") log.append(h("span", { class: m.stream }, m.text));
      });
    }
  };

  const render = () => {
    const p = pipeline;
    head.replaceChildren(
      h("h1", {}, p.name || "Pipeline", " ", h("span", { class: "mono muted" }, p.id), " ", stateBadge(p.cancelling && p.status === "running" ? "cancelling" : p.status)),
      h("div", { class: "actions" }, cancel, rerun));
    cancel.disabled = p.status !== "running" || p.cancelling;
    rerun.disabled = p.status === "running";
    const { at, W, H, width, height } = layoutGraph(p.steps);
    const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, id: "graph" });
    for (const st of p.steps) {
      const b = at.get(st.name);
      for (const n of st.needs) {
        const a = at.get(n);
        if (!a) continue;
        svg.append(svgEl("path", { class: "edge", d: `M${a.x + W},${a.y + H / 2} C${a.x + W + 30},${a.y + H / 2} ${b.x - 30},${b.y + H / 2} ${b.x},${b.y + H / 2}` }));
      }
    }
    for (const st of p.steps) {
      const b = at.get(st.name);
      svg.append(svgEl("g", { class: `step ${st.state}`, "data-step": st.name, "data-state": st.state, transform: `translate(${b.x},${b.y})`, onclick: () => showStep(st.name) },
        svgEl("rect", { width: W, height: H, rx: 6 }),
        svgEl("text", { x: 10, y: 19, class: "name" }, st.name.length > 24 ? `${st.name.slice(0, 23)}…` : st.name),
        svgEl("text", { x: 10, y: 36 }, st.state.replace("_", " ") + (st.runs > 1 ? ` · run ${st.runs}` : ""))));
    }
    graph.replaceChildren(svg);
    if (selected) showStep(selected);
  };

  let seen = 0;
  let left = false;
  onLeave(() => { left = true; stepLive?.stop(); });
  const load = async () => {
    try {
      const p = await api("GET", `/api/v1/pipelines/${id}${seen ? `?projected_seq=${seen}` : ""}`);
      if (left) return;
      pipeline = p;
      render();
    } catch (e) {
      if (left) return;
      if (e.status === 404) { if (!pipeline) main.replaceChildren(h("h1", {}, "No such pipeline"), h("p", { class: "muted" }, "It does not exist, or your token may not see its project.")); }
      else if (e.status !== 401) flash(e.message);
    }
  };
  const refresh = debounce(load, 150);
  main.append(head, graph, panel);
  load();
  const live = new Live({ pipelines: {} }, (m) => {
    if (m.type === "ready") { refresh(); return; }
    if (m.type === "event" && m.pipeline_id === id) { seen = Math.max(seen, m.seq); refresh(); }
  });
  onLeave(() => live.stop());
}

function resourcesText(r) {
  if (!r) return "";
  const parts = [`${r.cpu_millis / 1000} CPU`, `${r.memory_mb} MiB`];
  if (r.gpus) parts.push(`${r.gpus} GPU${r.gpu_model ? ` (${r.gpu_model})` : ""}`);
  if (r.disk_mb) parts.push(`${r.disk_mb} MiB disk`);
  const labels = Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`);
  if (labels.length) parts.push(`on ${labels.join(", ")}`);
  return parts.join(" · ");
}

function bytes(n) {
  if (n === undefined || n === null) return "";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

// ---- nodes ---------------------------------------------------------------

function usageBar(used, total, text) {
  const pct = total > 0 ? Math.min(100, Math.round((100 * used) / total)) : 0;
  return h("div", {}, h("div", { class: "bar", title: `${pct}%` }, h("span", { style: `width:${pct}%` })), h("span", { class: "muted" }, text));
}

function nodesPage() {
  const body = h("tbody");
  const row = (n) => {
    const r = n.resources || {};
    const gpus = r.gpus || [];
    const act = (what, label, cls = "secondary") => h("button", { class: cls, "data-action": what, onclick: async () => {
      try { await api("POST", `/api/v1/nodes/${n.id}/${what}`, {}); flash(`${n.name}: ${what} requested.`, true); load(); }
      catch (e) { flash(e.message); }
    } }, label);
    return h("tr", { "data-node": n.name },
      h("td", {}, h("strong", {}, n.name), h("div", { class: "mono muted" }, shortId(n.id)),
        h("div", { class: "muted" }, Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", "))),
      h("td", { class: "status" }, stateBadge(n.status), " ", n.scheduling !== "active" ? stateBadge(n.scheduling) : "",
        n.low_disk ? h("div", { class: "error" }, "low disk") : ""),
      h("td", {}, usageBar(n.in_use.cpu_millis, r.cpu_millis, `${n.in_use.cpu_millis / 1000} / ${(r.cpu_millis || 0) / 1000} CPU`)),
      h("td", {}, usageBar(n.in_use.memory_mb, r.memory_mb, `${bytes(n.in_use.memory_mb * 1048576)} / ${bytes((r.memory_mb || 0) * 1048576)}`)),
      h("td", {}, gpus.length ? usageBar(n.in_use.gpus, gpus.length, `${n.in_use.gpus} / ${gpus.length}: ${[...new Set(gpus.map((g) => g.model))].join(", ")}`) : h("span", { class: "muted" }, "none")),
      h("td", {}, n.disk_free_mb !== null && n.disk_free_mb !== undefined ? `${bytes(n.disk_free_mb * 1048576)} free` : ""),
      h("td", {}, h("span", { class: "heartbeat", "data-seen": n.last_seen || "" }, ago(n.last_seen))),
      h("td", {}, n.running_tasks ? h("a", { href: `#/tasks?node=${n.id}` }, `${n.running_tasks}`) : "0"),
      h("td", {}, [r.os, r.wsl ? "WSL" : "", r.docker_version ? `Docker ${r.docker_version}` : "", r.agent_version ? `agent ${r.agent_version}` : ""].filter(Boolean).join(" · ")),
      h("td", {}, h("div", { class: "actions" }, n.status === "revoked" ? "" : n.scheduling === "active"
        ? [act("drain", "Drain"), act("cordon", "Cordon")]
        : act("resume", "Resume"))));
  };
  const load = async () => {
    try { body.replaceChildren(...(await api("GET", "/api/v1/nodes")).map(row)); }
    catch (e) { if (e.status !== 401) flash(e.message); }
  };
  main.append(h("h1", {}, "Nodes"),
    h("table", { id: "nodes" }, h("thead", {}, h("tr", {},
      ["Node", "Status", "CPU in use", "Memory in use", "GPUs in use", "Disk", "Last heartbeat", "Running", "System", ""].map((c) => h("th", {}, c)))), body));
  const refresh = debounce(load, 200);
  const live = new Live({ nodes: {} }, (m) => { if (m.type === "ready" || m.type === "event") refresh(); });
  // Heartbeats are not events of the live connection: refresh their ages.
  const tick = setInterval(() => {
    for (const el of document.querySelectorAll(".heartbeat")) el.textContent = ago(el.dataset.seen);
  }, 1000);
  const poll = setInterval(load, 15000);
  onLeave(() => { live.stop(); clearInterval(tick); clearInterval(poll); });
}

// ---- submit --------------------------------------------------------------

// Splits a command line into words: spaces separate, quotes group.
function words(line) {
  const out = [];
  const re = /"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S+)/g;
  let m;
  while ((m = re.exec(line))) out.push(m[1] !== undefined ? m[1].replace(/\\(.)/g, "$1") : m[2] !== undefined ? m[2] : m[3]);
  return out;
}

function lines(text) { return text.split("\n").map((l) => l.trim()).filter(Boolean); }

function pairs(text, sep, field, errors) {
  const out = {};
  lines(text).forEach((l, i) => {
    const at = l.indexOf(sep);
    if (at <= 0) errors.push({ field, reason: `line ${i + 1}: expected NAME${sep}VALUE` });
    else out[l.slice(0, at).trim()] = l.slice(at + 1).trim();
  });
  return out;
}

function submitPage() {
  const fields = [
    ["project", "Project", "input", { required: true }],
    ["name", "Name", "input", {}],
    ["code_repo_url", "Code repository URL", "input", { required: true, placeholder: "https://, ssh:// or file://" }],
    ["code_commit_id", "Code commit", "input", { required: true, placeholder: "40 or 64 hex digits", class: "mono" }],
    ["env_repo_url", "Environment repository URL", "input", {}],
    ["env_commit_id", "Environment commit", "input", { placeholder: "40 or 64 hex digits", class: "mono" }],
    ["dockerfile_path", "Dockerfile path", "input", { value: "Dockerfile" }],
    ["image", "Or an image instead of the environment repository", "input", { placeholder: "registry/name:tag or name@sha256:...", class: "mono" }],
    ["command", "Command", "input", { required: true, placeholder: "python train.py --epochs 3" }],
    ["resources.cpus", "CPUs", "input", { type: "number", step: "0.001", value: "1" }],
    ["resources.memory_mb", "Memory (MiB)", "input", { type: "number", value: "1024" }],
    ["resources.gpus", "GPUs", "input", { type: "number", value: "0" }],
    ["resources.gpu_model", "GPU model", "input", { placeholder: "any" }],
    ["resources.labels", "Node labels (one NAME=VALUE per line)", "textarea", { rows: 2 }],
    ["timeout_seconds", "Time limit (seconds)", "input", { type: "number", placeholder: "one day" }],
    ["queue", "Queue", "input", { placeholder: "default" }],
    ["priority", "Priority", "input", { type: "number", placeholder: "0" }],
    ["env", "Environment variables (NAME=VALUE per line)", "textarea", { rows: 3 }],
    ["inputs", "Inputs (project file -> workspace path, per line)", "textarea", { rows: 3, placeholder: "data/train.csv -> train.csv" }],
    ["outputs", "Outputs (workspace paths, per line)", "textarea", { rows: 3, placeholder: "results/" }],
  ];
  const els = {};
  const errs = {};
  const form = h("form", { class: "submit", id: "submit-form", novalidate: true });
  for (const [key, label, tag, attrs] of fields) {
    const { value, ...rest } = attrs;
    const el = h(tag, { name: key, ...rest });
    if (value !== undefined) el.value = value;
    els[key] = el;
    errs[key] = h("span", { class: "error", "data-error-for": key });
    form.append(h("label", { class: tag === "textarea" ? "wide" : "" }, label, el, errs[key]));
  }
  const general = h("p", { class: "error wide", id: "submit-error" });
  const button = h("button", { type: "submit" }, "Submit task");
  form.append(general, h("div", { class: "wide" }, button));

  const num = (k) => (els[k].value.trim() === "" ? undefined : Number(els[k].value));
  const text = (k) => els[k].value.trim() || undefined;

  form.onsubmit = async (e) => {
    e.preventDefault();
    for (const el of Object.values(errs)) el.textContent = "";
    general.textContent = "";
    const local = [];
    const inputs = lines(els.inputs.value).map((l, i) => {
      const [source, path] = l.split("->").map((s) => s.trim());
      if (!source) local.push({ field: "inputs", reason: `line ${i + 1}: expected SOURCE -> PATH` });
      return { source, path: path || source.split("/").filter(Boolean).pop() || "" };
    });
    const body = {
      project: els.project.value.trim(),
      name: text("name"),
      code_repo_url: els.code_repo_url.value.trim(),
      code_commit_id: els.code_commit_id.value.trim(),
      ...(text("image")
        ? { image: text("image") }
        : {
            env_repo_url: els.env_repo_url.value.trim(),
            env_commit_id: els.env_commit_id.value.trim(),
            dockerfile_path: els.dockerfile_path.value.trim(),
          }),
      command: words(els.command.value),
      env: pairs(els.env.value, "=", "env", local),
      resources: {
        cpus: num("resources.cpus") ?? 1,
        memory_mb: num("resources.memory_mb") ?? 1024,
        gpus: num("resources.gpus") ?? 0,
        gpu_model: text("resources.gpu_model"),
        labels: pairs(els["resources.labels"].value, "=", "resources.labels", local),
      },
      timeout_seconds: num("timeout_seconds"),
      queue: text("queue"),
      priority: num("priority"),
      inputs,
      outputs: lines(els.outputs.value),
    };
    if (local.length) return showErrors(local);
    button.disabled = true;
    try {
      const a = await api("POST", "/api/v1/tasks?wait=projected", body);
      location.hash = `#/tasks/${a.task_id}`;
    } catch (err) {
      if (err.body?.fields?.length) showErrors(err.body.fields);
      else general.textContent = err.message;
    } finally { button.disabled = false; }
  };

  // Each error goes next to its field (`inputs[0].path` to `inputs`, ...).
  function showErrors(list) {
    const rest = [];
    for (const f of list) {
      const key = Object.keys(errs).find((k) => f.field === k) ||
        Object.keys(errs).sort((a, b) => b.length - a.length).find((k) => f.field.startsWith(k));
      if (key) errs[key].textContent = (errs[key].textContent ? `${errs[key].textContent}; ` : "") + `${f.field}: ${f.reason}`;
      else rest.push(`${f.field}: ${f.reason}`);
    }
    general.textContent = rest.join("; ");
  }

  main.append(h("h1", {}, "Submit a task"), form);
}

// ---- overview: plots -----------------------------------------------------

const COLORS = { unfinished: "#2456c7", succeeded: "#1b7f3b", failed: "#b42318", timed_out: "#dc6803", cancelled: "#98a2b3" };

function lineChart(points, keys) {
  const W = 760, H = 240, L = 44, B = 26, T = 10, R = 10;
  const ns = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  };
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": "tasks per state over time", id: "timeline-chart" });
  const max = Math.max(1, ...points.flatMap((p) => keys.map((k) => p[k])));
  const x = (i) => L + ((W - L - R) * i) / Math.max(1, points.length - 1);
  const y = (v) => H - B - ((H - B - T) * v) / max;
  for (let g = 0; g <= 4; g += 1) {
    const v = Math.round((max * g) / 4);
    svg.append(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eef2f6" }), s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v));
  }
  if (points.length) {
    const fmt = (p) => new Date(p.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    svg.append(s("text", { x: L, y: H - 6 }, fmt(points[0])), s("text", { x: W - R, y: H - 6, "text-anchor": "end" }, fmt(points[points.length - 1])));
  }
  for (const k of keys) {
    const d = points.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(p[k]).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: COLORS[k], "stroke-width": 2, "data-series": k }));
  }
  return svg;
}

function overviewPage() {
  const counts = h("div", { class: "grid", id: "counts" });
  const chart = h("div", { class: "card" });
  const nodes = h("tbody");
  const minutes = h("select", {}, [15, 60, 360, 1440].map((m) => h("option", { value: m, selected: m === 60 }, m < 60 ? `${m} min` : `${m / 60} h`)));
  const load = async () => {
    try {
      const st = await api("GET", `/api/v1/stats?minutes=${minutes.value}&points=60`);
      counts.replaceChildren(...Object.entries(st.tasks_by_state).map(([k, v]) =>
        h("div", { class: "card", "data-count": k }, h("div", { class: "muted" }, k.replace("_", " ")), h("strong", { style: "font-size:1.5rem" }, v))));
      const keys = Object.keys(COLORS);
      chart.replaceChildren(lineChart(st.timeline, keys),
        h("div", { class: "legend" }, keys.map((k) => h("span", {}, h("i", { style: `background:${COLORS[k]}` }), k.replace("_", " ")))));
      nodes.replaceChildren(...st.nodes.map((n) => h("tr", {},
        h("td", {}, n.name), h("td", {}, stateBadge(n.status)),
        h("td", {}, usageBar(n.in_use.cpu_millis, n.cpu_millis, `${n.in_use.cpu_millis / 1000} / ${n.cpu_millis / 1000}`)),
        h("td", {}, usageBar(n.in_use.memory_mb, n.memory_mb, `${n.in_use.memory_mb} / ${n.memory_mb} MiB`)),
        h("td", {}, n.gpus ? usageBar(n.in_use.gpus, n.gpus, `${n.in_use.gpus} / ${n.gpus}`) : h("span", { class: "muted" }, "none")))));
    } catch (e) { if (e.status !== 401) flash(e.message); }
  };
  minutes.onchange = load;
  main.append(h("h1", {}, "Overview"), counts,
    h("div", { class: "filters" }, h("h2", {}, "Tasks per state over the last"), minutes), chart,
    h("h2", {}, "Node utilisation"),
    h("table", { id: "utilisation" }, h("thead", {}, h("tr", {}, ["Node", "Status", "CPU", "Memory", "GPUs"].map((c) => h("th", {}, c)))), nodes));
  const refresh = debounce(load, 1000);
  const live = new Live({ tasks: {}, nodes: {} }, (m) => { if (m.type === "ready" || m.type === "event") refresh(); });
  const poll = setInterval(load, 30000);
  onLeave(() => { live.stop(); clearInterval(poll); });
}

// ---- start ---------------------------------------------------------------

$("#signout").onclick = () => signOut("");
window.addEventListener("hashchange", route);
route();
