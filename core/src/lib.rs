//! The UniDesk domain and the thin services built on it.
//!
//! * [`task`], [`node`], [`pipeline`]: lifecycles as pure `decide` / `evolve` functions.
//! * [`validate`]: user input to validated specs, with field-named errors.
//! * [`store`]: the JetStream event store (append with optimistic concurrency, load).
//! * [`aggregate`]: load, decide, append — the one command path of every aggregate.
//! * [`commands`]: task commands as users give them (validation, idempotency, visibility).
//! * [`service`]: the command handlers as NATS micro services.

pub mod aggregate;
pub mod archive;
pub mod auth;
pub mod commands;
pub mod edge;
pub mod follow;
pub mod guard;
pub mod node;
pub mod pipeline;
pub mod project;
pub mod schedule;
pub mod secrets;
pub mod service;
pub mod store;
pub mod task;
pub mod token;
pub mod validate;

pub use commands::{CommandError, TaskCommands};
pub use store::{EventStore, Expect, StoreError};
