//! The gRPC surface generated from `proto/flotilla/v1`. This module owns the protobuf
//! types and their conversion to and from domain types; no other library module may name
//! a protobuf type, so the core stays free of wire concerns.

/// Generated `flotilla.v1` messages, client and server.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

/// The encoded file descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotilla_descriptor");
