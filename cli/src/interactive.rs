//! Interactive work on running tasks: sessions, `task exec` and
//! `task port-forward`, over the API's WebSockets (which reach the task
//! through its node's tunnel).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Api, ApiArgs, IdArgs, SubmitArgs};

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per command, never stored
pub enum SessionCommand {
    /// Start a session: a task whose container serves a port (Jupyter,
    /// TensorBoard, a web app) at an origin of its own; prints its task id
    /// and, once it runs, a link to open it.
    Start(SessionStartArgs),
    /// Print a fresh link into a running session (valid for a minute).
    Open(IdArgs),
    /// End a session (as `unidesk cancel`).
    Stop(IdArgs),
}

#[derive(Args)]
pub struct SessionStartArgs {
    /// The port the program serves (Jupyter: `--port 8888`).
    #[arg(long = "port", default_value_t = 8888)]
    session_port: i64,
    /// Minutes without traffic after which the session ends (0: never).
    #[arg(long, default_value_t = 60.0)]
    idle_minutes: f64,
    /// Return at once instead of waiting for the session to run.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    task: SubmitArgs,
}

/// A link into session `id`, absolute.
async fn link(api: &Api, id: &str) -> Result<String> {
    let v = api
        .post(&format!("/api/v1/tasks/{id}/session"), &json!({}))
        .await?;
    let url = v["url"].as_str().unwrap_or_default();
    Ok(if url.starts_with('/') {
        api.url(url)
    } else {
        url.to_owned()
    })
}

pub async fn session(c: SessionCommand) -> Result<()> {
    match c {
        SessionCommand::Start(a) => {
            let mut body = crate::client::task_body(&a.task)?;
            body["session"] =
                json!({"port": a.session_port, "idle_timeout_minutes": a.idle_minutes});
            let api = Api::new(a.task.api().clone());
            let v = api.post("/api/v1/tasks?wait=projected", &body).await?;
            let id = v["task_id"].as_str().unwrap_or_default().to_owned();
            println!("{id}");
            if a.no_wait {
                return Ok(());
            }
            loop {
                let t = api.get(&format!("/api/v1/tasks/{id}")).await?;
                match t["state"].as_str() {
                    Some("running") => break,
                    Some(s @ ("succeeded" | "failed" | "timed_out" | "cancelled")) => {
                        bail!(
                            "the session {s}: {}",
                            t["reason"].as_str().unwrap_or_default()
                        )
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                }
            }
            println!("{}", link(&api, &id).await?);
            Ok(())
        }
        SessionCommand::Open(a) => {
            let api = Api::new(a.api().clone());
            println!("{}", link(&api, a.id()).await?);
            Ok(())
        }
        SessionCommand::Stop(a) => {
            let api = Api::new(a.api().clone());
            api.post(
                &format!("/api/v1/tasks/{}/cancel", a.id()),
                &json!({"reason": "session stopped"}),
            )
            .await?;
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// No terminal (for scripts: input and output as bytes).
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// The command (after `--`; default `sh`).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct PortForwardArgs {
    #[command(flatten)]
    api: ApiArgs,
    id: String,
    /// The task's port (one it declared with `ports`).
    port: u16,
    /// The local port (default: the same).
    #[arg(long)]
    local: Option<u16>,
    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &ApiArgs, path: &str) -> Result<Ws> {
    let base = api.api_url.trim_end_matches('/');
    let url = match base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}{path}"),
        Some(("http", rest)) => format!("ws://{rest}{path}"),
        _ => bail!("UD_API_URL must start with http:// or https://"),
    };
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token)
            .parse()
            .map_err(|_| anyhow!("the token is not a valid header"))?,
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            bail!("{}: {msg}", resp.status())
        }
        Err(e) => Err(e).with_context(|| format!("cannot reach {url}")),
    }
}

/// The terminal in raw mode until dropped.
struct Raw(bool);

