//! Talking to flotillad: the connection (plain or TLS), the bearer token on every call,
//! and the one mapping from a failed call to an exit code and a message.

use std::path::PathBuf;
use std::time::Duration;

use flotilla::api::v1::rollout_service_client::RolloutServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::exit::Exit;

/// A failure the CLI reports: a message and how the process exits.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    /// A failure with an explicit exit code.
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        let (exit, what) = match s.code() {
            Code::Unauthenticated => (Exit::Unauthorized, "not authenticated"),
            Code::PermissionDenied => (Exit::Unauthorized, "not allowed"),
            Code::Unavailable | Code::DeadlineExceeded => (Exit::Unavailable, "daemon unavailable"),
            Code::InvalidArgument => (Exit::InvalidInput, "invalid request"),
            Code::NotFound => (Exit::InvalidInput, "not found"),
            Code::FailedPrecondition => (Exit::InvalidInput, "not possible now"),
            Code::ResourceExhausted | Code::OutOfRange | Code::AlreadyExists => {
                (Exit::InvalidInput, "refused")
            }
            _ => (Exit::Internal, "daemon error"),
        };
        Failure::new(exit, format!("{what}: {}", s.message()))
    }
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The API client every daemon command uses.
pub type Client = RolloutServiceClient<InterceptedService<Channel, BearerToken>>;

/// How to reach the daemon.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// Connects, failing with exit 4 (and the address) when the daemon cannot be reached.
pub async fn connect(target: &Target) -> Result<Client, Failure> {
    let token = match &target.token {
        Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
            Failure::new(
                Exit::Usage,
                "--token holds characters a header cannot carry",
            )
        })?),
        None => None,
    };
    let mut endpoint = Endpoint::from_shared(target.server.clone())
        .map_err(|e| Failure::new(Exit::Usage, format!("--server {:?}: {e}", target.server)))?
        .connect_timeout(Duration::from_secs(5));
    if target.server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &target.ca_cert {
            let pem = std::fs::read(ca).map_err(|e| {
                Failure::new(Exit::Usage, format!("--ca-cert {}: {e}", ca.display()))
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Failure::new(Exit::Usage, format!("TLS: {e}")))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::new(
            Exit::Unavailable,
            format!(
                "cannot reach flotillad at {}: {}",
                target.server,
                error_chain(&e)
            ),
        )
    })?;
    // Generous: a bundle plus 100k targets; the daemon enforces its own limits.
    let max = 256 << 20;
    Ok(
        RolloutServiceClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    )
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
