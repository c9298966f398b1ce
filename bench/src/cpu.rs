//! CPU time per process group, from /proc: where a benchmark's CPU goes.

use std::collections::BTreeMap;
use std::path::Path;

/// CPU seconds (user + system) of every process, by pid, with its name and
/// command line.
fn processes() -> Vec<(u32, String, String, f64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(n, _)| n.to_owned())
            .unwrap_or_default();
        let after: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            after
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let cpu = (ticks(11) + ticks(12)) / 100.0;
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, name, cmdline, cpu));
    }
    out
}

/// CPU seconds by group: the hub's nats-servers (their directories
/// given), the other nats-servers (the nodes' leaf servers), PostgreSQL,
/// and this process (the main server, the simulated agents and the HTTP
/// client, which share it).
pub fn by_group(hub_dirs: &[&Path]) -> BTreeMap<&'static str, f64> {
    let me = std::process::id();
    let hubs: Vec<String> = hub_dirs.iter().map(|d| d.display().to_string()).collect();
    let mut groups = BTreeMap::new();
    for (pid, name, cmdline, cpu) in processes() {
        let group = if pid == me {
            "this process: main server + simulated agents + HTTP client"
        } else if name == "nats-server" && hubs.iter().any(|h| cmdline.contains(h.as_str())) {
            "hub nats-server"
        } else if name == "nats-server" {
            "nodes' leaf nats-servers"
        } else if name == "postgres" {
            "PostgreSQL (all its processes)"
        } else {
            continue;
        };
        *groups.entry(group).or_insert(0.0) += cpu;
    }
    groups
}

/// Prints what each group spent between two snapshots, per task and as a
/// share of the wall time (100 % is one core).
pub fn print_delta(
    before: &BTreeMap<&'static str, f64>,
    after: &BTreeMap<&'static str, f64>,
    wall_seconds: f64,
    tasks: u64,
) {
    let total: f64 = after
        .iter()
        .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
        .sum();
    println!(
        "  CPU by process over the run (100 % = one core; {:.1} cores in all):",
        total / wall_seconds.max(1e-9)
    );
    let mut rows: Vec<(&str, f64)> = after
        .iter()
        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (group, secs) in rows {
        println!(
            "    {group:<62} {:>6.1} %  {:>7.1} µs/task",
            secs / wall_seconds.max(1e-9) * 100.0,
            secs / tasks.max(1) as f64 * 1e6
        );
    }
}
