//! `unidesk backup` and `unidesk restore`: every JetStream stream (the
//! source of truth) message by message, with its configuration and
//! sequence numbers, and a PostgreSQL dump (`pg_dump -Fc`) of the read
//! models, into one folder per backup under the backup directory, keeping
//! the newest `--keep`.
//!
//! A backup folder holds `manifest.json`, `streams/<STREAM>.bin` (records:
//! a big-endian u32 length, then the CBOR of [`Record`]) and
//! `postgres.dump`. Restore re-creates each stream starting at its first
//! sequence and publishes the messages in order, so sequences (which the
//! read models' checkpoints name) come back as they were, then restores the
//! dump.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream::Config;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::serve::{DbArgs, NatsArgs, StorageArgs};
use ud_storage::keys::BACKUPS_PREFIX;
use ud_storage::Storage;

/// Publishes in flight while a stream is restored. A hub that syncs every
/// write takes them at its sync rate whatever the window (4,096 measured no
/// faster than 256).
const RESTORE_IN_FLIGHT: usize = 256;

/// The backup directory: one folder per backup, named by its time.
#[derive(Args)]
pub struct BackupDir {
    /// The backup directory: one folder per backup, named by its time (a
    /// backup fetched from the object store is put there too).
    #[arg(
        long = "dir",
        env = "UD_BACKUP_DIR",
        default_value = "/var/lib/unidesk/backups"
    )]
    path: PathBuf,
}

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    dir: BackupDir,
    /// How many backups to keep (older ones are deleted after a backup succeeds).
    #[arg(long, default_value_t = 7)]
    keep: usize,
    /// Folder with pg_dump and pg_restore (default: found on PATH).
    #[arg(long, env = "UD_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// Also copy the backup to the object store (the UD_S3_* settings), under
    /// `backups/<name>/`, keeping the newest `--keep` there as well.
    #[arg(long, env = "UD_BACKUP_TO_OBJECT_STORE")]
    to_object_store: bool,
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    db: DbArgs,
    /// The backup folder to restore (one of those `unidesk backup` made); with
    /// `--from-object-store`, the backup's name there, or `latest`.
    from: PathBuf,
    /// Fetch the backup from the object store (into the backup directory) first.
    #[arg(long)]
    from_object_store: bool,
    // Where a backup fetched from the object store is put.
    #[command(flatten)]
    dir: BackupDir,
    #[command(flatten)]
    storage: StorageArgs,
    /// Replace streams that already hold messages (otherwise restore refuses).
    #[arg(long)]
    force: bool,
    #[arg(long, env = "UD_PG_BIN")]
    pg_bin: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
pub struct Manifest {
    pub created_at: String,
    pub streams: Vec<StreamBackup>,
}

#[derive(Serialize, Deserialize)]
pub struct StreamBackup {
    pub name: String,
    pub config: serde_json::Value,
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
}

