//! `flotillad`: the Flotilla daemon. Reads its configuration (file, environment, flags),
//! sets up logging, opens the engine on the data dir, serves the gRPC control API, and
//! drains on SIGTERM/SIGINT. Everything it does lives in the library; this file only
//! wires it together, and is the one place `anyhow` meets the library's typed errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flotilla::api::RolloutApi;
use flotilla::api::auth::Authenticator;
use flotilla::config::{self, FileConfig, LogFormat, TlsFiles};
use flotilla::reach::{AllowedHosts, Reach};
use flotilla::telemetry::Telemetry;
use flotilla::wave::{Engine, EngineOptions};
use tokio_stream::wrappers::TcpListenerStream;

/// The Flotilla daemon: rolls migration bundles out across fleets of tenant databases.
///
/// Settings come from flags, then environment variables, then the config file, then
/// defaults, in that order of precedence.
#[derive(Debug, Parser)]
#[command(name = "flotillad", version, about)]
struct Args {
    /// TOML config file (see deploy/flotillad.toml for every key).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Address the gRPC API listens on [default: 127.0.0.1:50051]; `127.0.0.1:0` picks a
    /// free port (the chosen one is logged as `addr=`).
    #[arg(long, env = "FLOTILLA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the progress store, the bundles of every wave and the key that seals
    /// stored connection strings [default: ./flotilla-data].
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long to wait for connected clients (a `watch` stream, say)
    /// to hang up before closing their connections [default: 10s].
    #[arg(long, env = "FLOTILLA_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// A TOML file of `[[tokens]]` (name, role, sha256), added to the config file's.
    /// With no token configured at all, every call is allowed, as an operator: the
    /// daemon then refuses to listen beyond loopback unless --insecure-no-auth.
    #[arg(long, env = "FLOTILLA_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Serve a non-loopback address with no tokens configured: anyone who reaches it
    /// may start, steer and cancel waves. Said in the log at every start.
    #[arg(long, env = "FLOTILLA_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// PEM certificate chain: serve gRPC over TLS (needs --tls-key).
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log line format [default: human].
    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics [default: off]. Traces and
    /// metrics are also exported over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT (or the
    /// per-signal variables) is set.
    #[arg(long, env = "FLOTILLA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Take a census of every registered fleet this often (e.g. `15m`), kept for
    /// `fleet census --cached` and exported as `flotilla_fleet_*` metrics [default: off].
    #[arg(long, env = "FLOTILLA_CENSUS_INTERVAL", value_parser = humantime::parse_duration)]
    census_interval: Option<Duration>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads a token from stdin and prints the sha256 a config stores for it.
    HashToken,
    /// Asks a running daemon's grpc.health.v1 service whether it serves; exits 0 if so,
    /// 1 if not (for container health checks).
    Healthcheck {
        /// The daemon's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Settings after layering flags, environment, file and defaults.
struct Settings {
    listen: SocketAddr,
    data_dir: PathBuf,
    drain_timeout: Duration,
    log_format: LogFormat,
    metrics_listen: Option<SocketAddr>,
    tokens: Vec<config::TokenConfig>,
    tls: Option<TlsFiles>,
    limits: config::Limits,
    insecure_no_auth: bool,
    allowed_hosts: AllowedHosts,
    wave_retention: Option<Duration>,
    census_interval: Option<Duration>,
    census_fingerprint: bool,
}

fn settings(args: Args) -> anyhow::Result<Settings> {
    let (file, base) = match &args.config {
        Some(path) => (
            FileConfig::load(path)?,
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ),
        None => (FileConfig::default(), PathBuf::from(".")),
    };
    let mut tokens = file.all_tokens(&base)?;
    if let Some(path) = &args.tokens_file {
        tokens.extend(config::load_tokens_file(path)?.tokens);
        config::check_tokens(&tokens)?;
    }
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => file.tls.clone(),
    };
    let allowed_hosts = match &file.allowed_hosts {
        Some(rules) => AllowedHosts::parse(rules).context("allowed_hosts")?,
        None => AllowedHosts::any(),
    };
    let wave_retention = match file.wave_retention {
        None => Some(config::DEFAULT_WAVE_RETENTION),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    Ok(Settings {
        insecure_no_auth: args.insecure_no_auth,
        allowed_hosts,
        wave_retention,
        census_interval: match args.census_interval.or(file.census_interval) {
            Some(d) if d.is_zero() => None,
            Some(d) if d < Duration::from_secs(1) => {
                anyhow::bail!(
                    "census_interval: {d:?} is less than 1s (each round reads every tenant of every fleet)"
                )
            }
            other => other,
        },
        census_fingerprint: file.census_fingerprint.unwrap_or(true),
        listen: match args.listen.or(file.listen) {
            Some(addr) => addr,
            None => config::DEFAULT_LISTEN.parse()?,
        },
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR)),
        drain_timeout: args
            .drain_timeout
            .or(file.drain_timeout)
            .unwrap_or(config::DEFAULT_DRAIN_TIMEOUT),
        log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        tokens,
        tls,
        limits: file.limits,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    match args.command.take() {
        Some(Command::Healthcheck { addr, timeout }) => return healthcheck(&addr, timeout).await,
        Some(Command::HashToken) => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("read the token from stdin")?;
            let token = token.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!token.is_empty(), "no token on stdin");
            println!("{}", config::hash_token(token));
            return Ok(());
        }
        None => {}
    }
    let settings = settings(args)?;
    let telemetry = Telemetry::init(settings.log_format, settings.metrics_listen.is_some())?;
    let result = serve(settings, &telemetry).await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "flotillad failed");
    }
    telemetry.shutdown();
    result
}

