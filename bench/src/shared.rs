//! `ud-bench shared`: a pipeline's `/shared` folder saved and put together
//! as the agent does it (its own save and restore, through the main
//! server's storage requests over NATS, against a real Garage), beside a
//! plain S3 client moving the same bytes in the same run:
//! - a large folder (1 GiB of 64 MiB files) saved, then handed to the next
//!   step on the same node, then saved again unchanged;
//! - 100,000 files of 4 KiB saved on one node and put together on another;
//! - a step that changed nothing: the bytes it uploads.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use rand::RngCore;
use ud_core::task::TaskCommand;
use ud_core::{EventStore, TaskCommands};
use ud_edge_agent::requests::Requests;
use ud_edge_agent::shared::{self, Cache};
use ud_edge_agent::transfer::Transfers;
use ud_schemas::codec::EventMeta;
use ud_schemas::dispatch::{self, StorageRequest};
use ud_schemas::spec::SharedFolder;
use ud_schemas::{NodeId, ProjectId, TaskId};
use ud_storage::{Storage, StorageSettings};
use ud_testkit::{Garage, NatsServer};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the large folder in MiB (64 MiB files).
    #[arg(long, default_value_t = 1024)]
    large_mib: u64,
    /// Files of 4 KiB in the many-files folder.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
}

/// The main server's storage requests, as its node-requests service answers
/// them, on a NATS server of their own.
async fn serve_storage(store: EventStore, storage: Storage) -> Result<()> {
    let stores = ud_storage::Stores::platform_only(Some(storage));
    let mut requests = store.client().subscribe("ud.storage.*").await?;
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let (store, stores) = (store.clone(), stores.clone());
            tokio::spawn(async move {
                let Some(reply) = m.reply.clone() else { return };
                let Some(node) = m
                    .subject
                    .split('.')
                    .nth(2)
                    .and_then(|n| n.parse::<NodeId>().ok())
                else {
                    return;
                };
                let Ok(req) = dispatch::from_cbor::<StorageRequest>(&m.payload, "storage-request")
                else {
                    return;
                };
                let answer = ud_core::edge::files::answer(&store, &stores, &node, req).await;
                if let Ok(bytes) = dispatch::to_cbor(&answer) {
                    let _ = store.client().publish(reply, bytes.into()).await;
                }
            });
        }
    });
    Ok(())
}