impl Raw {
    fn enter(tty: bool) -> Self {
        Self(tty && crossterm::terminal::enable_raw_mode().is_ok())
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if self.0 {
            let _ = crossterm::terminal::disable_raw_mode();
        }
    }
}

pub async fn exec(a: ExecArgs) -> Result<()> {
    use std::io::IsTerminal;
    let tty = !a.no_tty && std::io::stdin().is_terminal();
    let command = if a.command.is_empty() {
        vec!["sh".to_owned()]
    } else {
        a.command.clone()
    };
    let (cols, rows) = crossterm::terminal::size().unwrap_or((80, 24));
    let q = format!(
        "command={}&tty={tty}&cols={cols}&rows={rows}",
        encode(&serde_json::to_string(&command)?)
    );
    let ws = connect(&a.api, &format!("/api/v1/tasks/{}/exec?{q}", a.id)).await?;
    let raw = Raw::enter(tty);
    let (mut tx, mut rx) = ws.split();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Message>(16);
    // Input and window sizes go out through one sender.
    let input = {
        let out_tx = out_tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 8192];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        // The end of the input; the output goes on.
                        let _ = out_tx.send(Message::Binary(bytes::Bytes::new())).await;
                        break;
                    }
                    Ok(n) => {
                        let m = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                        if out_tx.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
    };
    let resize = tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Ok((cols, rows)) = crossterm::terminal::size() {
                let t = json!({"resize": {"cols": cols, "rows": rows}}).to_string();
                if out_tx.send(Message::Text(t.into())).await.is_err() {
                    break;
                }
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut code: Option<i64> = None;
    let mut error: Option<String> = None;
    while let Some(m) = rx.next().await {
        match m? {
            Message::Binary(b) => {
                stdout.write_all(&b).await?;
                stdout.flush().await?;
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if let Some(c) = v["exit"]["code"].as_i64() {
                    code = Some(c);
                }
                if let Some(e) = v["error"].as_str() {
                    error = Some(e.to_owned());
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    input.abort();
    resize.abort();
    writer.abort();
    drop(raw);
    if let Some(e) = error {
        bail!("the connection ended: {e}");
    }
    match code {
        Some(0) | None => Ok(()),
        Some(c) => std::process::exit(i32::try_from(c).unwrap_or(1).clamp(1, 255)),
    }
}

pub async fn port_forward(a: PortForwardArgs) -> Result<()> {
    let local = a.local.unwrap_or(a.port);
    let listener = tokio::net::TcpListener::bind((a.address.as_str(), local))
        .await
        .with_context(|| format!("cannot listen on {}:{local}", a.address))?;
    let path = format!("/api/v1/tasks/{}/ports/{}", a.id, a.port);
    // One connection first, so that a refusal shows at once.
    let first = connect(&a.api, &path).await?;
    eprintln!(
        "forwarding {}:{local} to port {} of task {} (Ctrl-C ends)",
        a.address, a.port, a.id
    );
    let mut spare = Some(first);
    loop {
        let (tcp, _) = listener.accept().await?;
        let ws = match spare.take() {
            Some(ws) => ws,
            None => match connect(&a.api, &path).await {
                Ok(ws) => ws,
                Err(e) => {
                    eprintln!("a connection was refused: {e:#}");
                    continue;
                }
            },
        };
        tokio::spawn(bridge(tcp, ws));
    }
}

/// Carries a local TCP connection through a WebSocket of binary messages.
async fn bridge(tcp: tokio::net::TcpStream, ws: Ws) {
    let (mut r, mut w) = tcp.into_split();
    let (mut tx, mut rx) = ws.split();
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let m = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            }
        }
        // The end of what goes to the task; its answer goes on.
        let _ = tx.send(Message::Binary(bytes::Bytes::new())).await;
    };
    let down = async move {
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Binary(b) if w.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn commands_travel_as_encoded_json() {
        assert_eq!(
            super::encode(r#"["sh","-c","ls /"]"#),
            "%5B%22sh%22%2C%22-c%22%2C%22ls%20%2F%22%5D"
        );
    }
}
