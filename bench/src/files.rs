//! `ud-bench files`: a large file through presigned URLs as the agent moves
//! task files (its `Mover`: streaming, multipart parts 4 at a time,
//! hashing before upload as outputs are), against the same transfer by a
//! plain S3 client (aws-sdk-s3, streaming one PUT / one GET), both against
//! the same real Garage in the same run; and the bench process's memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use rand::RngCore;
use tokio::io::AsyncWriteExt;
use ud_edge_agent::transfer::{self, Mover};
use ud_schemas::dispatch::Upload;
use ud_storage::{part_plan, Storage, StorageSettings};
use ud_testkit::Garage;

#[derive(Parser)]
pub struct Args {
    /// Size of the file in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Rounds of each transfer (the best and the median are printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Resident memory of this process now and at its peak (KiB), from /proc.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak-RSS mark (writing 5 to clear_refs), so a phase's own peak can be read.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn random_file(path: &Path, mib: u64) -> Result<()> {
    // Random bytes: Garage deduplicates equal blocks, which would flatter a repeated pattern.
    let mut file = tokio::fs::File::create(path).await?;
    let mut buf = vec![0u8; 1024 * 1024];
    for _ in 0..mib {
        rand::thread_rng().fill_bytes(&mut buf);
        file.write_all(&buf).await?;
    }
    file.flush().await?;
    Ok(())
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

fn summary(name: &str, bytes: u64, times: &mut [Duration]) -> f64 {
    times.sort();
    let best = times[0];
    let median = times[times.len() / 2];
    println!(
        "{name:<58} best {:>7.1} MiB/s  median {:>7.1} MiB/s  ({:.2} s median)",
        mib_s(bytes, best),
        mib_s(bytes, median),
        median.as_secs_f64()
    );
    mib_s(bytes, median)
}

pub async fn run(a: Args) -> Result<()> {
    let g = Garage::start().await?;
    let mut settings = StorageSettings::path_style(
        &g.endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    settings.url_ttl = Duration::from_secs(3600);
    let storage = Storage::new(settings)?;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src.bin");
    random_file(&src, a.mib).await?;
    let size = a.mib * 1024 * 1024;
    let (part_size, parts) = part_plan(size);
    println!(
        "file: {} MiB of random bytes; agent parts: {parts} of {} MiB, 4 at a time; {} rounds each",
        a.mib,
        part_size >> 20,
        a.rounds
    );
    let mover = Mover::default();
    let (rss0, _) = memory_kib();

    // The agent: hash (as outputs are), presigned multipart upload, presigned download.
    reset_peak();
    let (mut up, mut up_hash, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let key = format!("bench/agent-{round}");
        let t = Instant::now();
        let s = src.clone();
        let (hashed, _) = tokio::task::spawn_blocking(move || transfer::hash(&s)).await??;
        let hash_time = t.elapsed();
        let upload = if parts <= 1 {
            Upload::Single {
                url: storage
                    .presign_put(&key, size, Duration::from_secs(3600))
                    .await?
                    .url,
            }
        } else {
            let upload_id = storage.start_multipart(&key).await?;
            let mut part_urls = Vec::new();
            for n in 1..=parts {
                part_urls.push(
                    storage
                        .presign_part(&key, &upload_id, n, Duration::from_secs(3600))
                        .await?
                        .url,
                );
            }
            Upload::Multipart {
                upload_id,
                part_size,
                part_urls,
                done: vec![],
            }
        };
        let t2 = Instant::now();
        mover
            .upload(&upload, &src, size)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Upload::Multipart { upload_id, .. } = &upload {
            storage.complete_multipart(&key, upload_id).await?;
        }
        up.push(t2.elapsed());
        up_hash.push(hash_time + t2.elapsed());
        if hashed != size {
            bail!("hashed {hashed} bytes of {size}");
        }
        let url = storage
            .presign_get(&key, Duration::from_secs(3600))
            .await?
            .url;
        let dest = dir.path().join("agent-down.bin");
        let t = Instant::now();
        mover
            .download(&url, &dest, size)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        down.push(t.elapsed());
        tokio::fs::remove_file(&dest).await?;
        storage.delete(&key).await?;
    }
    let (_, agent_peak) = memory_kib();

    // The plain client: one streaming PUT and one streaming GET with aws-sdk-s3.
    let (mut plain_up, mut plain_down) = (Vec::new(), Vec::new());
    for round in 0..a.rounds {
        let key = format!("bench/plain-{round}");
        let t = Instant::now();
        let body = aws_sdk_s3::primitives::ByteStream::from_path(&src).await?;
        storage
            .client()
            .put_object()
            .bucket(&g.bucket)
            .key(&key)
            .body(body)
            .send()
            .await?;
        plain_up.push(t.elapsed());
        let t = Instant::now();
        let out = storage
            .client()
            .get_object()
            .bucket(&g.bucket)
            .key(&key)
            .send()
            .await?;
        let dest = dir.path().join("plain-down.bin");
        let mut file = tokio::fs::File::create(&dest).await?;
        let mut reader = out.body.into_async_read();
        tokio::io::copy(&mut reader, &mut file).await?;
        file.flush().await?;
        plain_down.push(t.elapsed());
        tokio::fs::remove_file(&dest).await?;
        storage.delete(&key).await?;
    }

    println!();
    let pu = summary(
        "plain S3 client (aws-sdk-s3): upload, one streaming PUT",
        size,
        &mut plain_up,
    );
    let au = summary("agent: upload through presigned part URLs", size, &mut up);
    let auh = summary(
        "agent: hash + upload (what an output costs)",
        size,
        &mut up_hash,
    );
    let pd = summary(
        "plain S3 client (aws-sdk-s3): download, streaming GET",
        size,
        &mut plain_down,
    );
    let ad = summary("agent: download through a presigned URL", size, &mut down);
    println!();
    println!(
        "agent / plain upload:            {:.0}% (target >= 90%)",
        au / pu * 100.0
    );
    println!("agent / plain upload, with hash: {:.0}%", auh / pu * 100.0);
    println!(
        "agent / plain download:          {:.0}% (target >= 90%)",
        ad / pd * 100.0
    );
    println!(
        "memory of the bench process: {:.1} MiB resident before, peak {:.1} MiB during the agent transfers (+{:.1} MiB; target: agent under 64 MiB)",
        rss0 as f64 / 1024.0,
        agent_peak as f64 / 1024.0,
        agent_peak.saturating_sub(rss0) as f64 / 1024.0
    );
    Ok(())
}
