//! The steady load: tasks from real git repositories, short and long, with
//! numbered log lines, an input file and an output file, and tasks whose
//! time limit must end them.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::stack::Stack;

pub const PROJECT: &str = "faults";
/// What the tasks read: its size in bytes is what they write out.
const INPUT: &str = "one two three four five six seven eight nine ten\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Five log lines at once.
    Short,
    /// Ten log lines a second apart.
    Long,
    /// Sleeps past its time limit: must end `timed_out`, never `succeeded`.
    Timed,
}

impl Kind {
    pub fn lines(self) -> usize {
        match self {
            Kind::Short => 5,
            Kind::Long => 10,
            Kind::Timed => 0,
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Kind::Short => "short",
            Kind::Long => "long",
            Kind::Timed => "timed",
        }
    }

    /// The time limit it is given.
    pub fn timeout_seconds(self) -> u64 {
        match self {
            Kind::Timed => TIMED_LIMIT,
            _ => 600,
        }
    }

    /// Drawn from `r` in [0, 1): mostly short, some long, a few timed.
    pub fn draw(r: f64) -> Self {
        if r < 0.65 {
            Kind::Short
        } else if r < 0.9 {
            Kind::Long
        } else {
            Kind::Timed
        }
    }
}

pub const TIMED_LIMIT: u64 = 6;

const MAIN: &str = r#"case "$1" in
short) n=5; pause=0 ;;
long) n=10; pause=1 ;;
timed) echo started; sleep 60; echo late > out.txt; exit 0 ;;
esac
i=1
while [ "$i" -le "$n" ]; do
  echo "line $i"
  [ "$pause" = 0 ] || sleep "$pause"
  i=$((i + 1))
done
wc -c < in.txt > out.txt
"#;

/// The repositories and the input every task uses.
pub struct Fixture {
    code: (String, String),
    env: (String, String),
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=faults",
            "-c",
            "user.email=faults@localhost",
        ])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn repo(dir: &Path, files: &[(&str, &str)]) -> Result<(String, String)> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    git(dir, &["-c", "init.defaultBranch=main", "init", "-q"])?;
    git(dir, &["add", "-A"])?;
    git(dir, &["commit", "-q", "-m", "fault suite"])?;
    Ok((
        format!("file://{}", dir.display()),
        git(dir, &["rev-parse", "HEAD"])?,
    ))
}

impl Fixture {
    pub async fn create(stack: &Stack) -> Result<Self> {
        let dir = stack.work.path().join("repos");
        let code = repo(&dir.join("code"), &[("main.sh", MAIN)])?;
        let env = repo(
            &dir.join("env"),
            &[("Dockerfile", "FROM unidesk/busybox:base\n")],
        )?;
        let input = dir.join("in.txt");
        std::fs::write(&input, INPUT)?;
        let out = tokio::process::Command::new(&stack.bins.unidesk)
            .args(["file", "put", "--quiet"])
            .arg(&input)
            .arg(format!("{PROJECT}:data/in.txt"))
            .envs(stack.server_env())
            .output()
            .await?;
        if !out.status.success() {
            bail!("file put: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { code, env })
    }

    pub fn body(&self, kind: Kind) -> Value {
        json!({
            "project": PROJECT,
            "code_repo_url": self.code.0, "code_commit_id": self.code.1,
            "env_repo_url": self.env.0, "env_commit_id": self.env.1,
            "dockerfile_path": "Dockerfile",
            "command": ["sh", "main.sh", kind.arg()],
            "resources": {"cpus": 0.1, "memory_mb": 64},
            "timeout_seconds": kind.timeout_seconds(),
            "inputs": [{"source": "data/in.txt", "path": "in.txt"}],
            "outputs": ["out.txt"],
        })
    }

    /// What `out.txt` of a task that succeeded holds.
    pub fn expected_output() -> String {
        INPUT.len().to_string()
    }
}

/// A submission the platform acknowledged.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub id: String,
    pub kind: Kind,
}

/// Submits one task through whichever main server answers, with one
/// idempotency key across the attempts; `None` when none acknowledged it.
pub async fn submit(
    http: &reqwest::Client,
    apis: &[String],
    token: &str,
    body: &Value,
) -> Option<String> {
    let key = uuid::Uuid::now_v7().to_string();
    for round in 0..3 {
        for base in apis {
            let sent = http
                .post(format!("{base}/api/v1/tasks"))
                .bearer_auth(token)
                .header("Idempotency-Key", &key)
                .json(body)
                .send()
                .await;
            if let Ok(r) = sent {
                if r.status().is_success() {
                    let v: Value = r.json().await.ok()?;
                    return v["task_id"].as_str().map(str::to_owned);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200 * (round + 1))).await;
    }
    None
}

/// Submissions at a steady rate until stopped.
pub struct Load {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    pub submitted: Arc<Mutex<Vec<Submitted>>>,
    pub refused: Arc<Mutex<usize>>,
}

impl Load {
    pub fn start(
        stack: &Stack,
        fixture: &Fixture,
        rate: f64,
        mut draw: impl FnMut() -> f64 + Send + 'static,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let submitted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let (http, apis, token) = (stack.http.clone(), stack.apis.clone(), stack.admin.clone());
        let bodies: Vec<(Kind, Value)> = [Kind::Short, Kind::Long, Kind::Timed]
            .into_iter()
            .map(|k| (k, fixture.body(k)))
            .collect();
        let (acked, lost) = (submitted.clone(), refused.clone());
        let done = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.01)));
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let kind = Kind::draw(draw());
                let body = bodies
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                let (http, apis, token, acked, lost) = (
                    http.clone(),
                    apis.clone(),
                    token.clone(),
                    acked.clone(),
                    lost.clone(),
                );
                inflight.spawn(async move {
                    match submit(&http, &apis, &token, &body).await {
                        Some(id) => acked.lock().unwrap().push(Submitted { id, kind }),
                        None => *lost.lock().unwrap() += 1,
                    }
                });
            }
            while inflight.join_next().await.is_some() {}
        });
        Self {
            stop,
            done,
            submitted,
            refused,
        }
    }

    /// Stops submitting; returns once every submission in flight is answered.
    pub async fn stop(self) -> (Vec<Submitted>, usize) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
        let s = self.submitted.lock().unwrap().clone();
        let r = *self.refused.lock().unwrap();
        (s, r)
    }
}

/// Submits a short task and waits until it succeeded; its id and the time it took.
pub async fn probe(
    stack: &Stack,
    fixture: &Fixture,
    bound: Duration,
) -> Result<(String, Duration)> {
    let started = Instant::now();
    let deadline = started + bound;
    let id = loop {
        if let Some(id) = submit(
            &stack.http,
            &stack.apis,
            &stack.admin,
            &fixture.body(Kind::Short),
        )
        .await
        {
            break id;
        }
        if Instant::now() > deadline {
            bail!("no main server took a submission within {bound:?}");
        }
    };
    loop {
        if let Ok(t) = stack.get(&format!("/api/v1/tasks/{id}")).await {
            match t["state"].as_str() {
                Some("succeeded") => return Ok((id, started.elapsed())),
                Some("failed" | "timed_out" | "cancelled") => {
                    bail!("the probe task {id} ended {}: {}", t["state"], t["reason"])
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("the probe task {id} did not succeed within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
