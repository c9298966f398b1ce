//! `ud-bench faults`: the whole platform on this machine under a steady load
//! of tasks, with faults injected at random times from a seed: kills (-9)
//! of the hub, a main server, an agent, a leaf server; a node's link cut
//! shorter and longer than the offline timeout; PostgreSQL restarted; the
//! object store down; a node's disk full; a node's clock minutes off. After
//! each run it checks what must hold whatever happened (see `checks`), and
//! at the end it prints one table: fault, runs, violations, time to recover.

mod checks;
mod load;
mod stack;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::stats::percentile;
use load::{Fixture, Load, Submitted};
use stack::{Stack, Timing};

#[derive(clap::Args)]
pub struct Args {
    /// The seed every random choice follows (default: drawn, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Runs, each with one fault; the faults take turns in an order drawn from the seed.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Only these faults (comma-separated names, see the table).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Submissions per second during a run.
    #[arg(long, default_value_t = 1.5)]
    rate: f64,
    /// Main servers (1 or more).
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Compute nodes (the last one with its work directory on a small disk).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Keep the work directory (logs of every process) even when nothing was violated.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    HubKill,
    ServerKill,
    AgentKill,
    LeafKill,
    LinkCutShort,
    LinkCutLong,
    PgRestart,
    StoreDown,
    DiskFull,
    ClockOff,
}

const ALL: [Fault; 10] = [
    Fault::HubKill,
    Fault::ServerKill,
    Fault::AgentKill,
    Fault::LeafKill,
    Fault::LinkCutShort,
    Fault::LinkCutLong,
    Fault::PgRestart,
    Fault::StoreDown,
    Fault::DiskFull,
    Fault::ClockOff,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::HubKill => "hub-kill",
            Fault::ServerKill => "server-kill",
            Fault::AgentKill => "agent-kill",
            Fault::LeafKill => "leaf-kill",
            Fault::LinkCutShort => "link-cut-short",
            Fault::LinkCutLong => "link-cut-long",
            Fault::PgRestart => "pg-restart",
            Fault::StoreDown => "store-down",
            Fault::DiskFull => "disk-full",
            Fault::ClockOff => "clock-off",
        }
    }
}

/// One run's result.
struct Run {
    fault: Fault,
    what: String,
    recovered: Option<Duration>,
    violations: Vec<String>,
    tasks: usize,
    offline: usize,
}

const TIMING: Timing = Timing {
    heartbeat: 1,
    offline_after: 5,
    lost_after: 8,
};

