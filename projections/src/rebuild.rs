//! Rebuild by replay: project every stream from its first event into an
//! empty schema, and compare two schemas' read models.

use async_nats::jetstream;
use serde::Serialize;
use tracing::info;
use ud_schemas::streams;

use crate::db::Db;
use crate::projector::{Projector, ProjectorOptions};
use crate::ProjectionError;

/// Tables that hold read models (checkpoints and errors are bookkeeping).
pub const READ_MODEL_TABLES: [&str; 4] = ["tasks", "nodes", "api_tokens", "pipelines"];

#[derive(Debug, Serialize)]
pub struct StreamReplay {
    pub stream: String,
    pub last_seq: u64,
}

/// Replays every projected stream, up to its last sequence at the start,
/// into `db`'s schema, which is dropped and re-created first.
pub async fn rebuild(
    db: &Db,
    js: &jetstream::Context,
    batch_max: usize,
) -> Result<Vec<StreamReplay>, ProjectionError> {
    db.reset().await?;
    let mut out = Vec::new();
    for name in streams::PROJECTED {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|e| ProjectionError::Stream(e.into()))?;
        let last = stream
            .info()
            .await
            .map_err(|e| ProjectionError::Stream(e.into()))?
            .state
            .last_sequence;
        let projector = Projector::new(
            db.clone(),
            js.clone(),
            name,
            ProjectorOptions {
                batch_max,
                notify: false,
                ..Default::default()
            },
        );
        projector.run(Some(last)).await?;
        info!(
            stream = name,
            last_seq = last,
            schema = db.schema(),
            "replayed"
        );
        out.push(StreamReplay {
            stream: name.to_owned(),
            last_seq: last,
        });
    }
    Ok(out)
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TableDiff {
    pub table: String,
    pub only_in_left: i64,
    pub only_in_right: i64,
}

/// Rows that differ between the same table in two schemas of one database.
pub async fn compare(db: &Db, left: &str, right: &str) -> Result<Vec<TableDiff>, ProjectionError> {
    let client = db.client().await?;
    let mut out = Vec::new();
    for table in READ_MODEL_TABLES {
        let q = |a: &str, b: &str| {
            format!("SELECT count(*) FROM (SELECT * FROM {a}.{table} EXCEPT ALL SELECT * FROM {b}.{table}) d")
        };
        let l: i64 = client.query_one(&q(left, right), &[]).await?.get(0);
        let r: i64 = client.query_one(&q(right, left), &[]).await?.get(0);
        out.push(TableDiff {
            table: table.to_owned(),
            only_in_left: l,
            only_in_right: r,
        });
    }
    Ok(out)
}