/// One stored message.
#[derive(Serialize, Deserialize)]
struct Record {
    seq: u64,
    subject: String,
    headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

fn pg_tool(bin: &Option<PathBuf>, name: &str) -> PathBuf {
    bin.as_ref()
        .map_or_else(|| PathBuf::from(name), |b| b.join(name))
}

/// Headers that were conditions of the original publish, not part of the event.
fn kept_header(name: &str) -> bool {
    !name.starts_with("Nats-Expected")
}

fn object_store(args: &StorageArgs) -> Result<Storage> {
    args.storage()?.context(
        "the object store is not configured (set UD_S3_BUCKET and the other UD_S3_* settings)",
    )
}

/// Copies a finished backup folder to `backups/<name>/`: the streams and the
/// dump first, the manifest last, so a copy cut short has no manifest and is
/// never taken for a backup. Then keeps the newest `keep` there.
async fn upload(storage: &Storage, dir: &Path, name: &str, keep: usize) -> Result<()> {
    let prefix = format!("{BACKUPS_PREFIX}{name}/");
    let mut files: Vec<String> = std::fs::read_dir(dir.join("streams"))?
        .flatten()
        .map(|e| format!("streams/{}", e.file_name().to_string_lossy()))
        .collect();
    files.sort();
    files.push("postgres.dump".into());
    for rel in &files {
        storage
            .put_file(
                &format!("{prefix}{rel}"),
                &dir.join(rel),
                "application/octet-stream",
            )
            .await
            .with_context(|| format!("cannot copy {rel} to the object store"))?;
    }
    storage
        .put_file(
            &format!("{prefix}manifest.json"),
            &dir.join("manifest.json"),
            "application/json",
        )
        .await
        .context("cannot copy manifest.json to the object store")?;
    let objects = storage.list(BACKUPS_PREFIX).await?;
    let complete = stored_backups(&objects);
    let excess = complete.len().saturating_sub(keep.max(1));
    // Old backups beyond `keep`, and copies older than this one that never finished.
    let doomed = |key: &str| {
        let Some(folder) = key
            .strip_prefix(BACKUPS_PREFIX)
            .and_then(|k| k.split('/').next())
        else {
            return false;
        };
        complete[..excess].iter().any(|c| c == folder)
            || (folder < name && !complete.iter().any(|c| c == folder))
    };
    for o in objects.iter().filter(|o| doomed(&o.key)) {
        storage.delete(&o.key).await?;
    }
    eprintln!(
        "copied to the object store as {prefix}; {} kept there",
        complete.len() - excess
    );
    Ok(())
}

/// The names of the complete backups (those with a manifest) in a listing
/// of `backups/`, oldest first (names are times).
fn stored_backups(objects: &[ud_storage::ObjectInfo]) -> Vec<String> {
    let mut names: Vec<String> = objects
        .iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(BACKUPS_PREFIX)?
                .strip_suffix("/manifest.json")
                .filter(|n| !n.is_empty() && !n.contains('/') && !n.starts_with('.'))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// Fetches the backup `name` (or the newest, for `latest`) from the object
/// store into `dir/<name>`, manifest last; the folder it made.
async fn download(storage: &Storage, dir: &Path, name: &str) -> Result<PathBuf> {
    let objects = storage.list(BACKUPS_PREFIX).await?;
    let complete = stored_backups(&objects);
    let name = if name == "latest" {
        complete
            .last()
            .cloned()
            .context("the object store holds no complete backup")?
    } else if complete.iter().any(|c| c == name) {
        name.to_owned()
    } else {
        bail!(
            "no complete backup named {name:?} in the object store (there: {})",
            if complete.is_empty() {
                "none".into()
            } else {
                complete.join(", ")
            }
        );
    };
    let prefix = format!("{BACKUPS_PREFIX}{name}/");
    let target = dir.join(&name);
    let partial = dir.join(format!(".{name}.download"));
    std::fs::create_dir_all(partial.join("streams"))
        .with_context(|| format!("cannot write to {}", dir.display()))?;
    for o in objects.iter().filter(|o| o.key.starts_with(&prefix)) {
        let rel = &o.key[prefix.len()..];
        let ok = rel == "postgres.dump"
            || rel == "manifest.json"
            || rel
                .strip_prefix("streams/")
                .is_some_and(|f| f.ends_with(".bin") && !f.contains('/') && !f.starts_with('.'));
        if !ok {
            eprintln!("skipping unexpected object {}", o.key);
            continue;
        }
        storage.get_to_file(&o.key, &partial.join(rel)).await?;
    }
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&partial, &target)?;
    eprintln!("fetched {prefix} into {}", target.display());
    Ok(target)
}

pub async fn backup(a: BackupArgs) -> Result<()> {
    let started = std::time::Instant::now();
    // A wrong object store setting is told before the backup, not after it.
    let storage = if a.to_object_store {
        let s = object_store(&a.storage)?;
        s.check().await.context("the object store")?;
        Some(s)
    } else {
        None
    };
    // Every stream, nodes' reports among them: read through the guard.
    let store = a.nats.connect_guarded("unidesk-backup").await?;
    let js = store.jetstream();
    let name = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let dir = a.dir.path.join(&name);
    let partial = a.dir.path.join(format!(".{name}.partial"));
    std::fs::create_dir_all(partial.join("streams"))
        .with_context(|| format!("cannot write to {}", a.dir.path.display()))?;
    let names: Vec<String> = js.stream_names().try_collect().await?;
    let mut manifest = Manifest {
        created_at: name.clone(),
        streams: vec![],
    };
    for stream_name in names {
        let mut stream = js.get_stream(&stream_name).await?;
        let info = stream.info().await?.clone();
        // Streams fed from others (the hub's inbox of node reports) are derived: only their configuration is kept.
        let derived = info.config.sources.as_ref().is_some_and(|s| !s.is_empty())
            || info.config.mirror.is_some();
        let file = partial.join("streams").join(format!("{stream_name}.bin"));
        let mut out = BufWriter::new(std::fs::File::create(&file)?);
        let mut written = 0u64;
        let last = info.state.last_sequence;
        if !derived && info.state.messages > 0 {
            let consumer = stream
                .create_consumer(OrderedConfig {
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            while let Some(m) = messages.next().await {
                let m = m?;
                let seq = m
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                let headers = m
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .filter(|(k, _)| kept_header(k.as_ref()))
                    .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                    .collect();
                let record = Record {
                    seq,
                    subject: m.subject.to_string(),
                    headers,
                    payload: m.payload.to_vec(),
                };
                let mut bytes = Vec::new();
                ciborium::into_writer(&record, &mut bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
                out.write_all(&u32::try_from(bytes.len())?.to_be_bytes())?;
                out.write_all(&bytes)?;
                written += 1;
                if seq >= last {
                    break;
                }
            }
        }
        out.flush()?;
        manifest.streams.push(StreamBackup {
            name: stream_name.clone(),
            config: serde_json::to_value(&info.config)?,
            first_seq: info.state.first_sequence,
            last_seq: last,
            messages: written,
        });
        eprintln!("{stream_name}: {written} messages");
    }
    let dump = partial.join("postgres.dump");
    let status = std::process::Command::new(pg_tool(&a.pg_bin, "pg_dump"))
        .args(["-Fc", "--no-owner", "-f"])
        .arg(&dump)
        .arg(a.db.url()?)
        .status()
        .context("cannot run pg_dump (install PostgreSQL's client or set UD_PG_BIN)")?;
    if !status.success() {
        bail!("pg_dump failed ({status})");
    }
    std::fs::write(
        partial.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    // Complete only now: a backup cut short is never taken for a good one.
    std::fs::rename(&partial, &dir)?;
    let mut all: Vec<PathBuf> = std::fs::read_dir(&a.dir.path)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(a.keep.max(1));
    for old in &all[..excess] {
        std::fs::remove_dir_all(old)?;
    }
    if let Some(storage) = &storage {
        upload(storage, &dir, &name, a.keep).await?;
    }
    println!("{}", dir.display());
    eprintln!(
        "backup done in {:.1} s; {} kept",
        started.elapsed().as_secs_f64(),
        all.len() - excess
    );
    Ok(())
}

const MAX_RECORD_BYTES: usize = 65 << 20;

fn read_records(path: &Path) -> Result<impl Iterator<Item = Result<Record>>> {
    let mut input = BufReader::new(
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    Ok(std::iter::from_fn(move || {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(e.into())),
        }
        let len = u32::from_be_bytes(len) as usize;
        // No message is larger than nats-server's 64 MiB limit (with room for
        // its subject and headers): a larger length is damage, not a record.
        if len > MAX_RECORD_BYTES {
            return Some(Err(anyhow::anyhow!(
                "a record of {len} bytes: the file is damaged"
            )));
        }
        let mut bytes = vec![0u8; len];
        if let Err(e) = input.read_exact(&mut bytes) {
            return Some(Err(anyhow::anyhow!("truncated record: {e}")));
        }
        Some(
            ciborium::from_reader(bytes.as_slice()).map_err(|e| anyhow::anyhow!("bad record: {e}")),
        )
    }))
}

pub async fn restore(mut a: RestoreArgs) -> Result<()> {
    let started = std::time::Instant::now();
    if a.from_object_store {
        let storage = object_store(&a.storage)?;
        let name = a.from.to_string_lossy().into_owned();
        a.from = download(&storage, &a.dir.path, &name).await?;
    }
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(a.from.join("manifest.json"))
            .with_context(|| format!("{} is not a backup (no manifest.json)", a.from.display()))?,
    )?;
    let store = a.nats.connect("unidesk-restore").await?;
    let js = store.jetstream();
    // Plain streams first: sourced ones would otherwise start pulling before their origins exist.
    let mut order: Vec<&StreamBackup> = manifest.streams.iter().collect();
    order.sort_by_key(|s| {
        s.config
            .get("sources")
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    });
    for s in order {
        let mut config: Config = serde_json::from_value(s.config.clone())
            .with_context(|| format!("stream {} configuration", s.name))?;
        if let Ok(mut existing) = js.get_stream(&s.name).await {
            let held = existing.info().await?.state.messages;
            if held > 0 && !a.force {
                bail!("stream {} already holds {held} messages; restore into an empty server or pass --force", s.name);
            }
            js.delete_stream(&s.name).await?;
        }
        if s.first_seq > 1 {
            config.first_sequence = Some(s.first_seq);
        }
        js.create_stream(config)
            .await
            .with_context(|| format!("cannot create stream {}", s.name))?;
        let mut acks = futures::stream::FuturesOrdered::new();
        let mut shifted = false;
        for r in read_records(&a.from.join("streams").join(format!("{}.bin", s.name)))? {
            let r = r?;
            let mut headers = async_nats::HeaderMap::new();
            for (k, v) in &r.headers {
                // A damaged file must not take the restore down mid-way.
                let (Ok(name), Ok(value)) = (
                    k.parse::<async_nats::header::HeaderName>(),
                    v.parse::<async_nats::HeaderValue>(),
                ) else {
                    bail!(
                        "stream {} record {}: header {k:?}: {v:?} cannot be sent",
                        s.name,
                        r.seq
                    );
                };
                headers.append(name, value);
            }
            let ack = js
                .publish_with_headers(r.subject, headers, r.payload.into())
                .await?;
            let seq = r.seq;
            acks.push_back(async move { (seq, ack.await) });
            if acks.len() >= RESTORE_IN_FLIGHT {
                if let Some((seq, ack)) = acks.next().await {
                    shifted |= ack?.sequence != seq;
                }
            }
        }
        while let Some((seq, ack)) = acks.next().await {
            shifted |= ack?.sequence != seq;
        }
        if shifted {
            eprintln!(
                "warning: {} had gaps (messages removed by its limits); later sequences moved. Check the read models with `unidesk projections rebuild`.",
                s.name
            );
        }
        eprintln!("{}: {} messages", s.name, s.messages);
    }
    let status = std::process::Command::new(pg_tool(&a.pg_bin, "pg_restore"))
        .args(["--clean", "--if-exists", "--no-owner", "-d"])
        .arg(a.db.url()?)
        .arg(a.from.join("postgres.dump"))
        .status()
        .context("cannot run pg_restore (install PostgreSQL's client or set UD_PG_BIN)")?;
    if !status.success() {
        bail!("pg_restore failed ({status})");
    }
    eprintln!(
        "restored {} in {:.1} s",
        a.from.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_error(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.path().join("s.bin");
        std::fs::write(&path, bytes).unwrap_or_else(|e| unreachable!("{e}"));
        match read_records(&path).map(|mut r| r.next()) {
            Ok(Some(Err(e))) => e.to_string(),
            _ => String::new(),
        }
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_crash() {
        // A length no message can have is refused before anything is allocated.
        assert!(first_error(&[0xff, 0xff, 0xff, 0xff, 1, 2]).contains("damaged"));
        assert!(first_error(&[0, 0, 0, 9, 1, 2]).contains("truncated"));
        assert!(first_error(&[0, 0, 0, 2, 0xff, 0xff]).contains("bad record"));
    }
}
