//! A real Garage (S3-compatible object store) on loopback: one node, its
//! layout, one key and one bucket, stopped and deleted on drop.
//!
//! `UD_GARAGE`: path of the garage binary (default: `garage` on PATH, then
//! `~/.cargo/bin/garage`; `scripts/deps.sh` installs it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

fn garage_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("UD_GARAGE") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/garage"));
    match cargo {
        Some(p) if p.exists() && which("garage").is_none() => p,
        _ => PathBuf::from("garage"),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub struct Garage {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`, the S3 API.
    pub endpoint: String,
    /// The port of `endpoint`.
    pub port: u16,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    admin: u16,
}

impl Garage {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (s3, rpc, admin) = (free_port()?, free_port()?, free_port()?);
        let conf = format!(
            "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = hex(32),
        );
        let path = dir.path().join("garage.toml");
        std::fs::write(&path, conf)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let mut g = Self {
            dir,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3}"),
            port: s3,
            region: "garage".into(),
            bucket: "unidesk".into(),
            access_key_id: format!("GK{}", hex(12)),
            secret_access_key: hex(32),
            admin,
        };
        g.spawn().await?;
        let node = g.cli(&["node", "id", "-q"]).await?;
        let node = node.split('@').next().unwrap_or_default().trim().to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])
            .await?;
        g.cli(&["layout", "apply", "--version", "1"]).await?;
        let (id, secret) = (g.access_key_id.clone(), g.secret_access_key.clone());
        g.cli(&["key", "import", "--yes", "-n", "unidesk", &id, &secret])
            .await?;
        let bucket = g.bucket.clone();
        g.cli(&["bucket", "create", &bucket]).await?;
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", "unidesk",
        ])
        .await?;
        Ok(g)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))?;
        let child = Command::new(garage_binary())
            .arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?} (set UD_GARAGE)", garage_binary()))?;
        self.child = Some(child);
        // Ready once the CLI reaches it over RPC and the S3 port accepts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s3 = self.endpoint.trim_start_matches("http://").to_owned();
            if self.cli(&["status"]).await.is_ok()
                && tokio::net::TcpStream::connect(&s3).await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default();
                bail!("garage did not start within 30 s: {log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Another bucket, with a key of its own allowed on it alone; returns
    /// the bucket, the key id and its secret.
    pub async fn bucket_with_key(&self, bucket: &str) -> Result<(String, String, String)> {
        let (id, secret) = (format!("GK{}", hex(12)), hex(32));
        self.cli(&["key", "import", "--yes", "-n", bucket, &id, &secret])
            .await?;
        self.cli(&["bucket", "create", bucket]).await?;
        self.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", bucket,
        ])
        .await?;
        Ok((bucket.to_owned(), id, secret))
    }

    /// Whether the server stopped on its own, with its log: a test that
    /// then fails says why the object store went away.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        let log = std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default();
        Some(format!("garage exited ({status}):\n{log}"))
    }

    /// Runs a garage CLI command against this server; returns its stdout.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(garage_binary())
            .arg("-c")
            .arg(self.config())
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server (its data stays).
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts it again after `stop`.
    /// Ready once its admin API says the node is healthy: it serves S3
    /// requests again, not only accepts connections.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await?;
        let health = format!("http://127.0.0.1:{}/health", self.admin);
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(&health).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("garage was not healthy within 30 s of its restart");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(why) = self.exited() {
            eprintln!("{why}");
        }
    }
}
