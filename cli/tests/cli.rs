//! The `unidesk` binary end to end: `unidesk serve` on real servers, driven
//! by the client, events and projections commands.

use std::process::{Command, Output, Stdio};

use anyhow::{anyhow, bail, ensure, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use ud_testkit::{NatsServer, PgDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_unidesk");

struct Server {
    _nats: NatsServer,
    _pg: PgDatabase,
    child: tokio::process::Child,
    env: Vec<(&'static str, String)>,
}

/// Starts `unidesk serve` with `env`; returns it and its API URL once it listens.
async fn spawn_serve(env: &[(&'static str, String)]) -> Result<(tokio::process::Child, String)> {
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
    Ok((child, url))
}

impl Server {
    /// Stops `unidesk serve` with SIGTERM (it must exit cleanly) and starts it again.
    async fn restart_serve(&mut self) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("serve is not running"))?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill failed");
        let exit =
            tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait()).await??;
        ensure!(exit.success(), "serve exited with {exit} on SIGTERM");
        self.env.retain(|(k, _)| *k != "UD_API_URL");
        let (child, url) = spawn_serve(&self.env).await?;
        self.child = child;
        self.env.push(("UD_API_URL", url));
        Ok(())
    }

    async fn start() -> Result<Self> {
        Self::start_with(vec![]).await
    }

    async fn start_with(extra: Vec<(&'static str, String)>) -> Result<Self> {
        let mut server = Self::start_on(
            NatsServer::start().await?,
            PgDatabase::create().await?,
            extra,
        )
        .await?;
        let admin = server.ok(&["admin", "issue-token", "--name", "root", "--admin"])?;
        server.env.push(("UD_TOKEN", admin.trim().to_owned()));
        Ok(server)
    }

    /// `unidesk serve` on these servers, without a token yet.
    async fn start_on(
        nats: NatsServer,
        pg: PgDatabase,
        extra: Vec<(&'static str, String)>,
    ) -> Result<Self> {
        let mut env = vec![
            ("UD_NATS_URL", nats.url()),
            ("UD_DATABASE_URL", pg.url.clone()),
        ];
        env.extend(extra);
        let (child, url) = spawn_serve(&env).await?;
        env.push(("UD_API_URL", url));
        Ok(Self {
            _nats: nats,
            _pg: pg,
            child,
            env,
        })
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
            "--json",
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
    // What the stream stored: its sequence and time come with it.
    assert!(event["seq"].as_u64().is_some_and(|s| s > 0), "{event}");
    assert!(
        !event["stored_at"].as_str().unwrap_or_default().is_empty(),
        "{event}"
    );
    assert_eq!(
        event["data"]["spec"]["command"],
        serde_json::json!(["python", "train.py", "--epochs", "2"])
    );

    // Same idempotency key: same task.
    let again = server.ok(&submit_args("lab", &["--idempotency-key", "cli-1"]))?;
    assert_eq!(again.trim(), id);

    let shown: serde_json::Value = serde_json::from_str(&server.ok(&["show", "--json", &id])?)?;
    assert_eq!(shown["state"], "pending");
    // For people: a summary, not JSON.
    let summary = server.ok(&["show", &id])?;
    assert!(
        summary.contains("id:") && summary.contains("state:       pending"),
        "{summary}"
    );
    assert!(serde_json::from_str::<serde_json::Value>(&summary).is_err());
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
    let moved: serde_json::Value = serde_json::from_str(&server.ok(&["show", "--json", &again])?)?;
    assert_eq!(moved["priority"], -5);
    assert_ne!(again, id);
    let rerun: serde_json::Value = serde_json::from_str(&server.ok(&["show", "--json", &again])?)?;
    assert_eq!(rerun["spec"], shown["spec"]);
    server.ok(&["cancel", &again])?;
    // Queue settings are for admins.
    let refused = server.run(&["queue", "set", "gpu", "--priority", "1"])?;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin token is required"));

    server.ok(&["cancel", &id, "--reason", "enough"])?;
    let history = server.ok(&["history", "--json", &id])?;
    let types: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&history)?
        .into_iter()
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
    let rebuild: serde_json::Value = serde_json::from_str(&server.ok(&[
        "projections",
        "rebuild",
        "--schema",
        "audit",
        "--json",
    ])?)?;
    assert_eq!(rebuild["equal"], true, "{rebuild}");
    server.child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn files_go_up_and_down_from_the_command_line_and_resume() -> Result<()> {
    use rand::RngCore;
    use sha2::{Digest, Sha256};
    let g = ud_testkit::Garage::start().await?;
    let server = Server::start_with(vec![
        ("UD_S3_ENDPOINT", g.endpoint.clone()),
        ("UD_S3_REGION", g.region.clone()),
        ("UD_S3_BUCKET", g.bucket.clone()),
        ("UD_S3_ACCESS_KEY_ID", g.access_key_id.clone()),
        ("UD_S3_SECRET_ACCESS_KEY", g.secret_access_key.clone()),
        ("UD_PROJECT_QUOTA_MB", "100".into()),
    ])
    .await?;
    let dir = tempfile::tempdir()?;
    let local = dir.path().join("big.bin");
    let mut bytes = vec![0u8; 40 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut bytes);
    std::fs::write(&local, &bytes)?;
    let path = local.to_string_lossy().into_owned();

    // An upload cut off after its first part: started through the API, one part sent.
    let api = server
        .env
        .iter()
        .find(|(k, _)| *k == "UD_API_URL")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let token = server
        .env
        .iter()
        .find(|(k, _)| *k == "UD_TOKEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let http = reqwest::Client::new();
    let plan: serde_json::Value = http
        .post(format!("{api}/api/v1/projects/lab/uploads"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"path": "data/big.bin", "size_bytes": bytes.len()}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let part_size = plan["part_size"].as_u64().unwrap_or(0) as usize;
    let first = plan["parts"][0]["url"]["url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    http.put(first)
        .body(bytes[..part_size].to_vec())
        .send()
        .await?
        .error_for_status()?;
    let upload_id = plan["upload_id"].as_str().unwrap_or_default();
    std::fs::write(
        dir.path().join("big.bin.unidesk-upload"),
        serde_json::json!({"project": "lab", "path": "data/big.bin", "size": bytes.len(), "upload_id": upload_id}).to_string(),
    )?;

    // Running the same put again finishes that upload.
    let out = server.run(&["file", "put", "--quiet", &path, "lab:data/big.bin"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!(
        "resuming upload {upload_id}: 1 part(s) already stored"
    )));
    assert!(!dir.path().join("big.bin.unidesk-upload").exists());
    let small = dir.path().join("notes.txt");
    std::fs::write(&small, "hello")?;
    server.ok(&[
        "file",
        "put",
        "--quiet",
        &small.to_string_lossy(),
        "lab:data/",
    ])?;
    let listed = server.ok(&["file", "ls", "lab:data"])?;
    assert!(
        listed.contains(&format!("{}  data/big.bin", bytes.len()))
            && listed.contains("5  data/notes.txt"),
        "{listed}"
    );

    // A download cut off after 10 MiB resumes from there.
    let got = dir.path().join("got.bin");
    std::fs::write(dir.path().join("got.bin.part"), &bytes[..10 * 1024 * 1024])?;
    let out = server.run(&[
        "file",
        "get",
        "--quiet",
        "lab:data/big.bin",
        &got.to_string_lossy(),
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming download at byte 10485760"));
    assert_eq!(Sha256::digest(std::fs::read(&got)?), Sha256::digest(&bytes));

    // Over the quota, a missing file, a target without a file: clear errors.
    let huge = dir.path().join("huge.bin");
    std::fs::File::create(&huge)?.set_len(70 * 1024 * 1024)?;
    let out = server.run(&["file", "put", "--quiet", &huge.to_string_lossy(), "lab:"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("quota"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.run(&["file", "get", "lab:data/none.bin", &got.to_string_lossy()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = server.run(&["file", "get", "lab:"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("name the file"));
    Ok(())
}

#[tokio::test]
async fn a_backup_brings_every_task_and_event_back_after_the_servers_are_gone() -> Result<()> {
    // No scheduler: nothing writes to the streams but this test.
    let quiet = || vec![("UD_NO_EDGE", "true".to_owned())];
    let server = Server::start_with(quiet()).await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let key = format!("drill-{i}");
        ids.push(
            server
                .ok(&submit_args("lab", &["--idempotency-key", &key]))?
                .trim()
                .to_owned(),
        );
    }
    server.ok(&["cancel", &ids[0], "--reason", "drill"])?;
    // A stream with a header block async-nats cannot read (a node can write
    // one into its own stream): the backup reads it and goes on.
    let js = async_nats::jetstream::new(server._nats.connect().await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "UD_NOTES".into(),
        subjects: vec!["notes.>".into()],
        ..Default::default()
    })
    .await?;
    store_raw(&server._nats, "notes.1", b"NATS/1.0\r\nX: a\rb\r\n\r\n").await?;
    let before: Vec<(String, String)> = ids
        .iter()
        .map(|id| {
            Ok((
                server.ok(&["history", "--json", id])?,
                server.ok(&["show", "--json", id])?,
            ))
        })
        .collect::<Result<_>>()?;

    // Eight older backups are there already; the newest seven are kept.
    let dir = tempfile::tempdir()?;
    for day in 1..=8 {
        let old = dir.path().join(format!("2026010{day}T000000.000Z"));
        std::fs::create_dir_all(&old)?;
        std::fs::write(old.join("manifest.json"), "{}")?;
    }
    let pg_bin = std::env::var("PG_BIN").unwrap_or_default();
    let mut args = vec!["backup", "--dir"];
    let dir_arg = dir.path().to_string_lossy().into_owned();
    args.push(&dir_arg);
    if !pg_bin.is_empty() {
        args.extend(["--pg-bin", &pg_bin]);
    }
    let taken = server.ok(&args)?.trim().to_owned();
    let kept = std::fs::read_dir(dir.path())?.count();
    assert_eq!(kept, 7);
    assert!(std::path::Path::new(&taken).join("postgres.dump").exists());
    assert!(
        !dir.path().join("20260101T000000.000Z").exists()
            && !dir.path().join("20260102T000000.000Z").exists()
    );

    // Everything is destroyed; new, empty servers get the backup.
    let admin = server
        .env
        .iter()
        .find(|(k, _)| *k == "UD_TOKEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    drop(server);
    let (nats, pg) = (NatsServer::start().await?, PgDatabase::create().await?);
    let env = [
        ("UD_NATS_URL", nats.url()),
        ("UD_DATABASE_URL", pg.url.clone()),
    ];
    let restore = |extra: &[&str]| {
        let mut args = vec!["restore".to_owned(), taken.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        if !pg_bin.is_empty() {
            args.extend(["--pg-bin".to_owned(), pg_bin.clone()]);
        }
        Command::new(BIN)
            .args(&args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
    };
    let out = restore(&[])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second restore over what is there now is refused unless forced.
    let again = restore(&[])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"));

    let mut server = Server::start_on(nats, pg, quiet()).await?;
    server.env.push(("UD_TOKEN", admin));
    // Every event comes back as it was; only the stream's own storage time is the restore's.
    let events = history_without_storage_times;
    for (id, (history, shown)) in ids.iter().zip(&before) {
        let restored = events(&server.ok(&["history", "--json", id])?);
        assert!(!restored.is_empty());
        assert_eq!(restored, events(history), "history of {id}");
        assert_eq!(
            &server.ok(&["show", "--json", id])?,
            shown,
            "read model of {id}"
        );
    }
    // The restored platform goes on: the idempotency keys hold, new commands pass the concurrency checks.
    assert_eq!(
        server
            .ok(&submit_args("lab", &["--idempotency-key", "drill-1"]))?
            .trim(),
        ids[1]
    );
    server.ok(&["cancel", &ids[2], "--reason", "after the restore"])?;
    let fresh = server.ok(&submit_args("lab", &[]))?.trim().to_owned();
    assert!(!ids.contains(&fresh));
    // The unreadable header came back as the guard mended it.
    let js = async_nats::jetstream::new(server._nats.connect().await?);
    let note = js.get_stream("UD_NOTES").await?.get_raw_message(1).await?;
    assert_eq!(note.headers.get("X").map(|v| v.as_str()), Some("a b"));
    Ok(())
}

/// Publishes `block` and an empty payload into a stream as a raw client
/// (async-nats cannot write such a block), and waits for the stream's ack.
async fn store_raw(nats: &NatsServer, subject: &str, block: &[u8]) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", nats.port())).await?;
    let mut out = b"CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB raw.ack 1\r\n".to_vec();
    out.extend_from_slice(
        format!("HPUB {subject} raw.ack {} {}\r\n", block.len(), block.len()).as_bytes(),
    );
    out.extend_from_slice(block);
    out.extend_from_slice(b"\r\n");
    raw.write_all(&out).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("MSG raw.ack") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), raw.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no ack: {}", String::from_utf8_lossy(&seen)))??;
        if n == 0 {
            anyhow::bail!("closed: {}", String::from_utf8_lossy(&seen));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

#[tokio::test]
async fn a_backup_in_the_object_store_outlives_the_machine_it_was_taken_on() -> Result<()> {
    let g = ud_testkit::Garage::start().await?;
    let s3 = vec![
        ("UD_S3_ENDPOINT", g.endpoint.clone()),
        ("UD_S3_REGION", g.region.clone()),
        ("UD_S3_BUCKET", g.bucket.clone()),
        ("UD_S3_ACCESS_KEY_ID", g.access_key_id.clone()),
        ("UD_S3_SECRET_ACCESS_KEY", g.secret_access_key.clone()),
    ];
    let quiet = || {
        let mut env = s3.clone();
        env.push(("UD_NO_EDGE", "true".to_owned()));
        env
    };
    let server = Server::start_with(quiet()).await?;
    let pg_bin = std::env::var("PG_BIN").unwrap_or_default();
    let with_pg_bin = |mut args: Vec<String>| {
        if !pg_bin.is_empty() {
            args.extend(["--pg-bin".to_owned(), pg_bin.clone()]);
        }
        args
    };
    // Without object store settings the backup refuses before it starts.
    let local = tempfile::tempdir()?;
    let dir = local.path().to_string_lossy().into_owned();
    let out = Command::new(BIN)
        .args(with_pg_bin(vec![
            "backup".into(),
            "--to-object-store".into(),
            "--dir".into(),
            dir.clone(),
        ]))
        .envs(
            server
                .env
                .iter()
                .filter(|(k, _)| !k.starts_with("UD_S3"))
                .map(|(k, v)| (*k, v.as_str())),
        )
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not configured"));
    assert_eq!(
        std::fs::read_dir(local.path())?.count(),
        0,
        "nothing written"
    );

    // A copy an earlier backup never finished (no manifest) is there.
    let settings = ud_storage::StorageSettings::path_style(
        &g.endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    let store = ud_storage::Storage::new(settings)?;
    store
        .put(
            "backups/20260101T000000.000Z/streams/UD_TASKS.bin",
            b"cut short".to_vec(),
            "application/octet-stream",
        )
        .await?;
    let first = server.ok(&submit_args("lab", &[]))?.trim().to_owned();
    let backup = |keep: &str| {
        server.ok(&with_pg_bin(vec![
            "backup".into(),
            "--to-object-store".into(),
            "--keep".into(),
            keep.into(),
            "--dir".into(),
            dir.clone(),
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    };
    backup("1")?;
    server.ok(&["cancel", &first, "--reason", "before the second backup"])?;
    let second = server.ok(&submit_args("lab", &[]))?.trim().to_owned();
    let taken = backup("1")?.trim().to_owned();
    let name = std::path::Path::new(&taken)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The store keeps the newest complete backup only; the unfinished copy is gone.
    let folders: std::collections::BTreeSet<String> = store
        .list("backups/")
        .await?
        .iter()
        .filter_map(|o| o.key.split('/').nth(1).map(str::to_owned))
        .collect();
    assert_eq!(folders.into_iter().collect::<Vec<_>>(), vec![name.clone()]);
    let before: Vec<(String, String)> = [&first, &second]
        .iter()
        .map(|id| {
            Ok((
                server.ok(&["history", "--json", id])?,
                server.ok(&["show", "--json", id])?,
            ))
        })
        .collect::<Result<_>>()?;
    let admin = server
        .env
        .iter()
        .find(|(k, _)| *k == "UD_TOKEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();

    // The machine is lost with its backup folder; new servers, a new disk.
    drop(server);
    drop(local);
    let (nats, pg) = (NatsServer::start().await?, PgDatabase::create().await?);
    let fresh = tempfile::tempdir()?;
    let restore = |from: &str| {
        let mut env: Vec<(&str, String)> = s3.clone();
        env.push(("UD_NATS_URL", nats.url()));
        env.push(("UD_DATABASE_URL", pg.url.clone()));
        Command::new(BIN)
            .args(with_pg_bin(vec![
                "restore".into(),
                from.into(),
                "--from-object-store".into(),
                "--dir".into(),
                fresh.path().to_string_lossy().into_owned(),
            ]))
            .envs(env)
            .output()
    };
    let out = restore("20991231T000000.000Z")?;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no complete backup") && said.contains(&name),
        "{said}"
    );
    let out = restore("latest")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fresh.path().join(&name).join("postgres.dump").exists());

    let mut server = Server::start_on(nats, pg, quiet()).await?;
    server.env.push(("UD_TOKEN", admin));
    for (id, (history, shown)) in [&first, &second].iter().zip(&before) {
        let strip = history_without_storage_times;
        assert_eq!(
            strip(&server.ok(&["history", "--json", id])?),
            strip(history),
            "history of {id}"
        );
        // The same read model; only the archived log's link is signed anew.
        let unsigned = |text: &str| -> Result<serde_json::Value> {
            let mut v: serde_json::Value = serde_json::from_str(text)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("log_archive");
            }
            Ok(v)
        };
        assert_eq!(
            unsigned(&server.ok(&["show", "--json", id])?)?,
            unsigned(shown)?,
            "read model of {id}"
        );
    }
    Ok(())
}

/// The streams and read models the previous release (0.1.0) left behind,
/// made by `tests/fixtures/make-release-fixture.sh` with that release's own
/// binaries (its local stack, its main job and more work, then its own
/// `unidesk backup`). Restored into empty servers, this version migrates the
/// tables, reads every old event, rebuilds read models from the old streams
/// equal to the migrated ones, and goes on working on them.
#[tokio::test]
async fn this_version_takes_over_the_streams_and_tables_of_the_previous_release() -> Result<()> {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/release-0.1.0");
    let (nats, pg) = (NatsServer::start().await?, PgDatabase::create().await?);
    let pg_bin = std::env::var("PG_BIN").unwrap_or_default();
    let mut args = vec!["restore".to_owned(), fixture.display().to_string()];
    if !pg_bin.is_empty() {
        args.extend(["--pg-bin".to_owned(), pg_bin.clone()]);
    }
    let out = Command::new(BIN)
        .args(&args)
        .env("UD_NATS_URL", nats.url())
        .env("UD_DATABASE_URL", &pg.url)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = pg.connect().await?;
    let version = "SELECT max(version) FROM refinery_schema_history";
    let old: i32 = db.query_one(version, &[]).await?.get(0);
    let latest =
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations"))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_prefix('V')?
                    .split("__")
                    .next()?
                    .parse::<i32>()
                    .ok()
            })
            .max()
            .unwrap_or_default();
    assert!(
        old < latest,
        "the fixture's tables are at V{old}, this version's at V{latest}"
    );

    let mut server = Server::start_on(nats, pg, vec![("UD_NO_EDGE", "true".to_owned())]).await?;
    let now: i32 = db.query_one(version, &[]).await?.get(0);
    assert_eq!(now, latest, "migrations ran");
    let admin = server.ok(&["admin", "issue-token", "--name", "upgrade", "--admin"])?;
    server.env.push(("UD_TOKEN", admin.trim().to_owned()));

    // Every old event of every stream decodes with this version.
    for stream in ["UD_TASKS", "UD_NODES", "UD_HEARTBEATS", "UD_AUTH"] {
        let lines = server.ok(&["events", "export", "--stream", stream])?;
        let events: Vec<serde_json::Value> = lines
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert!(!events.is_empty(), "{stream} is empty in the fixture");
        for e in &events {
            assert!(e.get("decode_error").is_none(), "{stream}: {e}");
        }
    }
    // The old release's tasks are there as it left them, with their histories.
    let rows = db
        .query(
            "SELECT id::text, state FROM tasks ORDER BY submitted_at",
            &[],
        )
        .await?;
    let states: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(1)).collect();
    for s in ["succeeded", "failed", "cancelled"] {
        assert!(states.contains(s), "no {s} task in the fixture: {states:?}");
    }
    for r in &rows {
        let id: String = r.get(0);
        let history = server.ok(&["history", "--json", &id])?;
        let events: Vec<serde_json::Value> = serde_json::from_str(&history)?;
        assert!(events.len() >= 2, "history of {id}: {history}");
        let shown: serde_json::Value = serde_json::from_str(&server.ok(&["show", "--json", &id])?)?;
        assert_eq!(
            shown["state"].as_str(),
            Some(r.get::<_, String>(1).as_str())
        );
    }
    let succeeded: String = rows
        .iter()
        .find(|r| r.get::<_, String>(1) == "succeeded")
        .map(|r| r.get(0))
        .unwrap_or_default();
    let shown: serde_json::Value =
        serde_json::from_str(&server.ok(&["show", "--json", &succeeded])?)?;
    assert!(
        shown["outputs"].as_array().is_some_and(|o| !o.is_empty()),
        "the main job's outputs: {shown}"
    );
    // Read models rebuilt from the old streams by this version equal the migrated ones.
    let rebuilt: serde_json::Value =
        serde_json::from_str(&server.ok(&["projections", "rebuild", "--json"])?)?;
    assert_eq!(rebuilt["equal"], true, "{rebuilt}");
    let errors: i64 = db
        .query_one("SELECT count(*) FROM projection_errors", &[])
        .await?
        .get(0);
    assert_eq!(errors, 0);
    // Work goes on over the old streams: an old task rerun, a new one submitted.
    let rerun = server.ok(&["task", "rerun", &succeeded])?.trim().to_owned();
    assert_ne!(rerun, succeeded);
    let fresh = server.ok(&submit_args("demo", &[]))?.trim().to_owned();
    server.ok(&["cancel", &fresh, "--reason", "after the upgrade"])?;
    // And the upgraded server restarts on them as on its own.
    server.restart_serve().await?;
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&server.ok(&["history", "--json", &fresh])?)?;
    let last = history.last().cloned().unwrap_or_default();
    assert!(
        last["subject"]
            .as_str()
            .is_some_and(|s| s.ends_with(".cancelled")),
        "{history:?}"
    );
    Ok(())
}

/// `unidesk history` lines without the storage time a restore sets anew.
fn history_without_storage_times(text: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(text)
        .unwrap_or_default()
        .into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("stored_at");
            }
            v
        })
        .collect()
}

/// `unidesk serve` with these settings: its exit status and what it said.
fn serve_fails(env: &[(&str, &str)]) -> Result<(bool, String)> {
    let out = Command::new(BIN)
        .arg("serve")
        .env_remove("UD_DATABASE_URL")
        .env_remove("UD_NATS_URL")
        .env("UD_LISTEN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn a_bad_setting_names_itself_and_the_server_exits_before_serving() -> Result<()> {
    let nats = NatsServer::start().await?;
    let pg = PgDatabase::create().await?;
    let (nats_url, pg_url) = (nats.url(), pg.url.clone());
    let missing_db = pg_url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/no_such_database"))
        .unwrap_or_default();
    // A stores file whose project has two stores and names no default.
    let dir = tempfile::tempdir()?;
    let stores_file = dir.path().join("stores.json");
    let store = serde_json::json!({"bucket": "b", "access_key_id": "k", "secret_access_key": "s"});
    std::fs::write(
        &stores_file,
        serde_json::json!({"projects": {"lab": {"stores": {"one": store, "two": store}}}})
            .to_string(),
    )?;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("UD_NATS_URL", &nats_url)], "UD_DATABASE_URL"),
        (
            vec![("UD_NATS_URL", "not a url"), ("UD_DATABASE_URL", &pg_url)],
            "NATS",
        ),
        (
            vec![("UD_NATS_URL", &nats_url), ("UD_DATABASE_URL", &missing_db)],
            "PostgreSQL",
        ),
        (
            vec![
                ("UD_NATS_URL", &nats_url),
                ("UD_DATABASE_URL", &pg_url),
                ("UD_S3_BUCKET", "b"),
            ],
            "UD_S3_ACCESS_KEY_ID",
        ),
        (
            vec![
                ("UD_NATS_URL", &nats_url),
                ("UD_DATABASE_URL", &pg_url),
                ("UD_HEARTBEAT_TIMEOUT_SECONDS", "-3"),
            ],
            "UD_HEARTBEAT_TIMEOUT_SECONDS",
        ),
        (
            vec![
                ("UD_NATS_URL", &nats_url),
                ("UD_DATABASE_URL", &pg_url),
                ("UD_PLACEMENT", "random"),
            ],
            "UD_PLACEMENT",
        ),
        (
            vec![
                ("UD_NATS_URL", &nats_url),
                ("UD_DATABASE_URL", &pg_url),
                ("UD_STORES_FILE", "/nonexistent/stores.json"),
            ],
            "UD_STORES_FILE",
        ),
        (
            vec![
                ("UD_NATS_URL", &nats_url),
                ("UD_DATABASE_URL", &pg_url),
                ("UD_STORES_FILE", stores_file.to_str().unwrap_or_default()),
            ],
            "several stores and no default",
        ),
    ];
    for (env, named) in cases {
        let (ok, said) = serve_fails(&env)?;
        assert!(!ok, "started with a bad {named}");
        assert!(
            said.contains(named),
            "the error does not name {named}: {said}"
        );
    }
    // A NATS password the server refuses says so, without printing it.
    let auth = NatsServer::start_with(ud_testkit::NatsOptions {
        extra: "authorization { user: platform, password: right }\n".into(),
        ..Default::default()
    })
    .await?;
    let wrong = auth.url().replace("nats://", "nats://platform:wrong@");
    let (ok, said) = serve_fails(&[("UD_NATS_URL", &wrong), ("UD_DATABASE_URL", &pg_url)])?;
    assert!(!ok);
    assert!(
        said.contains("cannot connect to NATS") && !said.contains("wrong"),
        "{said}"
    );
    Ok(())
}

#[tokio::test]
async fn the_server_stops_on_sigterm_and_resumes_where_it_was() -> Result<()> {
    let mut server = Server::start_with(vec![("UD_NO_EDGE", "true".to_owned())]).await?;
    let mut acked = Vec::new();
    for round in 0..3 {
        for i in 0..20 {
            let key = format!("term-{round}-{i}");
            acked.push(
                server
                    .ok(&submit_args("lab", &["--idempotency-key", &key]))?
                    .trim()
                    .to_owned(),
            );
        }
        // Stopped at once after writes; then started again on the same streams and tables.
        server.restart_serve().await?;
    }
    // Everything acknowledged is there, projected, and the keys still hold.
    let listed = server.ok(&["list", "--project", "lab", "--limit", "500"])?;
    for id in &acked {
        assert!(
            listed.contains(id.as_str()),
            "task {id} missing after restarts"
        );
    }
    assert_eq!(
        server
            .ok(&submit_args("lab", &["--idempotency-key", "term-0-0"]))?
            .trim(),
        acked[0]
    );
    Ok(())
}

#[tokio::test]
async fn an_admin_sets_lists_and_resets_queue_settings() -> Result<()> {
    let server = Server::start().await?;
    // Queue settings, applied by the scheduler while it runs.
    let set = server.ok(&[
        "queue",
        "set",
        "gpu",
        "--priority",
        "-3",
        "--max-running",
        "2",
        "--json",
    ])?;
    let set: serde_json::Value = serde_json::from_str(&set)?;
    assert_eq!(
        set["settings"],
        serde_json::json!({"priority": -3, "max_running": 2})
    );
    let queues = server.ok(&["queue", "list", "--json"])?;
    assert!(queues.contains("\"gpu\""), "{queues}");
    // For people: a table.
    let table = server.ok(&["queue", "list"])?;
    assert!(
        table.starts_with("QUEUE") && table.lines().any(|l| l.starts_with("gpu ")),
        "{table}"
    );
    server.ok(&["queue", "reset", "gpu"])?;
    assert!(!server.ok(&["queue", "list", "--json"])?.contains("\"gpu\""));
    Ok(())
}

#[tokio::test]
async fn an_admin_sets_shows_and_resets_a_projects_quota() -> Result<()> {
    let server = Server::start().await?;
    let set = server.ok(&[
        "quota",
        "set",
        "lab",
        "--gpus",
        "2",
        "--cpus",
        "1.5",
        "--gpu-hours",
        "100",
        "--json",
    ])?;
    let set: serde_json::Value = serde_json::from_str(&set)?;
    assert_eq!(
        set["quota"],
        serde_json::json!({"max_gpus": 2, "max_cpu_millis": 1500, "gpu_hours_per_month": 100})
    );
    // For people: used/limit per column.
    let table = server.ok(&["quota", "show", "lab"])?;
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        table.starts_with("PROJECT") && row.starts_with("lab "),
        "{table}"
    );
    assert!(
        row.contains(" 0/1.5 ") && row.contains(" 0/2 ") && row.contains(" 0/100 "),
        "{table}"
    );
    assert!(server.ok(&["quota", "ls"])?.contains("lab "));
    // A limit below zero: refused, naming it; the quota as it was.
    let out = server.run(&["quota", "set", "lab", "--gpus", "-1"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_gpus"), "{err}");
    let kept: serde_json::Value =
        serde_json::from_str(&server.ok(&["quota", "show", "lab", "--json"])?)?;
    assert_eq!(kept["quota"]["max_gpus"], 2, "{kept}");
    server.ok(&["quota", "reset", "lab"])?;
    let gone: serde_json::Value =
        serde_json::from_str(&server.ok(&["quota", "show", "lab", "--json"])?)?;
    assert_eq!(gone["quota"], serde_json::Value::Null);
    Ok(())
}

#[tokio::test]
async fn a_projects_webhook_is_made_listed_and_deleted_from_the_command_line() -> Result<()> {
    let server = Server::start().await?;
    let out = server.run(&[
        "webhook",
        "create",
        "lab",
        "chat",
        "--url",
        "ftp://example.org",
        "--event",
        "task.failed",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("url"), "{err}");
    let made = server.ok(&[
        "webhook",
        "create",
        "lab",
        "chat",
        "--url",
        "https://hooks.example.org/x",
        "--event",
        "task.failed",
        "--event",
        "task.timed_out",
        "--slack",
    ])?;
    assert!(made.contains("signing key (shown once): "), "{made}");
    // Mail needs the server's SMTP server: this one has none.
    let out = server.run(&[
        "webhook",
        "create",
        "lab",
        "mail",
        "--email",
        "ops@example.org",
        "--event",
        "task.failed",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UD_SMTP_URL"), "{err}");
    let table = server.ok(&["webhook", "ls", "lab"])?;
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("chat ")
            && row.contains("slack")
            && row.contains("task.failed,task.timed_out"),
        "{table}"
    );
    let log: serde_json::Value =
        serde_json::from_str(&server.ok(&["webhook", "deliveries", "lab", "chat", "--json"])?)?;
    assert_eq!(log, serde_json::json!([]));
    server.ok(&["webhook", "delete", "lab", "chat"])?;
    assert_eq!(server.ok(&["webhook", "ls", "lab"])?.lines().count(), 1);
    Ok(())
}

#[tokio::test]
async fn a_pipeline_file_is_submitted_followed_and_cancelled() -> Result<()> {
    let server = Server::start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "project: lab
name: nightly
defaults:
  code_repo_url: https://git.example.org/code.git
  code_commit_id: {COMMIT}
  env_repo_url: https://git.example.org/env.git
  env_commit_id: {COMMIT}
  dockerfile_path: Dockerfile
  command: [python, prepare.py]
steps:
  - name: prepare
  - name: train
    needs: [prepare]
    matrix:
      lr: ['0.1', '0.01']
    command: [python, train.py, --lr, '{{{{matrix.lr}}}}']
"
        ),
    )?;
    let id = server.ok(&["pipeline", "submit", file.to_str().unwrap_or_default()])?;
    let id = id.trim().to_owned();
    // No node: the first step's task waits, the others wait for it.
    let shown = server.ok(&["pipeline", "show", &id])?;
    let states: Vec<(&str, &str)> = shown
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            Some((cols.next()?, cols.next()?))
        })
        .collect();
    assert_eq!(
        states,
        [
            ("prepare", "running"),
            ("train[0.1]", "waiting"),
            ("train[0.01]", "waiting")
        ],
        "{shown}"
    );
    assert!(server.ok(&["pipeline", "ls"])?.contains(&id));
    server.ok(&["pipeline", "cancel", &id, "--reason", "wrong data"])?;
    // Followed to its end, which is not a success.
    let out = server.run(&["pipeline", "show", &id, "--wait"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pipeline {id} cancelled")), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&server.ok(&["pipeline", "show", &id, "--json"])?)?;
    assert_eq!(json["steps"][1]["state"], "skipped", "{json}");
    // A bad file is refused naming the field.
    std::fs::write(&file, "project: lab\nsteps:\n  - name: a\n    needs: [b]\n")?;
    let out = server.run(&["pipeline", "submit", file.to_str().unwrap_or_default()])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("steps[0].needs[0]"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_schedule_is_made_read_paused_resumed_and_deleted_from_the_command_line() -> Result<()> {
    let server = Server::start().await?;
    let task = |name: &'static str, cron: &'static str| -> Vec<&'static str> {
        vec![
            "schedule",
            "create",
            name,
            "--cron",
            cron,
            "--timezone",
            "Europe/Berlin",
            "--project",
            "lab",
            "--code-repo",
            "https://git.example.org/code.git",
            "--code-commit",
            COMMIT,
            "--",
            "python",
            "eval.py",
        ]
    };
    let id = server
        .ok(&task("nightly-eval", "0 3 * * *"))?
        .trim()
        .to_owned();
    let listed = server.ok(&["schedule", "ls"])?;
    assert!(
        listed.contains(&id) && listed.contains("0 3 * * * (Europe/Berlin)"),
        "{listed}"
    );
    let shown = server.ok(&["schedule", "show", &id])?;
    assert!(shown.contains("task [\"python\",\"eval.py\"]"), "{shown}");
    let json = |out: String| -> Result<serde_json::Value> { Ok(serde_json::from_str(&out)?) };
    let v = json(server.ok(&["schedule", "show", &id, "--json"])?)?;
    assert_eq!(
        (v["state"].as_str(), v["missed"].as_str()),
        (Some("active"), Some("skip")),
        "{v}"
    );
    assert!(
        v["next_due"]
            .as_str()
            .is_some_and(|t| t.contains("T01:00:00Z") || t.contains("T02:00:00Z")),
        "{v}"
    );

    server.ok(&["schedule", "pause", &id, "--reason", "data migration"])?;
    let v = json(server.ok(&["schedule", "show", &id, "--json"])?)?;
    assert_eq!(
        (v["state"].as_str(), v["paused_reason"].as_str()),
        (Some("paused"), Some("data migration"))
    );
    assert!(v["next_due"].is_null(), "{v}");
    server.ok(&["schedule", "resume", &id])?;
    let v = json(server.ok(&["schedule", "show", &id, "--json"])?)?;
    assert_eq!(v["state"], "active", "{v}");
    server.ok(&["schedule", "delete", &id])?;
    assert!(!server.ok(&["schedule", "ls"])?.contains(&id));
    assert!(server.ok(&["schedule", "ls", "--deleted"])?.contains(&id));

    // A pipeline file on a schedule.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "project: lab\nname: nightly\ndefaults:\n  code_repo_url: https://git.example.org/code.git\n  code_commit_id: {COMMIT}\n  env_repo_url: https://git.example.org/env.git\n  env_commit_id: {COMMIT}\n  dockerfile_path: Dockerfile\n  command: [python, prepare.py]\nsteps:\n  - name: prepare\n"
        ),
    )?;
    let path = file.to_str().unwrap_or_default();
    let p = server
        .ok(&[
            "schedule",
            "create",
            "nightly-pipeline",
            "--cron",
            "@daily",
            "--missed",
            "catch_up",
            "--pipeline",
            path,
        ])?
        .trim()
        .to_owned();
    let v = json(server.ok(&["schedule", "show", &p, "--json"])?)?;
    assert_eq!(
        (v["pipeline"]["name"].as_str(), v["missed"].as_str()),
        (Some("nightly"), Some("catch_up")),
        "{v}"
    );

    // Bad input names its field; nothing is made.
    let out = server.run(&task("nightly-eval", "every night"))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cron"), "{err}");
    let mut bad_zone = task("nightly-eval", "0 3 * * *");
    bad_zone[6] = "Mars/Olympus";
    let out = server.run(&bad_zone)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("timezone"), "{err}");
    let all = json(server.ok(&["schedule", "ls", "--deleted", "--json"])?)?;
    assert_eq!(all["items"].as_array().map_or(0, Vec::len), 2, "{all}");
    Ok(())
}

#[tokio::test]
async fn a_team_is_made_and_its_tokens_managed_from_the_command_line() -> Result<()> {
    let mut server = Server::start().await?;
    let shown = server.ok(&[
        "project",
        "create",
        "lab",
        "--owner",
        "olive",
        "--description",
        "vision",
    ])?;
    assert!(shown.contains("project lab (active): vision"), "{shown}");
    // A role that does not exist is refused with the field named.
    let out = server.run(&["project", "member", "lab", "mike", "boss"])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("role"), "{err}");
    let shown = server.ok(&["project", "member", "lab", "mike", "viewer"])?;
    let row = shown
        .lines()
        .find(|l| l.starts_with("mike "))
        .unwrap_or_default();
    assert!(row.contains("viewer"), "{shown}");

    let laptop = server.ok(&[
        "token",
        "issue",
        "--name",
        "mike-laptop",
        "--user",
        "mike",
        "--expires-in-days",
        "7",
    ])?;
    server.ok(&["token", "issue", "--name", "mike-ci", "--user", "mike"])?;
    // Mike's own token from here on: he sees the project as a viewer, and
    // only his own tokens.
    server.env.retain(|(k, _)| *k != "UD_TOKEN");
    server.env.push(("UD_TOKEN", laptop.trim().to_owned()));
    let list = server.ok(&["project", "ls"])?;
    let row = list.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("lab ") && row.contains("viewer"), "{list}");
    let out = server.run(&[
        "submit",
        "--project",
        "lab",
        "--code-repo",
        "https://git.example.org/code.git",
        "--code-commit",
        COMMIT,
        "--",
        "true",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not allowed"), "{err}");
    let mine = server.ok(&["token", "ls"])?;
    assert_eq!(mine.lines().count(), 3, "{mine}");
    assert!(
        mine.lines()
            .all(|l| l.starts_with("NAME") || l.contains(" mike ")),
        "{mine}"
    );
    // He revokes his CI token by name; it is gone from the list.
    server.ok(&["token", "revoke", "mike-ci"])?;
    let mine = server.ok(&["token", "ls"])?;
    assert_eq!(mine.lines().count(), 2, "{mine}");
    assert!(mine.contains("mike-laptop"), "{mine}");
    Ok(())
}
