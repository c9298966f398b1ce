//! Health: `/healthz` says the process is alive; `/readyz` checks what the
//! main server depends on (NATS and its streams, PostgreSQL, the object
//! store) and answers 503 naming what is down; `/metrics` gives the same
//! checks in the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use ud_schemas::streams;
use utoipa::ToSchema;

use crate::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The main server's own disks: each path's filesystem is reported in
/// `/metrics`, and `/readyz` is down while one has less than `min_free_mb`.
#[derive(Clone, Debug, Default)]
pub struct DiskWatch {
    pub paths: Vec<std::path::PathBuf>,
    pub min_free_mb: u64,
}

impl DiskWatch {
    /// (path, free bytes) for each watched path that can be read.
    pub fn free(&self) -> Vec<(String, u64)> {
        self.paths
            .iter()
            .filter_map(|p| Some((p.display().to_string(), fs2::available_space(p).ok()?)))
            .collect()
    }

    pub fn min_free_bytes(&self) -> u64 {
        self.min_free_mb.saturating_mul(1024 * 1024)
    }

    /// Paths below the threshold, with what they have.
    pub fn low(&self) -> Vec<(String, u64)> {
        self.free()
            .into_iter()
            .filter(|(_, b)| *b < self.min_free_bytes())
            .collect()
    }
}

/// How often the watched disks are checked for alerts.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The watched paths that crossed the threshold since the last check:
/// (path, free bytes, low now). A path not seen before counts as having been
/// fine, so at start only a disk that is already low is told.
pub fn disk_transitions(
    previous: &std::collections::HashMap<String, bool>,
    free: &[(String, u64)],
    min_free_bytes: u64,
) -> Vec<(String, u64, bool)> {
    free.iter()
        .filter_map(|(path, bytes)| {
            let low = *bytes < min_free_bytes;
            (previous.get(path).copied().unwrap_or(false) != low)
                .then(|| (path.clone(), *bytes, low))
        })
        .collect()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "main".into())
}

/// Checks the watched disks now and every [`DISK_CHECK_INTERVAL`]; each
/// crossing of the threshold becomes `ud.alert.disk.low` or `.ok` in
/// `UD_ALERTS` (a failed publish is tried again at the next check).
pub async fn watch_disks(js: async_nats::jetstream::Context, disk: DiskWatch) {
    use ud_schemas::dispatch::{DiskAlert, DISK_LOW_SUBJECT, DISK_OK_SUBJECT};
    let server = host_name();
    let min_free_bytes = disk.min_free_bytes();
    let mut known = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(DISK_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        for (path, free_bytes, low) in disk_transitions(&known, &disk.free(), min_free_bytes) {
            let alert = DiskAlert {
                at: ud_schemas::now_millis(),
                server: server.clone(),
                path: path.clone(),
                free_bytes,
                min_free_bytes,
            };
            let subject = if low {
                DISK_LOW_SUBJECT
            } else {
                DISK_OK_SUBJECT
            };
            if let Err(e) = store_alert(&js, subject, &alert).await {
                tracing::warn!(%path, error = %e, "disk alert not stored; trying again at the next check");
                continue;
            }
            if low {
                tracing::warn!(%path, free_bytes, min_free_bytes, "a watched disk is low");
            } else {
                tracing::info!(%path, free_bytes, "a watched disk is fine again");
            }
            known.insert(path, low);
        }
    }
}

/// Stores one alert in `UD_ALERTS` and waits for the stream to have it.
async fn store_alert(
    js: &async_nats::jetstream::Context,
    subject: &'static str,
    alert: &ud_schemas::dispatch::DiskAlert,
) -> Result<(), String> {
    let bytes = ud_schemas::dispatch::to_cbor(alert).map_err(|e| e.to_string())?;
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .header("Content-Type", "application/cbor")
        .payload(bytes.into());
    js.send_publish(subject, msg)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[derive(Serialize, ToSchema)]
pub struct Check {
    /// `ok`, `down` or `not_configured`.
    pub status: String,
    /// What failed, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub millis: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    pub nats: Check,
    pub postgres: Check,
    pub object_store: Check,
    /// Down when a read model is more than `MAX_PROJECTION_LAG` events behind its stream.
    pub projections: Check,
    /// Down while a watched disk has less than its minimum free (`not_configured` without `UD_DISK_WATCH`).
    pub disk: Check,
    /// Down while one of the main server's services is not running (it names them).
    pub services: Check,
}

/// What the main server's supervisor says of one of its services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ServiceState {
    Running,
    /// It stopped when nobody asked it to and starts again shortly.
    Restarting {
        reason: String,
    },
    /// It kept stopping: the process stops.
    Failed {
        reason: String,
    },
}

