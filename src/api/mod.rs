//! The gRPC control API (`flotilla.v1`, PRODUCT.md §6). This module owns the protobuf
//! types, their conversion to and from domain types ([`convert`]), authentication
//! ([`auth`]), the one mapping of errors to gRPC status ([`ApiError`]) and the service
//! itself ([`service`]). No other library module may name a protobuf type, so the core
//! stays free of wire concerns; the API never decides anything about a wave, it asks the
//! engine.

pub mod auth;
pub mod convert;
mod error;
pub mod service;

pub use error::ApiError;
pub use service::RolloutApi;

/// Generated `flotilla.v1` messages, client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

/// The encoded file descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotilla_descriptor");
