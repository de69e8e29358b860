//! Flotilla rolls one migration bundle out across a fleet of PostgreSQL tenant databases.
//!
//! # Layout
//! - [`bundle`]: a directory of Flyway-named scripts, validated and identified.
//! - [`api`]: the gRPC types generated from `proto/`; only the API layer and the CLI use
//!   them, the core never does.
//!
//! The daemon binary (`flotillad`) lives in `src/bin/`; the CLI is the `flotilla-cli`
//! crate under `cli/`.

pub mod api;
pub mod bundle;
