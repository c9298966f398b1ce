//! `unidesk file put/get/ls`: a project's files, moved straight between this
//! machine and the object store with the presigned URLs the API hands out.
//! Large uploads go in parts and resume where they stopped (the upload id is
//! kept next to the file until it completes); downloads resume from the bytes
//! already on disk.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::client::{print, Api, ApiArgs};

#[derive(Subcommand)]
pub enum FileCommand {
    /// Upload a file: `unidesk file put data.csv lab:data/train.csv`.
    Put {
        #[command(flatten)]
        api: ApiArgs,
        local: PathBuf,
        /// PROJECT:PATH (PROJECT: alone keeps the file's name).
        target: String,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Download a file: `unidesk file get lab:data/train.csv [local]`.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// PROJECT:PATH
        source: String,
        /// Where to write it (default: the file's name, here).
        local: Option<PathBuf>,
        #[arg(long)]
        quiet: bool,
    },
    /// List a project's files: `unidesk file ls lab[:data/]`.
    Ls {
        #[command(flatten)]
        api: ApiArgs,
        /// PROJECT or PROJECT:FOLDER
        target: String,
    },
}

fn split(target: &str) -> Result<(&str, &str)> {
    let (project, path) = target.split_once(':').unwrap_or((target, ""));
    if project.is_empty() {
        bail!("{target:?}: name the project, as PROJECT:PATH");
    }
    Ok((project, path))
}

fn bar(len: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Characters that must be escaped in a URL path segment or query value.
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn run(c: FileCommand) -> Result<()> {
    match c {
        FileCommand::Put {
            api,
            local,
            target,
            quiet,
        } => put(Api::new(api), &local, &target, quiet).await,
        FileCommand::Get {
            api,
            source,
            local,
            quiet,
        } => get(Api::new(api), &source, local, quiet).await,
        FileCommand::Ls { api, target } => {
            let json_out = api.json;
            let api = Api::new(api);
            let (project, prefix) = split(&target)?;
            let v = api
                .get(&format!(
                    "/api/v1/projects/{project}/files?prefix={}",
                    escape(prefix)
                ))
                .await?;
            if json_out {
                print(&v);
                return Ok(());
            }
            for f in v["files"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:>14}  {}",
                    f["size"].as_u64().unwrap_or(0),
                    f["path"].as_str().unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

/// Where an unfinished multipart upload of `local` is remembered.
fn state_file(local: &Path) -> PathBuf {
    let mut name = local
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".unidesk-upload");
    local.with_file_name(name)
}

async fn put(api: Api, local: &Path, target: &str, quiet: bool) -> Result<()> {
    let (project, path) = split(target)?;
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} is not a file name", local.display()))?;
    let path = if path.is_empty() {
        name.to_owned()
    } else if path.ends_with('/') {
        format!("{path}{name}")
    } else {
        path.to_owned()
    };
    let size = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("cannot read {}", local.display()))?
        .len();
    let state = state_file(local);
    // An unfinished upload of this same file to this same place resumes.
    let previous: Option<Value> = tokio::fs::read_to_string(&state)
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let plan = match previous
        .filter(|p| p["project"] == project && p["path"] == path.as_str() && p["size"] == size)
    {
        Some(p) => {
            let id = p["upload_id"].as_str().unwrap_or_default();
            api.get(&format!(
                "/api/v1/projects/{project}/uploads/{id}?path={}&size_bytes={size}",
                escape(&path)
            ))
            .await?
        }
        None => {
            api.post(
                &format!("/api/v1/projects/{project}/uploads"),
                &json!({"path": path, "size_bytes": size}),
            )
            .await?
        }
    };
    let bar = bar(size, quiet);
    if plan["kind"] == "single" {
        let url = plan["url"]["url"]
            .as_str()
            .ok_or_else(|| anyhow!("no upload URL in the answer"))?;
        send(&api.http, url, local, 0, size, &bar).await?;
    } else {
        let upload_id = plan["upload_id"]
            .as_str()
            .ok_or_else(|| anyhow!("no upload id in the answer"))?
            .to_owned();
        tokio::fs::write(
            &state,
            json!({"project": project, "path": path, "size": size, "upload_id": upload_id})
                .to_string(),
        )
        .await?;
        let part_size = plan["part_size"]
            .as_u64()
            .ok_or_else(|| anyhow!("no part size in the answer"))?;
        let done = plan["done"].as_array().map_or(0, Vec::len) as u64;
        if done > 0 {
            eprintln!("resuming upload {upload_id}: {done} part(s) already stored");
        }
        bar.inc((done * part_size).min(size));
        for part in plan["parts"].as_array().cloned().unwrap_or_default() {
            let n = part["number"]
                .as_u64()
                .ok_or_else(|| anyhow!("a part without a number"))?;
            let url = part["url"]["url"]
                .as_str()
                .ok_or_else(|| anyhow!("part {n} has no URL"))?;
            let offset = (n - 1) * part_size;
            send(
                &api.http,
                url,
                local,
                offset,
                part_size.min(size - offset),
                &bar,
            )
            .await
            .with_context(|| {
                format!("part {n} failed; run the same command again to resume the upload")
            })?;
        }
        api.post(
            &format!("/api/v1/projects/{project}/uploads/{upload_id}/complete"),
            &json!({"path": path, "size_bytes": size}),
        )
        .await?;
        let _ = tokio::fs::remove_file(&state).await;
    }
    bar.finish_and_clear();
    println!("{project}:{path} ({size} bytes)");
    Ok(())
}

/// PUTs `len` bytes of `local` from `offset`, streaming, counting progress.
async fn send(
    http: &reqwest::Client,
    url: &str,
    local: &Path,
    offset: u64,
    len: u64,
    bar: &ProgressBar,
) -> Result<()> {
    let mut file = tokio::fs::File::open(local).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let bar2 = bar.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024).inspect(move |c| {
            if let Ok(c) = c {
                bar2.inc(c.len() as u64);
            }
        });
    let resp = http
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "the object store answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn get(api: Api, source: &str, local: Option<PathBuf>, quiet: bool) -> Result<()> {
    let (project, path) = split(source)?;
    if path.is_empty() {
        bail!("{source:?}: name the file, as PROJECT:PATH");
    }
    let v = api
        .get(&format!(
            "/api/v1/projects/{project}/files/{}",
            escape(path)
        ))
        .await?;
    let size = v["size"].as_u64().unwrap_or(0);
    let url = v["download"]["url"]
        .as_str()
        .ok_or_else(|| anyhow!("no download URL in the answer"))?;
    let local = local.unwrap_or_else(|| PathBuf::from(path.rsplit('/').next().unwrap_or(path)));
    let mut partial = local.clone().into_os_string();
    partial.push(".part");
    let partial = PathBuf::from(partial);
    // Bytes already fetched by an earlier, interrupted run are kept.
    let have = tokio::fs::metadata(&partial)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
        .min(size);
    let mut req = api.http.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        bail!("the object store answered {}", resp.status());
    }
    let resumed = have > 0 && resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    if resumed {
        eprintln!("resuming download at byte {have}");
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&partial)
        .await?;
    let bar = bar(size, quiet);
    bar.inc(if resumed { have } else { 0 });
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("download cut off; run the same command again to resume")?;
        file.write_all(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    file.flush().await?;
    let got = tokio::fs::metadata(&partial).await?.len();
    if got != size {
        bail!("got {got} of {size} bytes; run the same command again to resume");
    }
    tokio::fs::rename(&partial, &local).await?;
    bar.finish_and_clear();
    println!("{} ({size} bytes)", local.display());
    Ok(())
}

