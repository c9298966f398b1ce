//! The hub side of compute nodes: enrollment, the hub's account file and
//! sources, ingest of what nodes report, liveness and first-fit scheduling.

pub mod credentials;
pub mod dispatch;
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
    /// The node's rules refused the command.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// A value the caller gave is wrong.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A settings file cannot be used.
    #[error("{file}: {reason}")]
    Settings { file: String, reason: String },
    /// The hub's nats-server did something the platform cannot work with.
    #[error("hub: {0}")]
    Hub(String),
    #[error("nats: {0}")]
    Nats(#[source] async_nats::Error),
    #[error(transparent)]
    Codec(#[from] ud_schemas::CodecError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("password hash: {0}")]
    Hash(#[from] bcrypt::BcryptError),
}

pub(crate) fn nats_err(e: impl Into<async_nats::Error>) -> EdgeError {
    EdgeError::Nats(e.into())
}