/// Every service's state, by name, as the supervisor keeps it (empty when
/// the API runs without one).
#[derive(Clone, Debug, Default)]
pub struct ServiceStates(Arc<Mutex<BTreeMap<String, ServiceState>>>);

impl ServiceStates {
    pub fn set(&self, name: &str, state: ServiceState) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_owned(), state);
        }
    }

    pub fn remove(&self, name: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(name);
        }
    }

    pub fn get(&self, name: &str) -> Option<ServiceState> {
        self.0.lock().ok()?.get(name).cloned()
    }

    pub fn all(&self) -> BTreeMap<String, ServiceState> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Events a read model may be behind its stream and still be ready.
pub const MAX_PROJECTION_LAG: i64 = 10_000;

async fn timed<F, E>(f: F) -> Check
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let t = Instant::now();
    let result = tokio::time::timeout(CHECK_TIMEOUT, f).await;
    let millis = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    match result {
        Ok(Ok(())) => Check {
            status: "ok".into(),
            error: None,
            millis,
        },
        Ok(Err(e)) => Check {
            status: "down".into(),
            error: Some(e.to_string()),
            millis,
        },
        Err(_) => Check {
            status: "down".into(),
            error: Some(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
            millis,
        },
    }
}

pub async fn readiness(state: &AppState) -> Readiness {
    let nats = timed(async {
        let js = state.commands.store().jetstream();
        js.get_stream_no_info(streams::TASKS)
            .await
            .map_err(|e| e.to_string())?
            .get_info()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    });
    let postgres = timed(async {
        let client = state.db.client().await.map_err(|e| e.to_string())?;
        client
            .query_one("SELECT 1", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    });
    let store = async {
        match state.stores.platform() {
            Some(s) => timed(s.check()).await,
            None => Check {
                status: "not_configured".into(),
                error: None,
                millis: 0,
            },
        }
    };
    let projections = timed(async {
        let behind: Vec<String> = projection_lags(state)
            .await?
            .into_iter()
            .filter(|(_, lag)| *lag > MAX_PROJECTION_LAG)
            .map(|(s, lag)| format!("{s} is {lag} events behind"))
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(behind.join(", "))
        }
    });
    let disk = if state.disk.paths.is_empty() {
        Check {
            status: "not_configured".into(),
            error: None,
            millis: 0,
        }
    } else {
        let low = state.disk.low();
        let error = (!low.is_empty()).then(|| {
            low.iter()
                .map(|(p, b)| {
                    format!(
                        "{p} has {} MiB free, below {} MiB",
                        b / (1024 * 1024),
                        state.disk.min_free_mb
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        });
        Check {
            status: if error.is_some() { "down" } else { "ok" }.into(),
            error,
            millis: 0,
        }
    };
    let not_running: Vec<String> = state
        .services
        .all()
        .into_iter()
        .filter_map(|(name, s)| match s {
            ServiceState::Running => None,
            ServiceState::Restarting { reason } => Some(format!("{name} restarting ({reason})")),
            ServiceState::Failed { reason } => Some(format!("{name} failed ({reason})")),
        })
        .collect();
    let services = Check {
        status: if not_running.is_empty() { "ok" } else { "down" }.into(),
        error: (!not_running.is_empty()).then(|| not_running.join(", ")),
        millis: 0,
    };
    let (nats, postgres, object_store, projections) =
        tokio::join!(nats, postgres, store, projections);
    let ready = [
        &nats,
        &postgres,
        &object_store,
        &projections,
        &disk,
        &services,
    ]
    .iter()
    .all(|c| c.status != "down");
    Readiness {
        status: if ready { "ready" } else { "not_ready" }.into(),
        nats,
        postgres,
        object_store,
        projections,
        disk,
        services,
    }
}

/// Whether the main server can serve: NATS and the task stream, PostgreSQL, the object store, projection lag.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let r = readiness(&state).await;
    let status = if r.status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// The readiness checks as Prometheus gauges.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let r = readiness(&state).await;
    let mut out = String::from(
        "# HELP unidesk_dependency_up Whether a dependency answered its check (1) or not (0); absent when not configured.\n\
         # TYPE unidesk_dependency_up gauge\n",
    );
    let checks = [
        ("nats", &r.nats),
        ("postgres", &r.postgres),
        ("object_store", &r.object_store),
    ];
    for (name, c) in checks {
        if c.status != "not_configured" {
            out.push_str(&format!(
                "unidesk_dependency_up{{dependency=\"{name}\"}} {}\n",
                u8::from(c.status == "ok")
            ));
        }
    }
    out.push_str("# HELP unidesk_dependency_check_seconds How long a dependency's check took.\n# TYPE unidesk_dependency_check_seconds gauge\n");
    for (name, c) in checks {
        if c.status != "not_configured" {
            out.push_str(&format!(
                "unidesk_dependency_check_seconds{{dependency=\"{name}\"}} {:.3}\n",
                c.millis as f64 / 1000.0
            ));
        }
    }
    if let Some(p) = &state.ingest_pinned {
        out.push_str(&format!(
            "# HELP unidesk_ingest_pinned Whether this instance ingests what nodes report (1) or stands by (0).\n\
             # TYPE unidesk_ingest_pinned gauge\nunidesk_ingest_pinned {}\n",
            u8::from(p.load(std::sync::atomic::Ordering::Relaxed))
        ));
    }
    match platform_metrics(&state).await {
        Ok(more) => out.push_str(&more),
        Err(e) => out.push_str(&format!(
            "# platform figures unavailable: {}\n",
            e.replace('\n', " ")
        )),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn gauge(out: &mut String, name: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
}

/// Figures from the read models and the streams: tasks by state, queue
/// depths, nodes by status, heartbeat ages, node disks, projection lag.
async fn platform_metrics(state: &AppState) -> Result<String, String> {
    let client = state.db.client().await.map_err(|e| e.to_string())?;
    let q = |sql: &'static str| {
        let client = &client;
        async move { client.query(sql, &[]).await.map_err(|e| e.to_string()) }
    };
    let mut out = String::new();
    gauge(
        &mut out,
        "unidesk_tasks",
        "Tasks by state, as the read model has them.",
    );
    let by_state = ud_projections::db::tasks_by_state(&client, None)
        .await
        .map_err(|e| e.to_string())?;
    for (state, n) in by_state {
        out.push_str(&format!(
            "unidesk_tasks{{state=\"{}\"}} {n}\n",
            label(&state)
        ));
    }
    gauge(&mut out, "unidesk_queue_depth", "Pending tasks per queue.");
    for r in q("SELECT coalesce(spec->>'queue', 'default'), count(*) FROM tasks WHERE state = 'pending' GROUP BY 1 ORDER BY 1").await? {
        out.push_str(&format!("unidesk_queue_depth{{queue=\"{}\"}} {}\n", label(r.get(0)), r.get::<_, i64>(1)));
    }
    gauge(&mut out, "unidesk_nodes", "Compute nodes by status.");
    for r in q("SELECT status, count(*) FROM nodes GROUP BY status ORDER BY status").await? {
        out.push_str(&format!(
            "unidesk_nodes{{status=\"{}\"}} {}\n",
            label(r.get(0)),
            r.get::<_, i64>(1)
        ));
    }
    let nodes = q("SELECT id::text, name, extract(epoch FROM now() - last_seen)::float8, disk_free_mb, low_disk FROM nodes \
                   WHERE status <> 'revoked' AND last_seen IS NOT NULL ORDER BY name")
        .await?;
    gauge(
        &mut out,
        "unidesk_node_heartbeat_age_seconds",
        "Seconds since each node's last heartbeat.",
    );
    for r in &nodes {
        out.push_str(&format!(
            "unidesk_node_heartbeat_age_seconds{{node_id=\"{}\",name=\"{}\"}} {:.1}\n",
            r.get::<_, String>(0),
            label(r.get(1)),
            r.get::<_, f64>(2)
        ));
    }
    gauge(
        &mut out,
        "unidesk_node_disk_free_bytes",
        "Free disk in each node's work directory, from its last heartbeat.",
    );
    gauge(
        &mut out,
        "unidesk_node_low_disk",
        "1 when a node reports too little free disk to take tasks (an alert).",
    );
    for r in &nodes {
        let (id, name) = (r.get::<_, String>(0), label(r.get(1)));
        if let Some(mb) = r.get::<_, Option<i64>>(3) {
            out.push_str(&format!(
                "unidesk_node_disk_free_bytes{{node_id=\"{id}\",name=\"{name}\"}} {}\n",
                mb.saturating_mul(1024 * 1024)
            ));
        }
        out.push_str(&format!(
            "unidesk_node_low_disk{{node_id=\"{id}\",name=\"{name}\"}} {}\n",
            u8::from(r.get::<_, bool>(4))
        ));
    }
    gauge(
        &mut out,
        "unidesk_disk_free_bytes",
        "Free space on the main server's watched disks (UD_DISK_WATCH).",
    );
    gauge(
        &mut out,
        "unidesk_disk_low",
        "1 while a watched disk has less than UD_DISK_MIN_FREE_MB free (an alert).",
    );
    let low = state.disk.low();
    for (path, free) in state.disk.free() {
        let path = label(&path);
        out.push_str(&format!(
            "unidesk_disk_free_bytes{{path=\"{path}\"}} {free}\n"
        ));
        out.push_str(&format!(
            "unidesk_disk_low{{path=\"{path}\"}} {}\n",
            u8::from(low.iter().any(|(p, _)| label(p) == path))
        ));
    }
    gauge(
        &mut out,
        "unidesk_jetstream_storage_bytes",
        "File storage the platform's streams use on the hub.",
    );
    gauge(
        &mut out,
        "unidesk_jetstream_storage_limit_bytes",
        "The account's file storage limit on the hub (absent: no limit).",
    );
    if let Ok(account) = state.commands.store().jetstream().query_account().await {
        out.push_str(&format!(
            "unidesk_jetstream_storage_bytes {}\n",
            account.storage
        ));
        if let Some(max) = account.limits.max_storage {
            out.push_str(&format!("unidesk_jetstream_storage_limit_bytes {max}\n"));
        }
    }
    gauge(
        &mut out,
        "unidesk_postgres_database_bytes",
        "Size of the read models' database.",
    );
    for r in q("SELECT pg_database_size(current_database())").await? {
        out.push_str(&format!(
            "unidesk_postgres_database_bytes {}\n",
            r.get::<_, i64>(0)
        ));
    }
    gauge(
        &mut out,
        "unidesk_projection_lag_events",
        "Events in a stream not yet in the read models.",
    );
    for (name, lag) in projection_lags(state).await? {
        out.push_str(&format!(
            "unidesk_projection_lag_events{{stream=\"{name}\"}} {lag}\n"
        ));
    }
    Ok(out)
}

/// Events of each projected stream not yet in the read models.
pub async fn projection_lags(state: &AppState) -> Result<Vec<(&'static str, i64)>, String> {
    let client = state.db.client().await.map_err(|e| e.to_string())?;
    let checkpoints = client
        .query("SELECT stream, seq FROM projection_checkpoints", &[])
        .await
        .map_err(|e| e.to_string())?;
    let js = state.commands.store().jetstream();
    let mut out = Vec::new();
    for name in streams::PROJECTED {
        let applied = checkpoints
            .iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map_or(0, |r| r.get::<_, i64>(1));
        let stream = js
            .get_stream_no_info(name)
            .await
            .map_err(|e| e.to_string())?;
        let last = stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        out.push((
            name,
            i64::try_from(last)
                .unwrap_or(i64::MAX)
                .saturating_sub(applied)
                .max(0),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::disk_transitions;
    use std::collections::HashMap;

    #[test]
    fn only_crossings_of_the_threshold_are_told() {
        let mut known = HashMap::new();
        let free = |a: u64, b: u64| vec![("/a".to_owned(), a), ("/b".to_owned(), b)];
        // At start: only the low one.
        let t = disk_transitions(&known, &free(50, 500), 100);
        assert_eq!(t, vec![("/a".to_owned(), 50, true)]);
        known.insert("/a".to_owned(), true);
        known.insert("/b".to_owned(), false);
        // Still low, still fine: nothing.
        assert!(disk_transitions(&known, &free(40, 400), 100).is_empty());
        // /a recovers, /b falls: both told.
        let t = disk_transitions(&known, &free(150, 99), 100);
        assert_eq!(
            t,
            vec![("/a".to_owned(), 150, false), ("/b".to_owned(), 99, true)]
        );
        // Exactly the minimum is not low.
        assert!(disk_transitions(&HashMap::new(), &free(100, 100), 100).is_empty());
    }
}
