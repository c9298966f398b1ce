//! The main server end to end through its REST API and WebSocket: a real
//! nats-server, a real PostgreSQL, real HTTP (one test binary, a module per
//! feature).

mod access;
mod cluster;
mod common;
mod files;
mod health;
mod live;
mod quotas;
mod schedules;
mod secrets;
mod sso;
mod stats;
mod tasks;
mod tokens;
mod webhooks;
