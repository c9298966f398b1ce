//! Compute nodes end to end on real servers: a hub nats-server with leaf
//! nodes, PostgreSQL, the main server, the agents and a real Docker engine
//! (`DOCKER_HOST`, image `unidesk/busybox:base`); one test binary, a module
//! per feature.

mod common;
mod files;
mod gpus;
mod grace;
mod kubernetes;
mod link;
mod network;
mod nodes;
mod pipelines;
mod runs;
mod scheduling;
mod secrets;
mod sessions;
mod versions;
