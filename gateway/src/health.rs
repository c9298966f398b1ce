//! Health: `/healthz` says the process is alive; `/readyz` checks what the
//! main server depends on (NATS and its streams, PostgreSQL, the object
//! store) and answers 503 naming what is down; `/metrics` gives the same
//! checks in the Prometheus text format.

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
}

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
        match &state.storage {
            Some(s) => timed(s.check()).await,
            None => Check {
                status: "not_configured".into(),
                error: None,
                millis: 0,
            },
        }
    };
    let (nats, postgres, object_store) = tokio::join!(nats, postgres, store);
    let ready = [&nats, &postgres, &object_store]
        .iter()
        .all(|c| c.status != "down");
    Readiness {
        status: if ready { "ready" } else { "not_ready" }.into(),
        nats,
        postgres,
        object_store,
    }
}

/// Whether the main server can serve: NATS and the task stream, PostgreSQL, the object store.
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
