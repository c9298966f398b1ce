//! Peer baselines measured in the same run as UniDesk's figures.
//!
//! The lifecycle's is no-op tasks through Celery with a RabbitMQ broker and
//! PostgreSQL results (`bench/baseline/celery_noop.py`), timed from the first
//! submission until every result is stored. `scripts/bench.sh lifecycle`
//! starts a private broker and names it in `UD_BENCH_CELERY_BROKER` and the
//! result database in `UD_BENCH_CELERY_RESULTS`; without them the baseline
//! is not measured (and no ratio printed).

use anyhow::{anyhow, Context, Result};

use crate::stats::line;

/// Celery's no-op tasks per second for `tasks` tasks, or `None` where no
/// broker is set up for it.
pub async fn celery(tasks: usize) -> Result<Option<f64>> {
    let (Ok(broker), Ok(results)) = (
        std::env::var("UD_BENCH_CELERY_BROKER"),
        std::env::var("UD_BENCH_CELERY_RESULTS"),
    ) else {
        println!("  baseline: Celery + RabbitMQ + PostgreSQL not measured (scripts/bench.sh lifecycle sets it up)");
        return Ok(None);
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/baseline/celery_noop.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--broker", &broker, "--results", &results])
        .args(["--tasks", &tasks.to_string()])
        .output()
        .await
        .context("running the Celery baseline")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = text
        .lines()
        .find_map(|l| l.strip_prefix("celery "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|r| r.parse::<f64>().ok());
    let Some(rate) = figure.filter(|_| out.status.success()) else {
        return Err(anyhow!(
            "the Celery baseline failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    };
    line(
        &format!("baseline: Celery + RabbitMQ + PostgreSQL, {tasks} no-op tasks"),
        rate,
        "tasks/s",
        None,
    );
    Ok(Some(rate))
}
