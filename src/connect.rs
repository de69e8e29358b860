//! Sessions to tenant databases: one tokio-postgres connection per tenant run, with
//! TLS through rustls when the DSN asks for it, `application_name = 'flotilla'`, a
//! connect timeout, TCP keepalives, and the wave's `lock_timeout`/`statement_timeout`
//! sent in the startup packet so they cost no round trip.
//!
//! TLS follows libpq's `sslmode`: `prefer` (the default) tries TLS and falls back to
//! plain TCP when the server refuses it, `allow` tries plain first, `require` with an
//! `sslrootcert` verifies the chain. Every connect asks `reach` first: no socket opens
//! to a host `allowed_hosts` does not name.
//!
//! This module owns how Flotilla reaches a server and how a running statement is
//! cancelled; it never decides what to run (that is `apply`).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::dsn::{Dsn, TlsMode};
use crate::failure::{DbFailure, FailureKind};
use crate::reach::Reach;

/// The `application_name` of every Flotilla session.
pub const APPLICATION_NAME: &str = "flotilla";

/// Session settings that come from the wave, not the DSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    /// How long to wait for a lock before giving up (55P03).
    pub lock_timeout: Duration,
    /// How long one statement may run; zero means no limit.
    pub statement_timeout: Duration,
    /// How long to wait for the connection to come up.
    pub connect_timeout: Duration,
    /// How long the server lets the session sit idle inside a transaction before it
    /// ends it (and so releases its locks).
    pub idle_in_transaction_timeout: Duration,
    /// What the session calls itself in `pg_stat_activity`: [`APPLICATION_NAME`] for
    /// the sessions that migrate; the watchdog's and the health gates' say so.
    pub application_name: &'static str,
    /// Pin `search_path` to `pg_catalog, pg_temp` in the startup packet (over any
    /// role or database default), and make every transaction read-only: for sessions
    /// that only read (the watchdog, health gates, sizes, the census), so nothing a
    /// tenant defines resolves in place of the catalog and nothing they run can write.
    /// Never for sessions that run scripts.
    pub catalog_only: bool,
}

impl SessionSettings {
    /// A session that only reads the catalog (the watchdog, health gates, database
    /// sizes): called `flotilla-guard`, `search_path` pinned, waiting on no lock for
    /// long, and none of its statements longer than `statement_timeout`.
    pub fn catalog_reader(statement_timeout: Duration) -> Self {
        Self {
            lock_timeout: Duration::from_millis(100),
            statement_timeout,
            connect_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(5),
            application_name: "flotilla-guard",
            catalog_only: true,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(10),
            application_name: APPLICATION_NAME,
            catalog_only: false,
        }
    }
}

/// One open session to a tenant database.
pub struct Session {
    client: Client,
    tls: Option<MakeRustlsConnect>,
    connection: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Connects to `dsn` with `settings`, if `reach` allows it; the socket opens only
    /// after that check.
    pub async fn connect(
        dsn: &Dsn,
        settings: &SessionSettings,
        reach: &Reach,
    ) -> Result<Self, DbFailure> {
        let mut config = reach
            .connect_config(dsn)
            .map_err(|e| DbFailure::of_kind(FailureKind::Refused, e.to_string()))?;
        config.application_name(settings.application_name);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(settings.connect_timeout);
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let mut timeouts = format!(
            "-c lock_timeout={} -c statement_timeout={} -c idle_in_transaction_session_timeout={}",
            settings.lock_timeout.as_millis(),
            settings.statement_timeout.as_millis(),
            settings.idle_in_transaction_timeout.as_millis()
        );
        if settings.catalog_only {
            timeouts
                .push_str(" -c search_path=pg_catalog,pg_temp -c default_transaction_read_only=on");
        }
        let options = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} {timeouts}"),
            _ => timeouts,
        };
        config.options(options);

        // Bound the whole connect, DNS and TLS included, not only the TCP connect.
        let deadline = settings.connect_timeout + Duration::from_secs(1);
        let attempt = |config: Config, tls: Option<MakeRustlsConnect>| async move {
            let timed_out = || {
                DbFailure::of_kind(
                    FailureKind::TimedOut,
                    format!("connecting to {dsn} timed out after {deadline:?}"),
                )
            };
            let (client, connection) = match &tls {
                None => {
                    let (client, conn) = tokio::time::timeout(deadline, config.connect(NoTls))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(|e| connect_failure(dsn, &e))?;
                    (client, tokio::spawn(async move { drop(conn.await) }))
                }
                Some(tls) => {
                    let (client, conn) =
                        tokio::time::timeout(deadline, config.connect(tls.clone()))
                            .await
                            .map_err(|_| timed_out())?
                            .map_err(|e| connect_failure(dsn, &e))?;
                    (client, tokio::spawn(async move { drop(conn.await) }))
                }
            };
            Ok::<_, DbFailure>(Self {
                client,
                tls,
                connection,
            })
        };
        match dsn.tls() {
            TlsMode::Disable => attempt(config, None).await,
            // libpq's `allow`: plain first, TLS only when the server insists on it
            // (its pg_hba refuses a plain session: 28000).
            TlsMode::Allow => match attempt(config.clone(), None).await {
                Err(f) if f.sqlstate.as_deref() == Some("28000") => {
                    config.ssl_mode(SslMode::Require);
                    let tls = MakeRustlsConnect::new(tls_config(TlsMode::Require, dsn).await?);
                    attempt(config, Some(tls)).await
                }
                other => other,
            },
            // `prefer` (also the default): the DSN's config asks for TLS and falls back
            // to plain when the server answers the SSLRequest with "no" — and, as
            // libpq does, when the TLS handshake itself fails (an old server's TLS).
            TlsMode::Prefer => {
                let tls = MakeRustlsConnect::new(tls_config(TlsMode::Prefer, dsn).await?);
                match attempt(config.clone(), Some(tls)).await {
                    Err(f) if f.kind == FailureKind::Tls => {
                        tracing::debug!(error = %f, "TLS failed under sslmode=prefer; trying plain TCP");
                        config.ssl_mode(SslMode::Disable);
                        attempt(config, None).await
                    }
                    other => other,
                }
            }
            mode => {
                let tls = MakeRustlsConnect::new(tls_config(mode, dsn).await?);
                attempt(config, Some(tls)).await
            }
        }
    }

    /// Ends the session and waits until the terminate message is sent and the socket
    /// closed, so a caller counting sessions per server can release its slot honestly.
    /// Ending the session also releases its advisory locks.
    pub async fn close(self) {
        drop(self.client);
        let _ = self.connection.await;
    }

    /// The client, for queries.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The client, for transactions with options (`READ ONLY`) and portals.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Asks the server to cancel whatever this session is running (a new connection, as
    /// PostgreSQL's protocol wants). Best effort: failures are logged, not returned.
    pub async fn cancel_running_statement(&self) {
        let token = self.client.cancel_token();
        let result = match &self.tls {
            None => token.cancel_query(NoTls).await,
            Some(tls) => token.cancel_query(tls.clone()).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %DbFailure::from(&e), "cancel request failed");
        }
    }
}