#[derive(Args)]
pub struct OutputsArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// Download every output into this folder (keeping the paths), checking each file's SHA-256.
    #[arg(long)]
    download: Option<PathBuf>,
}

pub async fn outputs(a: OutputsArgs) -> Result<()> {
    let json_out = a.api.json;
    let api = Api::new(a.api);
    let task = api.get(&format!("/api/v1/tasks/{}", a.id)).await?;
    let outputs = task["outputs"].as_array().cloned().unwrap_or_default();
    if json_out && a.download.is_none() {
        print(&json!(outputs));
        return Ok(());
    }
    for o in &outputs {
        let path = o["path"].as_str().unwrap_or_default();
        let size = o["size"].as_u64().unwrap_or(0);
        let Some(dir) = &a.download else {
            println!("{size:>14}  {path}");
            continue;
        };
        // Only relative paths without '..' are ever recorded; check again before writing.
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|s| s == ".." || s.is_empty())
        {
            bail!("output path {path:?} is not a plain relative path");
        }
        let url = o["download"]["url"].as_str().ok_or_else(|| {
            anyhow!("output {path:?} has no download link (is an object store configured?)")
        })?;
        let dest = dir.join(path);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let resp = api.http.get(url).send().await?;
        if !resp.status().is_success() {
            bail!(
                "output {path:?}: the object store answered {}",
                resp.status()
            );
        }
        let mut file = tokio::fs::File::create(&dest).await?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        let got = hex::encode(hasher.finalize());
        if got != o["sha256"].as_str().unwrap_or_default() {
            bail!(
                "output {path:?}: SHA-256 {got} differs from the recorded {}",
                o["sha256"]
            );
        }
        println!("{}", dest.display());
    }
    Ok(())
}
