//! The `unidesk` binary end to end: `unidesk serve` on real servers, driven
//! by the client, events and projections commands.

use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use ud_testkit::{NatsServer, PgDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_unidesk");

struct Server {
    _nats: NatsServer,
    _pg: PgDatabase,
    child: tokio::process::Child,
    env: Vec<(&'static str, String)>,
}

impl Server {
    async fn start() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let pg = PgDatabase::create().await?;
        let env = vec![
            ("UD_NATS_URL", nats.url()),
            ("UD_DATABASE_URL", pg.url.clone()),
        ];
        let mut child = tokio::process::Command::new(BIN)
            .arg("serve")
            .env("UD_LISTEN", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("UniDesk API listening on ") {
                    return Ok(url.to_owned());
                }
            }
            bail!("unidesk serve exited before listening")
        })
        .await??;
        let mut env = env;
        env.push(("UD_API_URL", url));
        let mut server = Self {
            _nats: nats,
            _pg: pg,
            child,
            env,
        };
        let admin = server.ok(&["admin", "issue-token", "--name", "root", "--admin"])?;
        server.env.push(("UD_TOKEN", admin.trim().to_owned()));
        Ok(server)
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(BIN)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()?)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "unidesk {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn submit_args<'a>(project: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "submit",
        "--project",
        project,
        "--code-repo",
        "https://git.example.org/code.git",
        "--code-commit",
        COMMIT,
        "--cpus",
        "0.5",
        "--label",
        "zone=lab2",
        "--env",
        "SEED=3",
        "--wait",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "python", "train.py", "--epochs", "2"]);
    args
}

#[tokio::test]
async fn a_user_runs_the_whole_cycle_from_the_command_line() -> Result<()> {
    let mut server = Server::start().await?;
    let token = server.ok(&["token", "issue", "--name", "alice", "--project", "lab"])?;
    // Alice's own token from here on.
    server.env.retain(|(k, _)| *k != "UD_TOKEN");
    server.env.push(("UD_TOKEN", token.trim().to_owned()));

    // A tail started before the submit sees it.
    let mut tail = tokio::process::Command::new(BIN)
        .args([
            "events",
            "tail",
            "--subject",
            "ud.task.*.submitted",
            "--count",
            "1",
        ])
        .envs(server.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut tail_out =
        BufReader::new(tail.stdout.take().ok_or_else(|| anyhow!("no stdout"))?).lines();
    let mut tail_err =
        BufReader::new(tail.stderr.take().ok_or_else(|| anyhow!("no stderr"))?).lines();
    let ready =
        tokio::time::timeout(std::time::Duration::from_secs(10), tail_err.next_line()).await??;
    assert_eq!(ready.as_deref(), Some("following ud.task.*.submitted"));
    let id = server
        .ok(&submit_args("lab", &["--idempotency-key", "cli-1"]))?
        .trim()
        .to_owned();
    let tail_line = tokio::time::timeout(std::time::Duration::from_secs(10), tail_out.next_line())
        .await??
        .ok_or_else(|| anyhow!("tail printed nothing"))?;
    let event: serde_json::Value = serde_json::from_str(&tail_line)?;
    assert_eq!(event["type"], "task.submitted");
    assert_eq!(
        event["data"]["spec"]["command"],
        serde_json::json!(["python", "train.py", "--epochs", "2"])
    );

    // Same idempotency key: same task.
    let again = server.ok(&submit_args("lab", &["--idempotency-key", "cli-1"]))?;
    assert_eq!(again.trim(), id);

    let shown: serde_json::Value = serde_json::from_str(&server.ok(&["show", &id])?)?;
    assert_eq!(shown["state"], "pending");
    assert_eq!(shown["spec"]["resources"]["cpu_millis"], 500);
    assert_eq!(
        shown["spec"]["env_repo_url"],
        "https://git.example.org/code.git"
    );
    assert_eq!(shown["spec"]["env"]["SEED"], "3");
    let list = server.ok(&["list", "--state", "pending"])?;
    assert!(list.contains(&id), "{list}");

    // A rerun submits the exact same versions, command and resources.
    let again = server.ok(&["task", "rerun", &id])?.trim().to_owned();
    // A pending task's priority can change (no node runs here, so it stays pending).
    server.ok(&["task", "priority", &again, "-5"])?;
    let moved: serde_json::Value = serde_json::from_str(&server.ok(&["show", &again])?)?;
    assert_eq!(moved["priority"], -5);
    assert_ne!(again, id);
    let rerun: serde_json::Value = serde_json::from_str(&server.ok(&["show", &again])?)?;
    assert_eq!(rerun["spec"], shown["spec"]);
    server.ok(&["cancel", &again])?;

    server.ok(&["cancel", &id, "--reason", "enough"])?;
    let history = server.ok(&["history", &id])?;
    let types: Vec<String> = history
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["type"].as_str().map(str::to_owned))
        // With no node enrolled the scheduler may have said why it waits.
        .filter(|t| t != "task.waiting")
        .collect();
    assert_eq!(types, vec!["task.submitted", "task.cancelled"]);

    // A second cancel is refused with a clear message and a non-zero exit.
    let out = server.run(&["cancel", &id])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"));
    // Bad input names the field.
    let out = server.run(&[
        "submit",
        "--project",
        "lab",
        "--code-repo",
        "https://x.org/r.git",
        "--code-commit",
        "main",
        "--",
        "true",
    ])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("code_commit_id"));

    // Audit export of one task, straight from the stream.
    let export = server.ok(&["events", "export", "--task", &id])?;
    let not_waiting = |v: &serde_json::Value| v["type"] != "task.waiting";
    let exported: Vec<serde_json::Value> = export
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(not_waiting)
        .collect();
    assert_eq!(exported.len(), 2);
    assert_eq!(exported[1]["type"], "task.cancelled");
    assert!(exported[0]["payload_cbor"]
        .as_str()
        .is_some_and(|p| !p.is_empty()));
    let all = server.ok(&[
        "events",
        "export",
        "--stream",
        "UD_TASKS",
        "--since",
        "2000-01-01T00:00:00Z",
    ])?;
    assert_eq!(
        all.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(not_waiting)
            .count(),
        5
    );
    let none = server.ok(&[
        "events",
        "export",
        "--stream",
        "UD_TASKS",
        "--until",
        "2000-01-01T00:00:00Z",
    ])?;
    assert_eq!(none.lines().count(), 0);

    // Replay into an empty schema equals the live tables.
    let rebuild: serde_json::Value =
        serde_json::from_str(&server.ok(&["projections", "rebuild", "--schema", "audit"])?)?;
    assert_eq!(rebuild["equal"], true, "{rebuild}");
    server.child.kill().await?;
    Ok(())
}