/// A task of `project` whose `/shared` starts from `from`, assigned to `node`.
async fn step_task(
    tasks: &TaskCommands,
    project: &ProjectId,
    from: Vec<TaskId>,
    node: NodeId,
) -> Result<TaskId> {
    let mut spec = crate::backbone::spec();
    spec.shared = Some(SharedFolder {
        from,
        merge: Default::default(),
    });
    let id = TaskId::new();
    let meta = EventMeta::new("bench");
    tasks
        .tasks()
        .create(
            id,
            TaskCommand::Submit {
                project: project.clone(),
                spec,
                idempotency_key: None,
            },
            &meta,
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let assigned = tasks
        .tasks()
        .execute(
            id,
            TaskCommand::Assign {
                node_id: node,
                gpus: vec![],
            },
            &meta.next(),
            ud_core::aggregate::Retries(2),
            |_| true,
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    if assigned.events.is_empty() {
        bail!("task {id} was not assigned");
    }
    Ok(id)
}

fn random_files(dir: &Path, count: u64, size: usize, name: impl Fn(u64) -> String) -> Result<()> {
    let mut buf = vec![0u8; size];
    for i in 0..count {
        rand::thread_rng().fill_bytes(&mut buf);
        let path = dir.join(name(i));
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(path, &buf)?;
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Drops the page cache's copy of what was written, so reads come from disk
/// as on a node that did not just write them (best effort: needs root).
fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

pub async fn run(a: Args) -> Result<()> {
    let garage = Garage::start().await?;
    let mut settings = StorageSettings::path_style(
        &garage.endpoint,
        &garage.region,
        &garage.bucket,
        &garage.access_key_id,
        &garage.secret_access_key,
    );
    settings.url_ttl = Duration::from_secs(3600);
    let storage = Storage::new(settings)?;
    let nats = NatsServer::start().await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    let tasks = TaskCommands::new(store.clone()).await?;
    serve_storage(store.clone(), storage.clone()).await?;
    let project = ProjectId::parse("bench").map_err(|e| anyhow!("{e}"))?;
    let (node_a, node_b) = (NodeId::new(), NodeId::new());
    let client = nats.connect().await?;
    let on = |node| {
        Transfers::new(Requests {
            client: client.clone(),
            node,
        })
    };
    let (ta, tb) = (on(node_a), on(node_b));
    let work = tempfile::tempdir()?;
    let root = work.path();
    let (cache_a, cache_b) = (
        Cache::new(root.join("cache-a"), 1 << 20),
        Cache::new(root.join("cache-b"), 1 << 20),
    );

    // A large folder: saved, handed to the next step on the same node,
    // saved again unchanged.
    let first = step_task(&tasks, &project, vec![], node_a).await?;
    let dir1 = root.join("first.shared");
    let (base, _) = shared::restore(&ta, &cache_a, first, 1, &dir1, false)
        .await
        .context("starting the large folder")?;
    let big = a.large_mib / 64;
    random_files(&dir1, big, 64 << 20, |i| format!("model/shard-{i:03}.bin"))?;
    let bytes = big * (64 << 20);
    drop_caches();
    let t = Instant::now();
    let saved = shared::save(&ta, &cache_a, first, 1, &dir1, &base)
        .await
        .context("saving the large folder")?;
    let save_large = t.elapsed();
    // The same bytes by a plain S3 client: one streaming PUT per file.
    drop_caches();
    let t = Instant::now();
    for i in 0..big {
        let path = dir1.join(format!("model/shard-{i:03}.bin"));
        storage
            .put_file(
                &format!("plain/shard-{i:03}.bin"),
                &path,
                "application/octet-stream",
            )
            .await?;
    }
    let plain_put = t.elapsed();
    let second = step_task(&tasks, &project, vec![first], node_a).await?;
    let dir2 = root.join("second.shared");
    let t = Instant::now();
    let (base2, fetched_same) = shared::restore(&ta, &cache_a, second, 1, &dir2, false)
        .await
        .context("handing the large folder over on the same node")?;
    let handoff = t.elapsed();
    let t = Instant::now();
    let unchanged = shared::save(&ta, &cache_a, second, 1, &dir2, &base2)
        .await
        .context("saving it again unchanged")?;
    let save_unchanged = t.elapsed();
    // Another node puts the large folder together from the store.
    let elsewhere = step_task(&tasks, &project, vec![second], node_b).await?;
    drop_caches();
    let t = Instant::now();
    let (_, fetched_b) =
        shared::restore(&tb, &cache_b, elsewhere, 1, &root.join("b.shared"), false)
            .await
            .context("putting the large folder together on another node")?;
    let restore_large = t.elapsed();
    drop_caches();
    let t = Instant::now();
    for i in 0..big {
        storage
            .get_to_file(&format!("plain/shard-{i:03}.bin"), &root.join("plain.bin"))
            .await?;
    }
    let plain_get = t.elapsed();
    if saved.new_bytes != bytes || fetched_same != 0 || unchanged.new_bytes != 0 {
        bail!(
            "unexpected bytes: saved {} of {bytes}, fetched {fetched_same} on the same node, {} new when unchanged",
            saved.new_bytes,
            unchanged.new_bytes
        );
    }
    let rate = |d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!("large folder: {} MiB in {big} files of 64 MiB", a.large_mib);
    println!(
        "  save (hash, cache, upload): {} = {:.0} MiB/s; plain S3 PUTs of the same files: {} = {:.0} MiB/s; ratio {:.2}",
        secs(save_large),
        rate(save_large),
        secs(plain_put),
        rate(plain_put),
        plain_put.as_secs_f64() / save_large.as_secs_f64()
    );
    println!(
        "  handed to the next step on the same node: {} ({fetched_same} bytes fetched)",
        secs(handoff)
    );
    println!(
        "  saved again unchanged: {} ({} bytes uploaded)",
        secs(save_unchanged),
        unchanged.new_bytes
    );
    println!(
        "  put together on another node: {} = {:.0} MiB/s ({fetched_b} bytes fetched); plain S3 GETs: {} = {:.0} MiB/s; ratio {:.2}",
        secs(restore_large),
        rate(restore_large),
        secs(plain_get),
        rate(plain_get),
        plain_get.as_secs_f64() / restore_large.as_secs_f64()
    );

    // Many small files: saved on one node, put together on another.
    let many = step_task(&tasks, &project, vec![], node_a).await?;
    let dir3 = root.join("many.shared");
    let (base3, _) = shared::restore(&ta, &cache_a, many, 1, &dir3, false)
        .await
        .context("starting the many-files folder")?;
    random_files(&dir3, a.files as u64, 4096, |i| {
        format!("d{:03}/f{i}", i % 1000)
    })?;
    drop_caches();
    let t = Instant::now();
    let saved_many = shared::save(&ta, &cache_a, many, 1, &dir3, &base3)
        .await
        .context("saving the many-files folder")?;
    let save_many = t.elapsed();
    let there = step_task(&tasks, &project, vec![many], node_b).await?;
    let dir4: PathBuf = root.join("there.shared");
    let t = Instant::now();
    let (_, fetched_many) = shared::restore(&tb, &cache_b, there, 1, &dir4, false)
        .await
        .context("putting the many-files folder together on another node")?;
    let restore_many = t.elapsed();
    let placed = walk_count(&dir4)?;
    if placed != a.files {
        bail!("{placed} of {} files put together", a.files);
    }
    println!(
        "many files: {} of 4 KiB ({} MiB in packs)",
        a.files,
        saved_many.new_bytes >> 20
    );
    println!(
        "  saved on one node: {}; put together on another: {} ({} MiB fetched); total {}",
        secs(save_many),
        secs(restore_many),
        fetched_many >> 20,
        secs(save_many + restore_many)
    );
    Ok(())
}

fn walk_count(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d)?.flatten() {
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    Ok(n)
}
