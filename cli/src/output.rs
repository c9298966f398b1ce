//! What the CLI prints: for people by default (tables and summaries), the
//! API's JSON with `--json` for scripts, as `gh` and `nomad` do.

use serde_json::Value;

/// Prints `v` as the API gave it (`--json`).
pub(crate) fn json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints `v` as JSON when asked, else as `human` renders it.
pub(crate) fn either(as_json: bool, v: &Value, human: impl FnOnce(&Value) -> String) {
    if as_json {
        json(v);
    } else {
        print!("{}", human(v));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows under a header, each column as wide as its widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// `key: value` lines, keys aligned; empty values left out.
fn fields(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    items
        .iter()
        .filter(|(_, v)| !v.is_empty() && v != "-")
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

fn short(commit: &Value) -> String {
    commit
        .as_str()
        .map_or_else(|| "-".into(), |c| c.chars().take(12).collect())
}

fn resources(r: &Value) -> String {
    let mut out = Vec::new();
    if let Some(c) = r["cpu_millis"].as_f64() {
        out.push(format!("{} CPUs", c / 1000.0));
    }
    if let Some(m) = r["memory_mb"].as_u64() {
        out.push(format!("{m} MiB"));
    }
    match (r["gpus"].as_u64(), r["gpu_model"].as_str()) {
        (Some(g), Some(m)) if g > 0 => out.push(format!("{g} GPUs ({m})")),
        (Some(g), None) if g > 0 => out.push(format!("{g} GPUs")),
        _ => {}
    }
    if let Some(l) = r["labels"].as_object().filter(|l| !l.is_empty()) {
        let labels: Vec<String> = l.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        out.push(format!("labels {}", labels.join(",")));
    }
    out.join(", ")
}

/// One task, as `unidesk show` prints it.
pub(crate) fn task(t: &Value) -> String {
    let spec = &t["spec"];
    let mut command: Vec<String> = Vec::new();
    for part in ["command", "args"] {
        command.extend(spec[part].as_array().into_iter().flatten().map(s));
    }
    let state = match (t["state"].as_str(), t["exit_code"].as_i64()) {
        (Some(st), Some(code)) => format!("{st} (exit code {code})"),
        (st, _) => st.unwrap_or("-").to_owned(),
    };
    let outputs: Vec<String> = t["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| format!("{} ({} bytes)", s(&o["path"]), s(&o["size"])))
        .collect();
    let mut out = fields(&[
        ("id", s(&t["id"])),
        ("name", t["name"].as_str().unwrap_or_default().to_owned()),
        ("project", s(&t["project"])),
        ("state", state),
        (
            "reason",
            t["reason"].as_str().unwrap_or_default().to_owned(),
        ),
        (
            "waiting",
            t["waiting_reason"].as_str().unwrap_or_default().to_owned(),
        ),
        (
            "preparing",
            t["preparing"]["step"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        ("node", s(&t["node_id"])),
        ("attempt", s(&t["attempt"])),
        (
            "queue",
            format!("{} (priority {})", s(&spec["queue"]), s(&t["priority"])),
        ),
        (
            "code",
            format!(
                "{} @ {}",
                s(&spec["code_repo_url"]),
                short(&spec["code_commit_id"])
            ),
        ),
        (
            "environment",
            match spec["image"].as_str() {
                Some(image) => format!("image {image}"),
                None => format!(
                    "{} @ {}, {}",
                    s(&spec["env_repo_url"]),
                    short(&spec["env_commit_id"]),
                    s(&spec["dockerfile_path"])
                ),
            },
        ),
        ("command", command.join(" ")),
        ("resources", resources(&spec["resources"])),
        ("timeout", format!("{} s", s(&spec["timeout_seconds"]))),
        (
            "submitted",
            format!("{} by {}", s(&t["submitted_at"]), s(&t["submitted_by"])),
        ),
        ("finished", s(&t["finished_at"])),
        ("image", s(&t["prepared"]["image_id"])),
    ]);
    if !outputs.is_empty() {
        out.push_str("outputs:\n");
        for o in outputs {
            out.push_str(&format!("  {o}\n"));
        }
    }
    out
}

/// Nodes as a table.
pub(crate) fn nodes(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let r = &n["resources"];
            vec![
                s(&n["id"]),
                s(&n["name"]),
                s(&n["status"]),
                s(&n["scheduling"]),
                r["cpu_millis"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |c| format!("{}", c / 1000.0)),
                r["memory_mb"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |m| format!("{} GiB", m / 1024)),
                r["gpus"]
                    .as_array()
                    .map_or_else(|| "0".into(), |g| g.len().to_string()),
                s(&n["running_tasks"]),
                s(&n["last_seen"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "SCHEDULING",
            "CPUS",
            "MEMORY",
            "GPUS",
            "RUNNING",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// One node.
pub(crate) fn node(n: &Value) -> String {
    let labels: Vec<String> = n["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", s(v)))
        .collect();
    let r = &n["resources"];
    let gpus: Vec<String> = r["gpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| format!("{} ({} MiB)", s(&g["model"]), s(&g["memory_mb"])))
        .collect();
    fields(&[
        ("id", s(&n["id"])),
        ("name", s(&n["name"])),
        ("status", s(&n["status"])),
        ("scheduling", s(&n["scheduling"])),
        ("labels", labels.join(", ")),
        (
            "capacity",
            format!(
                "{} CPUs, {} MiB, {} GPUs",
                r["cpu_millis"].as_f64().unwrap_or(0.0) / 1000.0,
                s(&r["memory_mb"]),
                gpus.len()
            ),
        ),
        ("gpus", gpus.join(", ")),
        (
            "in use",
            format!(
                "{} CPUs, {} MiB, {} GPUs",
                n["in_use"]["cpu_millis"].as_f64().unwrap_or(0.0) / 1000.0,
                s(&n["in_use"]["memory_mb"]),
                s(&n["in_use"]["gpus"])
            ),
        ),
        ("running", s(&n["running_tasks"])),
        ("disk free", format!("{} MiB", s(&n["disk_free_mb"]))),
        ("last seen", s(&n["last_seen"])),
        (
            "agent",
            format!("{} on {}", s(&r["agent_version"]), s(&r["os"])),
        ),
    ])
}

/// A task's history as a table.
pub(crate) fn history(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let d = &e["data"];
            let detail = ["reason", "node_id", "step", "exit_code", "attempt"]
                .iter()
                .filter(|k| !d[**k].is_null())
                .map(|k| format!("{k}={}", s(&d[*k])))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                s(&e["seq"]),
                s(&e["stored_at"]),
                s(&e["type"]),
                s(&e["actor"]),
                detail,
            ]
        })
        .collect();
    table(&["SEQ", "STORED", "EVENT", "ACTOR", "DETAIL"], &rows)
}

/// Queues as a table.
pub(crate) fn queues(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            let set = &q["settings"];
            vec![
                s(&q["name"]),
                s(&set["priority"]),
                s(&set["max_running"]),
                s(&set["lost_after_seconds"]),
                s(&q["pending"]),
                s(&q["running"]),
                s(&q["updated_by"]),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE", "PRIORITY", "LIMIT", "GRACE S", "PENDING", "RUNNING", "SET BY",
        ],
        &rows,
    )
}

/// Project secrets: names and versions (the API never returns a value).
/// Pipelines as a table.
pub(crate) fn pipelines(page: &Value) -> String {
    let rows: Vec<Vec<String>> = page["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let steps = p["steps"].as_array().map_or(0, Vec::len);
            let done = p["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| !matches!(s["state"].as_str(), Some("waiting" | "running")))
                .count();
            vec![
                s(&p["id"]),
                s(&p["project"]),
                s(&p["name"]),
                s(&p["status"]),
                format!("{done}/{steps}"),
            ]
        })
        .collect();
    table(&["ID", "PROJECT", "NAME", "STATUS", "STEPS ENDED"], &rows)
}

/// One pipeline: a summary line, then its steps.
pub(crate) fn pipeline(p: &Value) -> String {
    let rows: Vec<Vec<String>> = p["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            vec![
                s(&st["name"]),
                s(&st["state"]),
                s(&st["task_id"]),
                s(&st["runs"]),
                s(&st["reason"]),
            ]
        })
        .collect();
    let cancelling = if p["cancelling"].as_bool() == Some(true) && p["status"] == "running" {
        " (cancelling)"
    } else {
        ""
    };
    format!(
        "pipeline {} {} {}{cancelling}\n{}",
        s(&p["id"]),
        s(&p["name"]),
        s(&p["status"]),
        table(&["STEP", "STATE", "TASK", "RUNS", "REASON"], &rows)
    )
}

pub(crate) fn secrets(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list["secrets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                s(&x["project"]),
                s(&x["name"]),
                s(&x["version"]),
                s(&x["updated_by"]),
            ]
        })
        .collect();
    table(&["PROJECT", "NAME", "VERSION", "SET BY"], &rows)
}

pub(crate) fn schedules(list: &Value) -> String {
    let rows: Vec<Vec<String>> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                s(&x["id"]),
                s(&x["project"]),
                s(&x["name"]),
                format!("{} ({})", s(&x["cron"]), s(&x["timezone"])),
                s(&x["state"]),
                s(&x["next_due"]),
                s(&x["fired"]),
            ]
        })
        .collect();
    table(
        &["ID", "PROJECT", "NAME", "CRON", "STATE", "NEXT", "FIRED"],
        &rows,
    )
}

