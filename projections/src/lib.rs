//! Read models: projectors from JetStream streams into PostgreSQL.
//!
//! A projector reads its stream with an ordered consumer from the sequence
//! after its checkpoint, applies messages in batches (coalescing each
//! batch's events per aggregate) and writes the rows and the new checkpoint
//! in one transaction. A crash or a redelivery never applies an event twice
//! or skips one. Messages that cannot be decoded are recorded in
//! `projection_errors` and projection goes on after them.

pub mod db;
mod model;
pub mod projector;
pub mod rebuild;
pub mod rows;

pub use db::Db;
pub use projector::{Projector, ProjectorOptions};

/// Any error of a client library, kept as the source.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("configuration: {0}")]
    Config(String),
    /// PostgreSQL refused or failed (the server's message when it sent one).
    #[error("database: {}", db_message(.0))]
    Db(#[source] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[source] SourceError),
    #[error("migration failed: {0}")]
    Migration(#[source] SourceError),
    /// A stored row is not what the read model writes.
    #[error("read model row: {0}")]
    Row(String),
    #[error("event stream: {0}")]
    Stream(#[source] SourceError),
    /// A replay's flush to the database ended without an answer (it panicked).
    #[error("replay flush stopped: {0}")]
    Flush(#[source] tokio::task::JoinError),
    #[error("checkpoint of {stream} is no longer {expected}: another projector got there first")]
    CheckpointMoved { stream: String, expected: u64 },
}

/// The server's message (e.g. a failed constraint) rather than "db error".
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => e.to_string(),
    }
}

impl From<tokio_postgres::Error> for ProjectionError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}
