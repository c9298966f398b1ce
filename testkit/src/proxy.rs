//! A real reverse proxy in front of test servers: Caddy (`UD_CADDY`,
//! default `caddy` on PATH), HTTPS with a certificate given by the test or
//! plain HTTP, forwarding path prefixes to loopback ports with the
//! request's own `Host` header (as a public entry does).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::TlsFiles;

pub struct Proxy {
    scheme: &'static str,
    _child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

fn caddy_binary() -> PathBuf {
    std::env::var_os("UD_CADDY").map_or_else(|| PathBuf::from("caddy"), PathBuf::from)
}

impl Proxy {
    /// `http://127.0.0.1:<port>` or `https://localhost:<port>`.
    pub fn url(&self) -> String {
        let host = if self.scheme == "https" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{}://{host}:{}", self.scheme, self.port)
    }

    /// Serves `https://localhost:<port>` with `tls` (plain
    /// `http://127.0.0.1:<port>` without), sending each request whose path
    /// starts with one of `routes`' prefixes to its loopback port.
    pub async fn start(tls: Option<&TlsFiles>, routes: &[(&str, u16)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let mut handles = String::new();
        for (prefix, upstream) in routes {
            handles.push_str(&format!(
                "\thandle {prefix}* {{\n\t\treverse_proxy 127.0.0.1:{upstream}\n\t}}\n"
            ));
        }
        let (scheme, sites, tls_line) = match tls {
            Some(t) => (
                "https",
                format!("https://localhost:{port}, https://127.0.0.1:{port}"),
                format!("\ttls {:?} {:?}\n", t.cert_file, t.key_file),
            ),
            None => ("http", format!("http://127.0.0.1:{port}"), String::new()),
        };
        let config = format!(
            "{{\n\tadmin off\n\tauto_https off\n}}\n{sites} {{\n\tbind 127.0.0.1\n{tls_line}{handles}\thandle {{\n\t\trespond \"no route\" 404\n\t}}\n}}\n"
        );
        let file = dir.path().join("Caddyfile");
        std::fs::write(&file, config)?;
        let mut child = Command::new(caddy_binary())
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {:?} (set UD_CADDY)", caddy_binary()))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = async {
            let mut last = String::new();
            while let Some(line) = lines.next_line().await? {
                if line.contains("serving initial configuration") {
                    return Ok(());
                }
                if line.contains("\"level\":\"error\"") || line.starts_with("Error") {
                    bail!("caddy: {line}");
                }
                last = line;
            }
            bail!("caddy exited before it was ready: {last}")
        };
        tokio::time::timeout(Duration::from_secs(20), ready).await??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            scheme,
            _child: child,
            _dir: dir,
            port,
        })
    }
}