/// One schedule: what it submits, when, and how its last time went.
pub(crate) fn schedule(x: &Value) -> String {
    let what = if x["task"].is_object() {
        format!("task {}", s(&x["task"]["command"]))
    } else {
        format!("pipeline {}", s(&x["pipeline"]["name"]))
    };
    fields(&[
        ("id", s(&x["id"])),
        ("project", s(&x["project"])),
        ("name", s(&x["name"])),
        ("cron", format!("{} ({})", s(&x["cron"]), s(&x["timezone"]))),
        ("missed", s(&x["missed"])),
        ("submits", what),
        ("state", s(&x["state"])),
        ("paused", s(&x["paused_reason"])),
        ("next", s(&x["next_due"])),
        ("fired", s(&x["fired"])),
        ("skipped", s(&x["skipped"])),
        ("last time", s(&x["last_due"])),
        ("last task", s(&x["last_task_id"])),
        ("last pipeline", s(&x["last_pipeline_id"])),
        ("last error", s(&x["last_error"])),
        ("created by", s(&x["created_by"])),
    ])
}

/// What an accepted command did to a task.
pub(crate) fn accepted(what: &str) -> impl FnOnce(&Value) -> String + '_ {
    move |v| {
        format!(
            "{what} {} (stream sequence {})\n",
            s(&v["task_id"]),
            s(&v["seq"])
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_line_up_and_tasks_read_as_summaries() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
        let shown = task(&json!({
            "id": "t1", "project": "lab", "state": "failed", "exit_code": 3,
            "reason": "exited with code 3", "attempt": 1, "priority": 0,
            "spec": {"queue": "default", "command": ["sh", "-c"], "args": ["exit 3"],
                     "code_commit_id": "0123456789abcdef0123", "resources": {"cpu_millis": 500, "memory_mb": 64, "gpus": 0}},
            "outputs": [{"path": "out.txt", "size": 4}]
        }));
        assert!(
            shown.contains("state:       failed (exit code 3)"),
            "{shown}"
        );
        assert!(shown.contains("command:     sh -c exit 3"), "{shown}");
        assert!(shown.contains("@ 0123456789ab"), "{shown}");
        assert!(shown.contains("  out.txt (4 bytes)"), "{shown}");
        assert!(!shown.contains("name:"), "{shown}");
    }
}
