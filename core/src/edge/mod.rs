//! The hub side of compute nodes: enrollment, the hub's account file and
//! sources, ingest of what nodes report, liveness and first-fit scheduling.

pub mod credentials;
pub mod enroll;
pub mod files;
pub mod hub;
pub mod hubconf;
pub mod ingest;
pub mod liveness;
pub mod requests;
pub mod scheduler;
pub mod view;

/// bcrypt cost for node secrets: the secrets are 256 random bits, so the
/// hash's work factor adds nothing to their strength but costs the hub CPU
/// at every (re)connection of every node.
pub const SECRET_HASH_COST: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn nats_err(e: impl std::fmt::Display) -> EdgeError {
    EdgeError::Nats(e.to_string())
}
