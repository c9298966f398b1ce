// The web UI in headless Chromium against the real local stack started by
// tests/browser/run.sh: sign in, submit through the form, watch a task finish
// without reloading, read its log across a dropped live connection, cancel a
// task, follow a pipeline's graph, watch a schedule fire, open a session at its own origin (and use
// `unidesk task exec` and `port-forward` on it), see the node go offline when
// its agent stops. Screenshots of every
// page are written to $UD_ARTIFACTS.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.UD_API_URL;
const ADMIN = process.env.UD_ADMIN_TOKEN;
const STATE = process.env.UD_STATE_DIR;
const ARTIFACTS = process.env.UD_ARTIFACTS;
const WAIT = 90_000; // upper bound of any one wait: a missing change fails instead of hanging

const demo = (repo) => ({
  url: `file://${STATE}/demo/${repo}`,
  commit: execFileSync("git", ["-C", `${STATE}/demo/${repo}`, "rev-parse", "HEAD"]).toString().trim(),
});

async function api(method, url, token, body) {
  const resp = await fetch(BASE + url, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(`${method} ${url}: ${resp.status} ${JSON.stringify(data)}`);
  return data;
}

function taskBody(project, command) {
  const code = demo("code");
  const env = demo("env");
  return {
    project, code_repo_url: code.url, code_commit_id: code.commit, env_repo_url: env.url,
    env_commit_id: env.commit, dockerfile_path: "Dockerfile", command,
    resources: { cpus: 0.5, memory_mb: 128 },
  };
}

let browser, page, user;
const requests = [];
const pageErrors = [];

async function shot(name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

before(async () => {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--headless", "--no-sandbox"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(WAIT);
  page.on("request", (r) => requests.push(r.url()));
  page.on("pageerror", (e) => pageErrors.push(e.message));
  user = (await api("POST", "/api/v1/tokens", ADMIN, { name: "browser-user", projects: ["web"] })).token;
});

after(async () => {
  await browser?.close();
});

test("the first load is small and works on a slow link", async () => {
  // 50 KiB/s down, 300 ms round trips: what a poor remote connection gives.
  const slow = await browser.newPage();
  const cdp = await slow.context().newCDPSession(slow);
  await cdp.send("Network.enable");
  await cdp.send("Network.emulateNetworkConditions", {
    offline: false, latency: 300, downloadThroughput: 50 * 1024, uploadThroughput: 20 * 1024,
  });
  const loaded = [];
  slow.on("requestfinished", async (r) => loaded.push({ url: r.url(), ...(await r.sizes()) }));
  const t0 = Date.now();
  await slow.goto(BASE + "/");
  await slow.locator("input[name=token]").waitFor();
  const ms = Date.now() - t0;
  await slow.waitForLoadState("networkidle");
  const bytes = loaded.reduce((n, r) => n + r.responseBodySize + r.responseHeadersSize, 0);
  console.log(`first load: ${loaded.length} requests, ${bytes} bytes transferred; sign-in usable after ${ms} ms at 50 KiB/s with 300 ms latency`);
  assert.ok(bytes < 64 * 1024, `first load transferred ${bytes} bytes`);
  await slow.close();
});

test("sign in: a wrong token is refused with the API's reason, a right one opens the tasks page", async () => {
  await page.goto(BASE + "/");
  await page.locator("input[name=token]").fill("not-a-token");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#signin-error", { hasText: "unknown or revoked token" }).waitFor();
  await shot("01-sign-in-refused");
  await page.locator("input[name=token]").fill(user);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("h1", { hasText: "Tasks" }).waitFor();
  await page.locator("#live.on").waitFor();
  // Marks this document: if anything reloads the page, the mark is gone.
  await page.evaluate(() => { window.__unreloaded = true; });
});

test("the submit form shows the API's errors next to their fields and submits nothing bad", async () => {
  await page.locator("nav a", { hasText: "Submit" }).click();
  const form = page.locator("#submit-form");
  const code = demo("code");
  const env = demo("env");
  await form.locator("[name=project]").fill("web");
  await form.locator("[name=code_repo_url]").fill(code.url);
  await form.locator("[name=code_commit_id]").fill("abc123");
  await form.locator("[name=env_repo_url]").fill(env.url);
  await form.locator("[name=env_commit_id]").fill(env.commit);
  await form.locator("[name=command]").fill("sh -c 'echo never'");
  await form.locator("[name='resources.cpus']").fill("5000");
  await form.getByRole("button", { name: "Submit task" }).click();
  await page.locator("[data-error-for=code_commit_id]", { hasText: "code_commit_id" }).waitFor();
  await page.locator("[data-error-for='resources.cpus']", { hasText: "between 0.001 and 1024" }).waitFor();
  await shot("02-submit-errors");
  const none = await api("GET", "/api/v1/tasks?project=web", user);
  assert.equal(none.items.length, 0, "a refused form created a task");
});

let doneId;
test("a task submitted through the form goes from pending to succeeded without a reload; its log survives a dropped connection", async () => {
  // Every live connection goes through this route so the test can cut it.
  const sockets = [];
  await page.routeWebSocket(/\/api\/v1\/live$/, (ws) => {
    ws.connectToServer();
    sockets.push(ws);
  });
  const form = page.locator("#submit-form");
  await form.locator("[name=code_commit_id]").fill(demo("code").commit);
  await form.locator("[name='resources.cpus']").fill("0.5");
  await form.locator("[name='resources.memory_mb']").fill("128");
  await form.locator("[name=name]").fill("counting");
  await form.locator("[name=command]").fill(
    "sh -c 'for i in $(seq 1 60); do echo line $i; sleep 0.1; done; echo 42 > result.txt; echo to stderr >&2'");
  await form.locator("[name=outputs]").fill("result.txt");
  await form.getByRole("button", { name: "Submit task" }).click();
  await page.waitForURL(/#\/tasks\/[0-9a-f-]{36}$/);
  doneId = page.url().split("/").pop();
  await page.locator("h1 .state").first().waitFor();
  // Cut the live connection once output has begun, while the task still runs.
  await page.locator("#log", { hasText: "line 5" }).waitFor();
  const cut = sockets.length;
  await sockets[cut - 1].close({ code: 4000, reason: "cut by the test" });
  await page.locator("h1 [data-state=succeeded]").waitFor();
  assert.ok(sockets.length > cut, "the page did not reconnect");
  // The log holds the image build's output, then the run's: every line once, in order.
  const log = await page.locator("#log").textContent();
  const counted = log.split("\n").filter((l) => /^line \d+$/.test(l));
  assert.deepEqual(counted, Array.from({ length: 60 }, (_, i) => `line ${i + 1}`), "a gap or a repeat after the reconnect");
  assert.ok(log.endsWith("line 60\nto stderr\n"), log.slice(-200));
  assert.equal(await page.locator("#log .stderr").textContent(), "to stderr\n");
  // The timeline comes from the stream, the versions from the read model.
  const types = await page.locator("#timeline tr[data-type]").evaluateAll((rows) => rows.map((r) => r.dataset.type));
  assert.equal(types[0], "task.submitted");
  assert.ok(types.includes("task.started") && types.at(-1) === "task.succeeded", types.join(","));
  const seqs = await page.locator("#timeline tr[data-type] td:first-child").allTextContents();
  for (let i = 1; i < seqs.length; i += 1) assert.ok(Number(seqs[i]) > Number(seqs[i - 1]), `timeline ${seqs}`);
  await page.locator("#steps td", { hasText: "build_image" }).waitFor();
  await page.locator("dd", { hasText: demo("env").commit }).first().waitFor();
  assert.equal(await page.evaluate(() => window.__unreloaded), true, "the page reloaded");
  // The output, with a download link straight to the object store.
  const link = page.locator("#outputs a", { hasText: "result.txt" });
  await link.waitFor();
  const resp = await fetch(await link.getAttribute("href"));
  assert.equal(resp.status, 200);
  assert.equal(await resp.text(), "42\n");
  await shot("03-task-succeeded");
  await page.unrouteAll({ behavior: "ignoreErrors" });
});

test("the tasks page follows state changes live; cancel stops a running task", async () => {
  await page.locator("nav a", { hasText: "Tasks" }).click();
  await page.locator(`tr[data-task="${doneId}"] [data-state=succeeded]`).waitFor();
  // Submitted elsewhere (the API): the open page shows it and its changes.
  const { task_id: id } = await api("POST", "/api/v1/tasks", user, taskBody("web", ["sh", "-c", "echo waiting; sleep 300"]));
  await page.locator(`tr[data-task="${id}"] [data-state=running]`).waitFor();
  await shot("04-tasks-live");
  const [node] = await api("GET", "/api/v1/nodes", user);
  assert.deepEqual(node.in_use, { cpu_millis: 500, memory_mb: 128, gpus: 0 });
  const other = await api("POST", "/api/v1/tasks", ADMIN, taskBody("hidden", ["true"]));
  await page.locator(`tr[data-task="${id}"] td:first-child a`).click();
  await page.locator("#log", { hasText: "waiting" }).waitFor();
  await page.locator("#cancel").click();
  await page.locator("h1 [data-state=cancelled]").waitFor();
  await page.locator("#timeline tr[data-type='task.cancelled']").waitFor();
  assert.equal(await page.locator("#cancel").isDisabled(), true);
  await shot("05-task-cancelled");
  // Another project's task is never shown, not in the list, not by its address.
  await page.goto(`${BASE}/#/tasks`);
  await page.locator(`tr[data-task="${id}"] [data-state=cancelled]`).waitFor();
  await page.locator("select[name=state]").selectOption("cancelled");
  await page.locator(`tr[data-task="${doneId}"]`).waitFor({ state: "detached" });
  assert.deepEqual(await page.locator("#tasks tbody tr").evaluateAll((rows) => rows.map((r) => r.dataset.task)), [id]);
  await page.locator("select[name=state]").selectOption("");
  await page.locator(`tr[data-task="${doneId}"]`).waitFor();
  assert.equal(await page.locator(`tr[data-task="${other.task_id}"]`).count(), 0);
  await page.goto(`${BASE}/#/tasks/${other.task_id}`);
  await page.locator("h1", { hasText: "No such task" }).waitFor();
  // Rerun makes a new task with the same spec.
  await page.goto(`${BASE}/#/tasks/${doneId}`);
  await page.locator("h1 [data-state=succeeded]").waitFor();
  await page.locator("#rerun").click();
  await page.waitForURL((u) => /#\/tasks\/[0-9a-f-]{36}$/.test(u.toString()) && !u.toString().endsWith(doneId));
  await page.locator("h1 [data-state=succeeded]").waitFor();
});

test("the overview plots tasks per state and node utilisation", async () => {
  await page.locator("nav a", { hasText: "Overview" }).click();
  await page.locator("#timeline-chart path[data-series=succeeded]").waitFor();
  const succeeded = Number(await page.locator("[data-count=succeeded] strong").textContent());
  assert.ok(succeeded >= 2, `succeeded count ${succeeded}`);
  assert.equal(Number(await page.locator("[data-count=cancelled] strong").textContent()), 1);
  await page.locator("#utilisation td", { hasText: "main-server" }).waitFor();
  await shot("06-overview");
});

test("a pipeline's graph follows its steps live, each with its log; a step runs again from the page", async () => {
  const step = (command) => ({ command: ["sh", "-c", command] });
  const defaults = taskBody("web", ["true"]);
  delete defaults.project;
  const { pipeline_id: id } = await api("POST", "/api/v1/pipelines", user, {
    project: "web", name: "graph", defaults,
    steps: [
      { name: "fetch", ...step("echo from-fetch; sleep 1") },
      { name: "train", needs: ["fetch"], matrix: { lr: ["0.1", "0.2"] }, ...step("echo training at {{matrix.lr}}") },
      { name: "check", needs: ["fetch"], ...step("echo checking; exit 3") },
      { name: "report", needs: ["train", "check"], when: "always", ...step("echo report") },
    ],
  });
  await page.locator("nav a", { hasText: "Pipelines" }).click();
  await page.locator(`tr[data-pipeline="${id}"]`).waitFor();
  await page.locator(`tr[data-pipeline="${id}"] a`).click();
  // Drawn at once, then followed: every step ends without a reload.
  await page.evaluate(() => { window.__samePipelinePage = true; });
  const node = (name, state) => page.locator(`#graph g.step[data-step="${name}"]${state ? `[data-state=${state}]` : ""}`);
  await node("fetch").waitFor();
  assert.equal(await page.locator("#graph g.step").count(), 5);
  assert.equal(await page.locator("#graph path.edge").count(), 1 * 2 + 1 + 3);
  await node("report", "succeeded").waitFor();
  await node("check", "failed").waitFor();
  await node("train[0.2]", "succeeded").waitFor();
  await page.locator("h1 [data-state=failed]").waitFor();
  // A step's log, from its task.
  await node("train[0.2]").click();
  await page.locator("#step-log", { hasText: "training at 0.2" }).waitFor();
  await node("fetch").click();
  await page.locator("#step-log", { hasText: "from-fetch" }).waitFor();
  await shot("09-pipeline-graph");
  // Run `check` and what comes after it again.
  await node("check").click();
  await page.locator("#rerun", { hasText: "Rerun from check" }).click();
  await page.locator("#graph g.step[data-step=report] text", { hasText: "run 2" }).waitFor();
  await page.locator("h1 [data-state=failed]").waitFor();
  assert.equal(await page.locator("#graph g.step[data-step=fetch] text", { hasText: "run 2" }).count(), 0);
  assert.equal(await page.evaluate(() => window.__samePipelinePage), true, "the page reloaded");
});

test("a schedule's firings show on its page, which pauses and resumes it", async () => {
  const { schedule_id: id } = await api("POST", "/api/v1/schedules?wait=projected", user, {
    name: "every-3s", cron: "*/3 * * * * *", timezone: "Europe/Berlin", task: taskBody("web", ["true"]),
  });
  await page.locator("nav a", { hasText: "Schedules" }).click();
  const row = page.locator(`tr[data-schedule="${id}"]`);
  await row.locator("[data-state=active]").waitFor();
  // Two of its times come and go without a reload.
  await page.locator(`tr[data-schedule="${id}"]:not([data-fired="0"]):not([data-fired="1"])`).waitFor();
  assert.ok((await row.locator("a.mono").count()) === 1, "the last task is linked");
  await shot("10-schedules");
  await row.locator("button[data-action=pause]").click();
  await row.locator("[data-state=paused]").waitFor();
  const fired = Number(await row.getAttribute("data-fired"));
  await row.locator("button[data-action=resume]").click();
  await row.locator("[data-state=active]").waitFor();
  await api("DELETE", `/api/v1/schedules/${id}`, user);
  assert.ok(fired >= 2, `fired ${fired}`);
});

test("the projects page shows what a project holds against its quota; a task over it waits", async () => {
  await api("PUT", "/api/v1/projects/web/quota", ADMIN, { max_tasks: 1 });
  let long;
  try {
    await page.locator("nav a", { hasText: "Projects" }).click();
    ({ task_id: long } = await api("POST", "/api/v1/tasks?wait=projected", user, taskBody("web", ["sh", "-c", "sleep 300"])));
    const tasks = page.locator('tr[data-project="web"] td[data-what=tasks]');
    await page.locator('tr[data-project="web"] td[data-what=tasks].at-limit', { hasText: "1 / 1" }).waitFor();
    const { task_id: next } = await api("POST", "/api/v1/tasks?wait=projected", user, taskBody("web", ["true"]));
    const deadline = Date.now() + WAIT;
    let waiting;
    while (Date.now() < deadline) {
      waiting = await api("GET", `/api/v1/tasks/${next}`, user);
      if (waiting.waiting_reason) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.match(waiting.waiting_reason, /project web is at its quota of 1 tasks at once/);
    assert.equal(waiting.state, "pending");
    await shot("11-projects");
    await api("POST", `/api/v1/tasks/${long}/cancel`, user, {});
    await page.locator('tr[data-project="web"] td[data-what=tasks]:not(.at-limit)').waitFor();
    while (Date.now() < deadline && (await api("GET", `/api/v1/tasks/${next}`, user)).state !== "succeeded") {
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal((await api("GET", `/api/v1/tasks/${next}`, user)).state, "succeeded");
    assert.match(await tasks.textContent(), /^[01] \/ 1/);
  } finally {
    // The tests after this one run in the same project.
    if (long) await api("POST", `/api/v1/tasks/${long}/cancel`, user, {}).catch(() => {});
    await api("DELETE", "/api/v1/projects/web/quota", ADMIN);
  }
});

test("a project's owner adds a member, changes the role and removes the member on the projects page", async () => {
  // The page's token names project web, so it owns it.
  await api("POST", "/api/v1/projects", ADMIN, { name: "web", description: "browser tests", owner: "olive" });
  // The page from the test before is the projects page: open it anew.
  await page.locator("nav a", { hasText: "Tasks" }).click();
  await page.locator("nav a", { hasText: "Projects" }).click();
  const team = page.locator('section[data-team="web"]');
  await team.locator('tr[data-user="olive"] td[data-what=role] select').waitFor();
  await team.locator('input[name=user]').fill("mike");
  await team.locator('select[name=role]').selectOption("viewer");
  await team.locator('button[type=submit]').click();
  await team.locator('tr[data-user="mike"]').waitFor();
  let shown = await api("GET", "/api/v1/projects/web", ADMIN);
  assert.deepEqual(shown.members.map((m) => [m.user, m.role]), [["mike", "viewer"], ["olive", "owner"]]);
  await team.locator('tr[data-user="mike"] td[data-what=role] select').selectOption("member");
  const deadline = Date.now() + WAIT;
  while (Date.now() < deadline && (await api("GET", "/api/v1/projects/web", ADMIN)).members[0].role !== "member") {
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal((await api("GET", "/api/v1/projects/web", ADMIN)).members[0].role, "member");
  await shot("12-members");
  await team.locator('tr[data-user="mike"] button[data-action=remove]').click();
  await team.locator('tr[data-user="mike"]').waitFor({ state: "detached" });
  shown = await api("GET", "/api/v1/projects/web", ADMIN);
  assert.deepEqual(shown.members.map((m) => m.user), ["olive"]);
});

test("a session opens at its own origin with a WebSocket; the CLI gets a shell and a port in it", async () => {
  const env = { url: `file://${process.env.UD_SESSIOND_ENV}`, commit: execFileSync("git", ["-C", process.env.UD_SESSIOND_ENV, "rev-parse", "HEAD"]).toString().trim() };
  const body = {
    ...taskBody("web", ["ud-sessiond", "8888"]),
    env_repo_url: env.url, env_commit_id: env.commit, name: "notebook",
    session: { port: 8888, idle_timeout_minutes: 30 },
  };
  const { task_id: id } = await api("POST", "/api/v1/tasks?wait=projected", user, body);
  await page.evaluate((id) => { location.hash = `#/tasks/${id}`; }, id);
  const open = page.locator("#open-session");
  await open.waitFor();
  await page.locator("h1 [data-state=running]").waitFor();
  await page.waitForFunction(() => !document.querySelector("#open-session").disabled);
  const [session] = await Promise.all([page.context().waitForEvent("page"), open.click()]);
  session.setDefaultTimeout(WAIT);
  await session.waitForLoadState();
  // Its own origin, signed in by the link's cookie; its WebSocket echoes.
  assert.match(new URL(session.url()).host, /^[0-9a-f]{32}\.s\.localhost:\d+$/);
  await session.locator("#ws", { hasText: "echo: ping-123" }).waitFor();
  await session.screenshot({ path: path.join(ARTIFACTS, "08a-session.png"), fullPage: true });
  // The session's script cannot read the platform's token or the cookie.
  assert.equal(await session.evaluate(() => document.cookie), "");
  await session.close();

  const cli = path.resolve("target/release/unidesk");
  const cliEnv = { ...process.env, UD_API_URL: BASE, UD_TOKEN: user };
  const sh = spawnSync(cli, ["task", "exec", "-T", id, "--", "sh", "-c", "echo inside $UD_SESSION_PORT; exit 4"], { env: cliEnv });
  assert.equal(sh.stdout.toString().trim(), "inside 8888", sh.stderr.toString());
  assert.equal(sh.status, 4);
  const port = 20000 + Math.floor(Math.random() * 20000);
  const fwd = spawn(cli, ["task", "port-forward", id, "8888", "--local", String(port)], { env: cliEnv });
  try {
    // It says so once it listens and the task's port answered.
    await new Promise((resolve, reject) => {
      let err = "";
      fwd.stderr.on("data", (d) => { err += d; if (err.includes("forwarding")) resolve(); });
      fwd.on("exit", (code) => reject(new Error(`port-forward exited ${code}: ${err}`)));
    });
    const text = await fetch(`http://127.0.0.1:${port}/headers`).then((r) => r.text());
    assert.match(text, /host: 127\.0\.0\.1/);
  } finally {
    fwd.kill();
  }
  await api("POST", `/api/v1/tasks/${id}/cancel`, user, {});
});

test("the nodes page shows the node online, then offline when its agent stops", async () => {
  await page.locator("nav a", { hasText: "Nodes" }).click();
  const row = page.locator("tr[data-node=main-server]");
  await row.locator(".status [data-state=online]").waitFor();
  await row.locator("td", { hasText: "CPU" }).first().waitFor();
  await shot("07-nodes-online");
  // An operator drains the node and puts it back; a project user may not.
  await row.locator("[data-action=drain]").click();
  await page.locator("#flash", { hasText: "an admin token is required" }).waitFor();
  const ops = await browser.newPage();
  ops.setDefaultTimeout(WAIT);
  await ops.goto(BASE + "/");
  await ops.locator("input[name=token]").fill(ADMIN);
  await ops.getByRole("button", { name: "Sign in" }).click();
  await ops.locator("nav a", { hasText: "Nodes" }).click();
  const opsRow = ops.locator("tr[data-node=main-server]");
  await opsRow.locator("[data-action=drain]").click();
  await opsRow.locator(".status [data-state=draining]").waitFor();
  await row.locator(".status [data-state=draining]").waitFor(); // the user's page follows live
  await ops.screenshot({ path: path.join(ARTIFACTS, "07b-nodes-draining.png"), fullPage: true });
  await opsRow.locator("[data-action=resume]").click();
  await row.locator(".status [data-state=draining]").waitFor({ state: "detached" });
  await row.locator(".status [data-state=online]").waitFor();
  await ops.close();
  const pid = Number(readFileSync(`${STATE}/agent.pid`, "utf8").trim());
  process.kill(pid, "SIGTERM");
  await row.locator(".status [data-state=offline]").waitFor();
  await shot("08-nodes-offline");
});

test("every request stayed on the gateway, and no script error", () => {
  assert.deepEqual(pageErrors, []);
  const origin = new URL(BASE).host;
  const foreign = requests.filter((u) => !u.startsWith("data:") && new URL(u).host !== origin);
  assert.deepEqual(foreign, []);
  assert.ok(requests.some((u) => u.endsWith("/ui/app.js")));
});