fn connect_failure(dsn: &Dsn, e: &tokio_postgres::Error) -> DbFailure {
    let mut f = DbFailure::from(e);
    f.message = format!("cannot connect to {dsn}: {}", f.message);
    if f.sqlstate.as_deref() == Some("08P01") {
        // PgBouncer answers a startup `options` parameter so (its transaction mode
        // could not honour our session settings anyway).
        f.message.push_str(
            " (a connection pooler? Flotilla needs a direct or session-pooled connection:              it sends its timeouts as startup options and holds a session advisory lock)",
        );
    }
    // 28P01 (wrong password) and 3D000 (no such database) stay permanent; a server that
    // is down or restarting is retryable (class 08, 57P03, I/O).
    f
}

/// Largest `sslrootcert` file read: CA bundles are kilobytes.
const MAX_ROOT_CERT_BYTES: u64 = 1 << 20;

/// Reads `sslrootcert` off the runtime threads: a regular file of at most
/// [`MAX_ROOT_CERT_BYTES`] (never a FIFO or `/dev/zero` a DSN may name), parsed as PEM
/// certificates. Errors say what is wrong with the file, never what is in it.
async fn read_root_certs(
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, DbFailure> {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        use std::io::Read as _;
        let meta = std::fs::metadata(&path).map_err(|e| e.kind().to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.len() > MAX_ROOT_CERT_BYTES {
            return Err(format!("larger than {MAX_ROOT_CERT_BYTES} bytes"));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_ROOT_CERT_BYTES).read_to_end(&mut bytes))
            .map_err(|e| e.kind().to_string())?;
        Ok(bytes)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let refuse =
        |why: &str| DbFailure::of_kind(FailureKind::Tls, format!("sslrootcert {shown}: {why}"));
    let bytes = read.map_err(|why| refuse(&why))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| refuse("not a PEM file of certificates"))?;
    if certs.is_empty() {
        return Err(refuse("holds no PEM certificate"));
    }
    Ok(certs)
}

pub(crate) async fn tls_config(
    mode: TlsMode,
    dsn: &Dsn,
) -> Result<rustls::ClientConfig, DbFailure> {
    let tls_error = |what: String| DbFailure::of_kind(FailureKind::Tls, what);
    let builder = || {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| (b, provider))
            .map_err(|e| e.to_string())
    };
    if matches!(mode, TlsMode::Require | TlsMode::Prefer | TlsMode::Allow) {
        // The same for every tenant (nothing to verify): built once, not per session
        // (`prefer` is the default, so nearly every connection asks for it).
        static UNVERIFIED: std::sync::OnceLock<Result<rustls::ClientConfig, String>> =
            std::sync::OnceLock::new();
        return UNVERIFIED
            .get_or_init(|| {
                builder().map(|(b, provider)| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                        .with_no_client_auth()
                })
            })
            .clone()
            .map_err(|e| tls_error(format!("TLS setup for {dsn}: {e}")));
    }
    let (builder, provider) =
        builder().map_err(|e| tls_error(format!("TLS setup for {dsn}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    match dsn.root_cert() {
        Some(path) => {
            for cert in read_root_certs(path).await? {
                roots.add(cert).map_err(|_| {
                    tls_error(format!(
                        "sslrootcert {}: a certificate in it is not usable as a root",
                        path.display()
                    ))
                })?;
            }
        }
        // A chain check without a name check against every public CA vouches for any
        // holder of any public certificate: libpq refuses verify-ca without a root file.
        None if mode == TlsMode::VerifyCa => {
            return Err(tls_error(format!(
                "{dsn}: sslmode=verify-ca needs sslrootcert (the CA that signed the server's certificate)"
            )));
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| tls_error(format!("TLS roots for {dsn}: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = if mode == TlsMode::VerifyCa {
        Arc::new(ChainOnly(webpki))
    } else {
        webpki
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `sslmode=require` without a root cert, `prefer` and `allow`: encrypt, but check
/// nothing (what libpq does in these modes).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must be trusted; the name need not match.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(TlsError::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
