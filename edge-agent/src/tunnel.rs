//! What the platform's tunnels reach on this node: the ports a running task
//! declared (dialled at its container's address, never another), and
//! processes started in its container (`unidesk task exec`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use bollard::query_parameters::ResizeExecOptions;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use ud_schemas::TaskId;
use ud_tunnel::{Activity, Control, Endpoint, Open, Target};

use crate::docker;

/// A running task the tunnels may reach.
#[derive(Clone)]
pub(crate) struct Reach {
    pub container: String,
    pub ports: Vec<u16>,
    /// The time of the last byte through any of its connections.
    pub activity: Activity,
    /// The container's address, asked of Docker once.
    pub address: Arc<tokio::sync::OnceCell<std::net::IpAddr>>,
}

/// The node's running tasks, as tunnels see them.
#[derive(Clone, Default)]
pub(crate) struct Reachable(Arc<Mutex<HashMap<TaskId, Reach>>>);

impl Reachable {
    /// Lists a started run; its activity starts now.
    pub fn insert(&self, task: TaskId, container: String, ports: Vec<u16>) -> Activity {
        let activity = Activity::default();
        activity.store(
            ud_schemas::now_millis(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                task,
                Reach {
                    container,
                    ports,
                    activity: activity.clone(),
                    address: Arc::default(),
                },
            );
        }
        activity
    }

    pub fn remove(&self, task: &TaskId) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(task);
        }
    }

    fn get(&self, task: &TaskId) -> Option<Reach> {
        self.0.lock().ok()?.get(task).cloned()
    }
}

/// Longest a declared port may refuse connections after its container
/// started (the program in it is starting).
const DIAL_FOR: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(crate) struct Resolver {
    pub runtime: std::sync::Arc<dyn crate::runtime::Runtime>,
    /// Exec needs the Docker engine (none on a Kubernetes node).
    pub docker: Option<docker::Executor>,
    pub reachable: Reachable,
}

impl ud_tunnel::Resolver for Resolver {
    async fn connect(&self, open: Open) -> Result<Endpoint, String> {
        let reach = self
            .reachable
            .get(&open.task)
            .ok_or("the task does not run on this node (it has ended, or not started)")?;
        match open.target {
            Target::Port(port) => self.dial(&reach, port).await,
            Target::Exec {
                command,
                tty,
                cols,
                rows,
            } => match &self.docker {
                Some(d) => exec(&d.client(), &reach, command, tty, cols, rows).await,
                None => Err("exec into a task is not available on a node that runs tasks as Kubernetes Pods".into()),
            },
        }
    }
}

impl Resolver {
    async fn dial(&self, reach: &Reach, port: u16) -> Result<Endpoint, String> {
        if !reach.ports.contains(&port) {
            return Err(format!(
                "port {port} is not one the task declared (ports: {:?})",
                reach.ports
            ));
        }
        let ip = *reach
            .address
            .get_or_try_init(|| async {
                self.runtime
                    .address(&reach.container)
                    .await
                    .ok_or("the task's container has no network address")
            })
            .await?;
        let start = Instant::now();
        loop {
            match tokio::net::TcpStream::connect((ip, port)).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Endpoint {
                        io: Box::new(s),
                        controls_in: None,
                        controls_out: None,
                        activity: Some(reach.activity.clone()),
                    });
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && start.elapsed() < DIAL_FOR =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(format!("nothing answers on port {port} in the task: {e}"));
                }
            }
        }
    }
}

async fn exec(
    docker: &bollard::Docker,
    reach: &Reach,
    command: Vec<String>,
    tty: bool,
    cols: u16,
    rows: u16,
) -> Result<Endpoint, String> {
    if command.is_empty() || command.len() > 256 {
        return Err("exec needs a command (at most 256 words)".into());
    }
    let created = docker
        .create_exec(
            &reach.container,
            ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(tty),
                cmd: Some(command),
                console_size: (tty && cols > 0 && rows > 0)
                    .then(|| vec![usize::from(rows), usize::from(cols)]),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("cannot start the command: {e}"))?;
    let id = created.id;
    let started = docker
        .start_exec(
            &id,
            Some(StartExecOptions {
                detach: false,
                tty,
                output_capacity: None,
            }),
        )
        .await
        .map_err(|e| format!("cannot start the command: {e}"))?;
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    else {
        return Err("the command started detached".into());
    };
    if tty && cols > 0 && rows > 0 {
        // Engines before API 1.42 ignore the size given at creation.
        let size = ResizeExecOptions {
            h: i32::from(rows),
            w: i32::from(cols),
        };
        let _ = docker.resize_exec(&id, size).await;
    }
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let (mut theirs_r, mut theirs_w) = tokio::io::split(theirs);
    let (resize_tx, mut resize_rx) = mpsc::channel::<Control>(8);
    let (exit_tx, exit_rx) = mpsc::channel::<Control>(1);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut theirs_r, &mut input).await;
        let _ = input.shutdown().await;
    });
    {
        let (docker, id) = (docker.clone(), id.clone());
        tokio::spawn(async move {
            while let Some(c) = resize_rx.recv().await {
                if let Control::Resize { cols, rows } = c {
                    let size = ResizeExecOptions {
                        h: i32::from(rows),
                        w: i32::from(cols),
                    };
                    let _ = docker.resize_exec(&id, size).await;
                }
            }
        });
    }
    let docker = docker.clone();
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = output.next().await {
            if theirs_w.write_all(&chunk.into_bytes()).await.is_err() {
                break;
            }
        }
        // The exit code, then the end of the output.
        let mut code = -1;
        for _ in 0..40 {
            match docker.inspect_exec(&id).await {
                Ok(i) if i.running == Some(false) => {
                    code = i.exit_code.unwrap_or(-1);
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                Err(_) => break,
            }
        }
        let _ = exit_tx.send(Control::Exit { code }).await;
        let _ = theirs_w.shutdown().await;
    });
    Ok(Endpoint {
        io: Box::new(ours),
        controls_in: Some(resize_tx),
        controls_out: Some(exit_rx),
        activity: Some(reach.activity.clone()),
    })
}
