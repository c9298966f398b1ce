//! Read models: projectors from JetStream streams into PostgreSQL.
//!
//! A projector reads its stream with an ordered consumer from the sequence
//! after its checkpoint, applies messages in batches (coalescing each
//! batch's events per aggregate) and writes the rows and the new checkpoint
//! in one transaction. A crash or a redelivery never applies an event twice
//! or skips one. Messages that cannot be decoded are recorded in
//! `projection_errors` and projection goes on after them.

pub mod db;
pub mod projector;
pub mod rebuild;
pub mod rows;

pub use db::Db;
pub use projector::{Projector, ProjectorOptions};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Db(String),
    #[error("event stream: {0}")]
    Stream(String),
    #[error("checkpoint of {stream} is no longer {expected}: another projector got there first")]
    CheckpointMoved { stream: String, expected: u64 },
}

impl From<tokio_postgres::Error> for ProjectionError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The source carries the server's message (e.g. a failed constraint).
        match e.as_db_error() {
            Some(db) => Self::Db(db.to_string()),
            None => Self::Db(e.to_string()),
        }
    }
}
