//! What must hold after every run, whatever the fault was.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use serde_json::Value;
use ud_schemas::streams;

use super::load::{Fixture, Kind, Submitted};
use super::stack::Stack;

pub const FINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

/// Waits until every task is in a final state; the ones that are not.
pub async fn until_final(stack: &Stack, tasks: &[Submitted], bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    let mut open: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    loop {
        let mut still = Vec::new();
        for id in open {
            let state = stack
                .get(&format!("/api/v1/tasks/{id}"))
                .await
                .ok()
                .and_then(|t| t["state"].as_str().map(str::to_owned));
            if !state.is_some_and(|s| FINAL.contains(&s.as_str())) {
                still.push(id);
            }
        }
        if still.is_empty() || Instant::now() > deadline {
            return still;
        }
        open = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every task: it exists, it ended once, its outcome belongs to a run that
/// started, its limit held, its log lines and output are all there.
pub async fn tasks(stack: &Stack, tasks: &[Submitted]) -> Vec<String> {
    let mut out = Vec::new();
    for t in tasks {
        if let Err(e) = task(stack, t, &mut out).await {
            out.push(format!("task {}: cannot be checked: {e:#}", t.id));
        }
    }
    out
}

async fn task(stack: &Stack, t: &Submitted, out: &mut Vec<String>) -> Result<()> {
    let id = &t.id;
    let Ok(view) = stack.get(&format!("/api/v1/tasks/{id}")).await else {
        out.push(format!("task {id}: acknowledged, but not found"));
        return Ok(());
    };
    let events = stack.get(&format!("/api/v1/tasks/{id}/events")).await?;
    let events = events.as_array().cloned().unwrap_or_default();
    let kind_of = |e: &Value| {
        e["type"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches("task.")
            .to_owned()
    };
    let ends: Vec<(usize, String)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (i, kind_of(e)))
        .filter(|(_, k)| FINAL.contains(&k.as_str()))
        .collect();
    let state = view["state"].as_str().unwrap_or_default();
    let [(end_at, end)] = ends.as_slice() else {
        let kinds: Vec<&String> = ends.iter().map(|(_, k)| k).collect();
        out.push(format!(
            "task {id}: {} final events {kinds:?} (state {state})",
            ends.len()
        ));
        return Ok(());
    };
    if end != state {
        out.push(format!(
            "task {id}: ended {end} but the read model says {state}"
        ));
    }
    if t.kind == Kind::Timed && end == "succeeded" {
        out.push(format!(
            "task {id}: succeeded although its {} s limit ends it first",
            super::load::TIMED_LIMIT
        ));
    }
    // The attempt the outcome belongs to started before it.
    let attempt = events[..*end_at]
        .iter()
        .filter(|e| kind_of(e) == "assigned")
        .filter_map(|e| e["data"]["attempt"].as_u64())
        .max();
    // A run that failed before its container ran (fetching, building) has no start.
    let ran = match end.as_str() {
        "succeeded" | "timed_out" => true,
        "failed" => !events[*end_at]["data"]["exit_code"].is_null(),
        _ => false,
    };
    if ran {
        let started = events[..*end_at]
            .iter()
            .any(|e| kind_of(e) == "started" && e["data"]["attempt"].as_u64() == attempt);
        if !started {
            out.push(format!(
                "task {id}: {end} without a start of its attempt {attempt:?}"
            ));
        }
    }
    if end != "succeeded" || t.kind == Kind::Timed {
        return Ok(());
    }
    // Every log line of the attempt once, in order.
    let attempt = attempt.unwrap_or(1);
    let mut text = String::new();
    let mut after = 0u64;
    loop {
        let page = stack
            .get(&format!("/api/v1/tasks/{id}/logs?after={after}"))
            .await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        for l in &lines {
            if l["attempt"].as_u64() == Some(attempt) {
                text.push_str(l["text"].as_str().unwrap_or_default());
            }
        }
        let next = page["next"].as_u64().unwrap_or(after);
        if lines.is_empty() || next <= after {
            break;
        }
        after = next;
    }
    let got: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let want: Vec<String> = (1..=t.kind.lines()).map(|i| format!("line {i}")).collect();
    if got != want {
        out.push(format!(
            "task {id}: attempt {attempt} logged {got:?}, not {} numbered lines",
            want.len()
        ));
    }
    // Its output, downloaded from the object store.
    let output = view["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["path"] == "out.txt"))
        .cloned();
    match output.as_ref().and_then(|o| o["download"]["url"].as_str()) {
        None => out.push(format!("task {id}: succeeded without its output out.txt")),
        Some(url) => {
            let body = stack.http.get(url).send().await?.text().await?;
            if body.trim() != Fixture::expected_output() {
                out.push(format!("task {id}: out.txt holds {body:?}"));
            }
        }
    }
    Ok(())
}

/// The read models equal a replay of the streams into an empty schema
/// (`unidesk projections rebuild`); asked again while the live side catches up.
pub async fn read_models(stack: &Stack) -> Option<String> {
    let mut last = String::new();
    for _ in 0..10 {
        let out = tokio::process::Command::new(&stack.bins.unidesk)
            .args(["projections", "rebuild", "--json"])
            .env("UD_NATS_URL", stack.nats_url())
            .env("UD_DATABASE_URL", stack.pg.url())
            .output()
            .await;
        match out {
            Ok(o) => {
                let report: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
                if report["equal"] == true {
                    return None;
                }
                last = format!(
                    "{} {}",
                    report["differences"],
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Some(format!(
        "the read models differ from a clean replay: {last}"
    ))
}

/// What the hub stored about nodes since `since` (ms): heartbeats and offline events.
pub async fn node_timeline(
    stack: &Stack,
    since: i64,
) -> Result<BTreeMap<String, Vec<(i64, bool)>>> {
    let client = stack.nats().await?;
    let js = async_nats::jetstream::new(client);
    let mut out: BTreeMap<String, Vec<(i64, bool)>> = BTreeMap::new();
    for (stream, filter, heartbeat) in [
        (streams::HEARTBEATS, "ud.node.*.heartbeat", true),
        (streams::NODES, "ud.node.*.offline", false),
    ] {
        let s = js.get_stream(stream).await?;
        let mut pending = s.get_info().await?.state.messages;
        if pending == 0 {
            continue;
        }
        let consumer = s
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.into(),
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_secs(2), messages.next()).await
        {
            let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let at = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
            let node = m.subject.split('.').nth(2).unwrap_or_default().to_owned();
            if at >= since {
                out.entry(node).or_default().push((at, heartbeat));
            }
            pending = info.pending;
            if pending == 0 {
                break;
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

/// Offline events exactly once per silence: none while the node is heard,
/// never two without a heartbeat between, and a long silence always noticed.
pub fn transitions(
    timeline: &BTreeMap<String, Vec<(i64, bool)>>,
    names: &HashMap<String, String>,
    offline_after_ms: i64,
) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut offline = 0;
    for (node, events) in timeline {
        let name = names.get(node).cloned().unwrap_or_else(|| node.clone());
        let (mut last_beat, mut declared) = (None::<i64>, false);
        for &(at, heartbeat) in events {
            if heartbeat {
                if let Some(prev) = last_beat {
                    let gap = at - prev;
                    if gap > 2 * offline_after_ms + 3_000 && !declared {
                        out.push(format!(
                            "{name}: silent for {:.1} s and never declared offline",
                            gap as f64 / 1e3
                        ));
                    }
                }
                last_beat = Some(at);
                declared = false;
            } else {
                offline += 1;
                if declared {
                    out.push(format!(
                        "{name}: declared offline twice without a heartbeat between"
                    ));
                }
                if let Some(prev) = last_beat {
                    if at - prev < offline_after_ms / 2 {
                        out.push(format!(
                            "{name}: declared offline {:.1} s after a heartbeat",
                            (at - prev) as f64 / 1e3
                        ));
                    }
                }
                declared = true;
            }
        }
    }
    (out, offline)
}

/// Samples the containers the agents run, by their labels: one attempt
/// of a task never runs in two containers at once.
pub struct Containers {
    pub seen: Arc<Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Containers {
    pub fn watch() -> Result<Self> {
        let docker = bollard::Docker::connect_with_local_defaults()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let found = seen.clone();
        tokio::spawn(async move {
            let filters = HashMap::from([("label".to_owned(), vec!["io.unidesk.task".to_owned()])]);
            loop {
                let list = docker
                    .list_containers(Some(bollard::query_parameters::ListContainersOptions {
                        filters: Some(filters.clone()),
                        ..Default::default()
                    }))
                    .await
                    .unwrap_or_default();
                let mut runs: HashMap<(String, String), Vec<String>> = HashMap::new();
                for c in list {
                    let labels = c.labels.unwrap_or_default();
                    let key = (
                        labels.get("io.unidesk.task").cloned().unwrap_or_default(),
                        labels
                            .get("io.unidesk.attempt")
                            .cloned()
                            .unwrap_or_default(),
                    );
                    runs.entry(key)
                        .or_default()
                        .push(labels.get("io.unidesk.node").cloned().unwrap_or_default());
                }
                for ((task, attempt), nodes) in runs {
                    if nodes.len() > 1 {
                        let v = format!("task {task}: attempt {attempt} running in {} containers at once (nodes {nodes:?})", nodes.len());
                        let mut seen = found.lock().unwrap();
                        if !seen.contains(&v) {
                            seen.push(v);
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = stopped.changed() => return,
                }
            }
        });
        Ok(Self { seen, stop })
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(events: &[(i64, bool)]) -> (Vec<String>, usize) {
        let timeline = BTreeMap::from([("n".to_owned(), events.to_vec())]);
        transitions(&timeline, &HashMap::new(), 5_000)
    }

    #[test]
    fn offline_events_once_per_silence() {
        // Heard every second, silent 8 s, declared once, heard again.
        let ok = [
            (0, true),
            (1_000, true),
            (6_000, false),
            (9_000, true),
            (10_000, true),
        ];
        assert_eq!(check(&ok), (vec![], 1));
        // Declared while heard.
        let (v, _) = check(&[(0, true), (1_000, true), (1_500, false)]);
        assert!(v[0].contains("after a heartbeat"), "{v:?}");
        // Declared twice for one silence.
        let (v, n) = check(&[(0, true), (6_000, false), (7_000, false), (9_000, true)]);
        assert_eq!(n, 2);
        assert!(v.iter().any(|m| m.contains("twice")), "{v:?}");
        // A long silence never declared.
        let (v, _) = check(&[(0, true), (20_000, true)]);
        assert!(v[0].contains("never declared"), "{v:?}");
    }
}