fn secs(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

/// Injects `fault`, holds it, heals it; says what was done.
async fn inject(fault: Fault, stack: &mut Stack, rng: &mut StdRng) -> Result<String> {
    let t = &TIMING;
    let offline = t.offline_after as f64;
    let node = rng.gen_range(0..stack.nodes.len());
    Ok(match fault {
        Fault::HubKill => {
            let d = secs(rng, 0.2, 4.0);
            stack.hub.kill().await?;
            tokio::time::sleep(d).await;
            stack.hub.restart().await?;
            format!("hub down {:.1} s", d.as_secs_f64())
        }
        Fault::ServerKill => {
            let i = rng.gen_range(0..stack.servers.len());
            let d = secs(rng, 0.2, 6.0);
            stack.servers[i].kill9().await?;
            tokio::time::sleep(d).await;
            stack.servers[i].spawn()?;
            stack.until_ready(i, Duration::from_secs(120)).await?;
            format!("{} down {:.1} s", stack.servers[i].name, d.as_secs_f64())
        }
        Fault::AgentKill => {
            let d = secs(rng, 0.2, 3.0 * offline);
            let n = &mut stack.nodes[node];
            n.agent.kill9().await?;
            tokio::time::sleep(d).await;
            n.agent.spawn()?;
            format!("{} agent down {:.1} s", n.name, d.as_secs_f64())
        }
        Fault::LeafKill => {
            let d = secs(rng, 0.2, 2.0 * offline);
            let n = &mut stack.nodes[node];
            n.leaf.kill9().await?;
            tokio::time::sleep(d).await;
            n.leaf.spawn()?;
            format!("{} leaf down {:.1} s", n.name, d.as_secs_f64())
        }
        Fault::LinkCutShort => {
            let d = secs(rng, 0.2, 0.6 * offline);
            let n = &stack.nodes[node];
            n.relay.cut();
            tokio::time::sleep(d).await;
            n.relay.restore();
            format!("{} link cut {:.1} s", n.name, d.as_secs_f64())
        }
        Fault::LinkCutLong => {
            let lo = offline + t.lost_after as f64 + 2.0;
            let d = secs(rng, 1.2 * offline, lo + 10.0);
            let n = &stack.nodes[node];
            n.relay.cut();
            tokio::time::sleep(d).await;
            n.relay.restore();
            format!("{} link cut {:.1} s", n.name, d.as_secs_f64())
        }
        Fault::PgRestart => {
            let d = secs(rng, 0.2, 5.0);
            stack.pg.crash().await?;
            tokio::time::sleep(d).await;
            stack.pg.start_again().await?;
            format!("PostgreSQL down {:.1} s", d.as_secs_f64())
        }
        Fault::StoreDown => {
            let d = secs(rng, 2.0, 15.0);
            stack.garage.stop().await?;
            tokio::time::sleep(d).await;
            stack.garage.restart().await?;
            format!("object store down {:.1} s", d.as_secs_f64())
        }
        Fault::DiskFull => {
            let d = secs(rng, 2.0, 12.0);
            let Some((n, disk)) = stack
                .nodes
                .iter()
                .find_map(|n| n.disk.as_ref().map(|d| (n, d)))
            else {
                bail!("no node has a small disk (mounting a tmpfs needs root)");
            };
            disk.fill()?;
            tokio::time::sleep(d).await;
            disk.unfill()?;
            format!("{} disk full {:.1} s", n.name, d.as_secs_f64())
        }
        Fault::ClockOff => {
            let minutes = rng.gen_range(2..=10) * if rng.gen_bool(0.5) { 1 } else { -1 };
            let d = secs(rng, 3.0, 15.0);
            let n = &mut stack.nodes[node];
            n.agent.kill9().await?;
            n.spawn_agent_skewed(minutes * 60)?;
            tokio::time::sleep(d).await;
            n.agent.kill9().await?;
            n.agent.spawn()?;
            format!(
                "{} clock {minutes:+} min for {:.1} s",
                n.name,
                d.as_secs_f64()
            )
        }
    })
}

async fn one_run(
    stack: &mut Stack,
    fixture: &Fixture,
    fault: Fault,
    rng: &mut StdRng,
    rate: f64,
) -> Result<Run> {
    let since = ud_schemas::now_millis() - 1_000;
    let containers = checks::Containers::watch()?;
    let mut draws = StdRng::seed_from_u64(rng.gen());
    let load = Load::start(stack, fixture, rate, move || draws.gen());
    tokio::time::sleep(secs(rng, 1.0, 4.0)).await;
    let what = inject(fault, stack, rng)
        .await
        .with_context(|| format!("injecting {}", fault.name()))?;
    let mut violations = Vec::new();
    let healed = Instant::now();
    let recovered = match load::probe(stack, fixture, Duration::from_secs(180)).await {
        Ok((id, _)) => {
            let online = Instant::now() + Duration::from_secs(60);
            while !stack.all_online().await && Instant::now() < online {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !stack.all_online().await {
                violations.push("a node is not back online 60 s after the probe".to_owned());
            }
            Some((id, healed.elapsed()))
        }
        Err(e) => {
            violations.push(format!("not recovered: {e:#}"));
            None
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut tasks, _refused) = load.stop().await;
    if let Some((id, _)) = &recovered {
        tasks.push(Submitted {
            id: id.clone(),
            kind: load::Kind::Short,
        });
    }
    let open = checks::until_final(stack, &tasks, Duration::from_secs(240)).await;
    for id in &open {
        violations.push(format!(
            "task {id}: not in a final state 240 s after the run"
        ));
    }
    violations.extend(checks::tasks(stack, &tasks).await);
    violations.extend(containers.take());
    let names: HashMap<String, String> = stack
        .nodes
        .iter()
        .map(|n| (n.id.clone(), n.name.clone()))
        .collect();
    let timeline = checks::node_timeline(stack, since)
        .await
        .context("reading the nodes' heartbeats and offline events")?;
    let (node_violations, offline) =
        checks::transitions(&timeline, &names, TIMING.offline_after as i64 * 1_000);
    violations.extend(node_violations);
    violations.extend(checks::read_models(stack).await);
    for s in &mut stack.servers {
        if let Some(status) = s.exited() {
            violations.push(format!("{} ended on its own ({status})", s.name));
        }
    }
    for n in &mut stack.nodes {
        if let Some(status) = n.agent.exited() {
            violations.push(format!("{} agent ended on its own ({status})", n.name));
        }
    }
    Ok(Run {
        fault,
        what,
        recovered: recovered.map(|(_, d)| d),
        violations,
        tasks: tasks.len(),
        offline,
    })
}

pub async fn run(a: Args) -> Result<()> {
    let seed = a.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = if a.faults.is_empty() {
        ALL.to_vec()
    } else {
        let mut picked = Vec::new();
        for name in &a.faults {
            match ALL.iter().find(|f| f.name() == name) {
                Some(f) => picked.push(*f),
                None => bail!(
                    "unknown fault {name:?}; the faults: {}",
                    ALL.map(Fault::name).join(", ")
                ),
            }
        }
        picked
    };
    if faults.contains(&Fault::ClockOff) && !stack::faketime_available() {
        bail!("clock-off needs libfaketime (Debian package faketime); leave it out with --faults");
    }
    println!(
        "fault suite: seed {seed}, {} runs, {} main servers, {} nodes, {} submissions/s (replay with --seed {seed})",
        a.runs, a.servers, a.nodes, a.rate
    );
    let mut stack = Stack::start(a.servers, a.nodes, TIMING).await?;
    if faults.contains(&Fault::DiskFull) && stack.nodes.iter().all(|n| n.disk.is_none()) {
        bail!("disk-full needs a node on a tmpfs of its own (mounting one needs root, and 2 nodes or more); leave it out with --faults");
    }
    println!("stack up; logs in {}", stack.logs.display());
    let fixture = Fixture::create(&stack).await?;
    // Every node builds the environment once before the faults begin.
    for _ in 0..stack.nodes.len() {
        load::probe(&stack, &fixture, Duration::from_secs(300)).await?;
    }
    let mut order = Vec::new();
    let mut results = Vec::new();
    // The runs race a stop signal: whatever ends them, the stack is stopped
    // below, so no server, agent or container outlives the suite.
    let runs = async {
        for i in 0..a.runs {
            if order.is_empty() {
                faults.shuffle(&mut rng);
                order = faults.clone();
                order.reverse();
            }
            let fault = order.pop().expect("refilled above");
            let started = Instant::now();
            let run = one_run(&mut stack, &fixture, fault, &mut rng, a.rate).await?;
            print_run(i + 1, &run, started.elapsed());
            results.push(run);
        }
        anyhow::Ok(())
    };
    let ended = tokio::select! {
        r = runs => r,
        signal = stop_signal() => Err(anyhow::anyhow!("stopped by {signal}")),
    };
    let violated = results.iter().any(|r| !r.violations.is_empty());
    if !results.is_empty() {
        print_table(&results);
    }
    let kept = stack.stop(violated || a.keep || ended.is_err()).await?;
    if let Some(dir) = kept {
        println!("work directory kept: {}", dir.display());
    }
    ended.with_context(|| format!("after {} of {} runs (seed {seed})", results.len(), a.runs))?;
    if violated {
        bail!("violations found (seed {seed})");
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM with the signal's name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn print_run(n: usize, run: &Run, took: Duration) {
    println!(
        "run {:>3} {:<15} {:<36} tasks {:>3}  recovered {:>6}  {:>5.1} s  {}",
        n,
        run.fault.name(),
        run.what,
        run.tasks,
        run.recovered
            .map_or("never".into(), |d| format!("{:.2} s", d.as_secs_f64())),
        took.as_secs_f64(),
        if run.violations.is_empty() {
            "ok".to_owned()
        } else {
            format!("{} VIOLATIONS", run.violations.len())
        }
    );
    for v in &run.violations {
        println!("      - {v}");
    }
}

fn print_table(results: &[Run]) {
    let mut by: BTreeMap<Fault, Vec<&Run>> = BTreeMap::new();
    for r in results {
        by.entry(r.fault).or_default().push(r);
    }
    println!();
    println!(
        "{:<15} {:>5} {:>6} {:>10} {:>8} {:>13} {:>13}",
        "fault", "runs", "tasks", "violations", "offline", "recover p50", "recover p99"
    );
    for (fault, runs) in by {
        let mut rec: Vec<Duration> = runs.iter().filter_map(|r| r.recovered).collect();
        rec.sort();
        let p = |q: f64| {
            if rec.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.2} s", percentile(&rec, q).as_secs_f64())
            }
        };
        println!(
            "{:<15} {:>5} {:>6} {:>10} {:>8} {:>13} {:>13}",
            fault.name(),
            runs.len(),
            runs.iter().map(|r| r.tasks).sum::<usize>(),
            runs.iter().map(|r| r.violations.len()).sum::<usize>(),
            runs.iter().map(|r| r.offline).sum::<usize>(),
            p(0.5),
            p(0.99)
        );
    }
}
