//! `ud-bench backup`: `unidesk backup` and `unidesk restore` of a million
//! events (and their read models), timed as whole commands, beside what the
//! same run takes to write those events and to `pg_dump` the read models.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ud_core::EventStore;
use ud_projections::{rebuild, Db};
use ud_schemas::streams;
use ud_testkit::{NatsOptions, NatsServer, PgDatabase};

use crate::backbone::{lifecycles, write_fast};

#[derive(Parser)]
pub struct Args {
    /// Events in the task stream (task lifecycles of four events).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Appends in flight while filling the stream.
    #[arg(long, default_value_t = 512)]
    window: usize,
}

fn unidesk() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("unidesk");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p unidesk`",
            bin.display()
        );
    }
    Ok(bin)
}

fn run(cmd: &mut Command, what: &str) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn task_stream_messages(store: &EventStore) -> Result<u64> {
    Ok(store
        .jetstream()
        .get_stream(streams::TASKS)
        .await?
        .info()
        .await?
        .state
        .messages)
}

pub async fn run_bench(a: Args) -> Result<()> {
    let bin = unidesk()?;
    let pg_bin = std::env::var("PG_BIN").ok();
    let nats = NatsServer::start_with(NatsOptions {
        sync_always: true,
        ..Default::default()
    })
    .await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    let pg = PgDatabase::create().await?;
    println!(
        "UniDesk backup benchmark: {} task events, hub syncing every write",
        a.events
    );

    let t = Instant::now();
    write_fast(&store, &lifecycles(a.events), a.window).await?;
    let write = t.elapsed().as_secs_f64();
    let db = Db::connect(&pg.url, "public", 8).await?;
    db.migrate().await?;
    rebuild::rebuild(&db, store.jetstream(), 5000).await?;
    let messages = task_stream_messages(&store).await?;

    let dir = tempfile::tempdir()?;
    let dump = dir.path().join("baseline.dump");
    let pg_dump = pg_bin.as_ref().map_or_else(
        || PathBuf::from("pg_dump"),
        |b| PathBuf::from(b).join("pg_dump"),
    );
    let baseline = run(
        Command::new(pg_dump)
            .args(["-Fc", "-f"])
            .arg(&dump)
            .arg(&pg.url),
        "pg_dump",
    )?;
    let backups = dir.path().join("backups");
    let mut backup = Command::new(&bin);
    backup
        .arg("backup")
        .arg("--dir")
        .arg(&backups)
        .env("UD_NATS_URL", nats.url())
        .env("UD_DATABASE_URL", &pg.url);
    if let Some(b) = &pg_bin {
        backup.env("UD_PG_BIN", b);
    }
    let backup_s = run(&mut backup, "unidesk backup")?;
    let folder = std::fs::read_dir(&backups)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("manifest.json").exists());
    let folder = folder.context("no backup folder")?;

    // Restore into new, empty servers.
    let nats2 = NatsServer::start_with(NatsOptions {
        sync_always: true,
        ..Default::default()
    })
    .await?;
    let pg2 = PgDatabase::create().await?;
    let mut restore = Command::new(&bin);
    restore
        .arg("restore")
        .arg(&folder)
        .env("UD_NATS_URL", nats2.url())
        .env("UD_DATABASE_URL", &pg2.url);
    if let Some(b) = &pg_bin {
        restore.env("UD_PG_BIN", b);
    }
    let restore_s = run(&mut restore, "unidesk restore")?;
    let store2 = EventStore::new(nats2.connect().await?, None);
    let restored = task_stream_messages(&store2).await?;
    let rows: i64 = pg2
        .connect()
        .await?
        .query_one("SELECT count(*) FROM tasks", &[])
        .await?
        .get(0);
    if restored != messages {
        bail!("restored {restored} of {messages} task events");
    }

    let mb = dir_bytes(&folder) as f64 / (1024.0 * 1024.0);
    println!(
        "writing the events (appends with concurrency checks)   {write:>8.1} s  ({:.0} events/s)",
        a.events as f64 / write
    );
    println!("pg_dump -Fc of the read models alone (baseline)        {baseline:>8.1} s");
    println!("unidesk backup (every stream + pg_dump)                {backup_s:>8.1} s  ({:.0} events/s, {mb:.0} MiB)", messages as f64 / backup_s);
    println!("unidesk restore (streams with sequences + pg_restore)  {restore_s:>8.1} s  ({:.0} events/s)", messages as f64 / restore_s);
    println!(
        "restored: {restored} task events, {rows} task rows; backup / writing: {:.2}",
        backup_s / write
    );
    Ok(())
}