/// `census_interval`: a census of every registered fleet, one round after another, each
/// compared with the bundle of the newest wave started on that fleet, until the daemon
/// drains.
async fn census_schedule(engine: Engine, every: Duration, fingerprint: bool, max_tenants: usize) {
    let options = flotilla::census::CensusOptions {
        fingerprint,
        ..Default::default()
    };
    let draining = engine.draining();
    tokio::pin!(draining);
    // The first round after one interval: not in the same moment as the waves resuming.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut draining => return,
            _ = tick.tick() => {}
        }
        let round = engine
            .fleets()
            .census_all(engine.reach(), max_tenants, &options, |fleet| {
                engine.latest_bundle_of_fleet(fleet)
            });
        tokio::select! {
            _ = &mut draining => return,
            _ = round => {}
        }
        // The interval is the rest between rounds: a round longer than it (a large
        // fleet, a slow server) never leads into the next one at once.
        tick.reset();
    }
}

async fn serve(settings: Settings, telemetry: &Telemetry) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("create data dir {}", settings.data_dir.display()))?;
    let auth = Authenticator::new(&settings.tokens)?;
    if !auth.is_enabled() && !settings.listen.ip().is_loopback() {
        anyhow::ensure!(
            settings.insecure_no_auth,
            "refusing to serve {} with no tokens configured: anyone who reaches it could start, steer and cancel waves with the daemon's database credentials; configure tokens (--tokens-file), listen on loopback, or pass --insecure-no-auth to accept that",
            settings.listen
        );
        tracing::warn!(addr = %settings.listen, "--insecure-no-auth: serving a non-loopback address with no tokens; anyone who can reach it can start, steer and cancel waves");
    }
    let reach = Reach::from_environment(settings.allowed_hosts.clone());
    if reach.ignores_pgpassword() {
        tracing::warn!(
            "PGPASSWORD is set but no allowed_hosts entry names a server: the daemon offers it to none (name the servers in allowed_hosts, or give passwords in the DSNs or in .pgpass lines naming each host and port)"
        );
    }
    let options = EngineOptions {
        reach,
        retention: settings.wave_retention,
        observer: std::sync::Arc::new(flotilla::telemetry::metrics::RunRecorder),
        ..EngineOptions::default()
    };
    let engine = Engine::open_with(&settings.data_dir, options)
        .with_context(|| format!("open data dir {}", settings.data_dir.display()))?;
    let api = RolloutApi::new(engine.clone(), auth, settings.limits);
    if let Some(every) = settings.census_interval {
        tokio::spawn(census_schedule(
            engine.clone(),
            every,
            settings.census_fingerprint,
            settings.limits.max_tenants,
        ));
    }
    let _gauges = flotilla::telemetry::metrics::observe_engine(&engine);
    let metrics_server = match (settings.metrics_listen, telemetry.prometheus()) {
        (Some(addr), Some(metrics)) => Some(serve_metrics(addr, metrics).await?),
        _ => None,
    };

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listen on {}", settings.listen))?;
    let local = listener.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<flotilla::api::v1::rollout_service_server::RolloutServiceServer<RolloutApi>>(
        )
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build the reflection service")?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("configure TLS")?;
    }

    // Tests and scripts read this line to learn the port when listening on :0.
    tracing::info!(
        addr = %local,
        data_dir = %settings.data_dir.display(),
        tls = settings.tls.is_some(),
        auth = !settings.tokens.is_empty(),
        "flotillad listening"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let serve = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(api.into_server())
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        );
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => {
            result.context("serve gRPC")?;
            engine.shutdown().await?;
        }
        _ = shutdown_signal() => {
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            stop.cancel();
            // The engine stops starting tenants and waits for those in flight; watch
            // streams end when it begins, so clients hang up and the server can close.
            let engine_drained = engine.shutdown();
            // Graceful shutdown waits for every client to hang up; a client that never
            // does must not keep the daemon alive.
            let server_closed = async {
                match tokio::time::timeout(settings.drain_timeout, &mut serve).await {
                    Ok(result) => result.context("serve gRPC"),
                    Err(_) => {
                        tracing::warn!(timeout = ?settings.drain_timeout, "clients still connected; closing them");
                        Ok(())
                    }
                }
            };
            let (engine_result, server_result) = tokio::join!(engine_drained, server_closed);
            engine_result.context("drain the engine")?;
            server_result?;
        }
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    tracing::info!("flotillad stopped");
    Ok(())
}

/// Serves `GET /metrics` (Prometheus text) on its own listener, apart from the API so a
/// scraper never needs a token or TLS client setup.
async fn serve_metrics(
    addr: SocketAddr,
    metrics: flotilla::telemetry::PrometheusMetrics,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for metrics on {addr}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tracing::info!(metrics_addr = %local, "serving Prometheus metrics at /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    }))
}

/// One grpc.health.v1 check of the daemon at `addr` (the overall status).
async fn healthcheck(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())?
            .connect()
            .await?;
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?
            .into_inner()
            .status;
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(timeout, check)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))?
        .with_context(|| format!("health check of {addr}"))?;
    anyhow::ensure!(
        status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{addr} is not serving (status {status})"
    );
    println!("serving");
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
