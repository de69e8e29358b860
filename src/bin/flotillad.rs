//! `flotillad`: the Flotilla daemon. Parses flags, sets up logging, serves gRPC, and
//! drains on SIGTERM/SIGINT. Everything it does lives in the library; this file only
//! wires it together, and is the one place `anyhow` meets the library's typed errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;

/// The Flotilla daemon: rolls migration bundles out across fleets of tenant databases.
#[derive(Debug, Parser)]
#[command(name = "flotillad", version, about)]
struct Args {
    /// Address the gRPC API listens on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Directory of the progress store and the bundles of every wave.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "./flotilla-data")]
    data_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long to wait for connected clients (a `watch` stream, say)
    /// to hang up before closing their connections.
    #[arg(long, env = "FLOTILLA_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create data dir {}", args.data_dir.display()))?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build the reflection service")?;

    // Tests and scripts read this line to learn the port when listening on :0.
    tracing::info!(addr = %local, data_dir = %args.data_dir.display(), "flotillad listening");
    let stop = tokio_util::sync::CancellationToken::new();
    let serve = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result.context("serve gRPC")?,
        _ = shutdown_signal() => {
            stop.cancel();
            // Graceful shutdown waits for every client to hang up; a client that never
            // does must not keep the daemon alive.
            match tokio::time::timeout(args.drain_timeout, &mut serve).await {
                Ok(result) => result.context("serve gRPC")?,
                Err(_) => tracing::warn!(timeout = ?args.drain_timeout, "clients still connected; closing them"),
            }
        }
    }
    tracing::info!("flotillad stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install a SIGTERM handler; waiting for SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}
