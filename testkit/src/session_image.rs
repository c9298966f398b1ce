//! The image session tests run: the base busybox image with `ud-sessiond`
//! (testkit/sessiond, a small HTTP and WebSocket server) linked statically.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const SESSION_IMAGE: &str = "unidesk/sessiond:test";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Builds `ud-sessiond` (std only, static) once; returns its path.
pub fn session_server() -> Result<PathBuf> {
    let root = workspace();
    let target = root.join("target/sessiond");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .arg("--manifest-path")
        .arg(root.join("testkit/sessiond/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .status()
        .context("cargo build ud-sessiond")?;
    if !status.success() {
        bail!("building ud-sessiond failed");
    }
    Ok(target.join("x86_64-unknown-linux-gnu/release/ud-sessiond"))
}

/// Builds [`SESSION_IMAGE`] on the engine `DOCKER_HOST` names (from the
/// base image `base`); returns its name.
pub fn session_image(base: &str) -> Result<String> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if *built {
        return Ok(SESSION_IMAGE.into());
    }
    let bin = session_server()?;
    let ctx = tempfile::tempdir()?;
    std::fs::copy(&bin, ctx.path().join("ud-sessiond"))?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {base}\nCOPY ud-sessiond /bin/ud-sessiond\n"),
    )?;
    let out = Command::new("docker")
        .args(["build", "-q", "-t", SESSION_IMAGE])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .context("docker build")?;
    if !out.status.success() {
        bail!("docker build: {}", String::from_utf8_lossy(&out.stderr));
    }
    *built = true;
    Ok(SESSION_IMAGE.into())
}
