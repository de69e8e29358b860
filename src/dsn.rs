//! Tenant connection strings: libpq URLs (`postgresql://…`) and `key=value` strings,
//! parsed into a connect configuration with the TLS mode libpq would use, the tenant's
//! host key (`host:port`, the unit of per-host limits), the network endpoints a
//! connection may reach (for `allowed_hosts`), and a redacted form for humans.
//!
//! This module owns secrecy of connection strings: a [`Dsn`]'s `Debug` and `Display`
//! never show the password, and neither does any error it returns (errors name
//! keywords and character positions, never text a password could be part of). It never
//! connects (`connect` does) and never reads the environment: the daemon's ambient
//! password (`PGPASSWORD`, `.pgpass`) is offered per host by `reach`, not here.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use tokio_postgres::config::{Config, Host, SslMode};

/// How a session to the tenant is protected, from the DSN's `sslmode` (libpq's meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`: plain TCP.
    Disable,
    /// `allow`: plain TCP first; TLS (unverified) only if the server refuses plain.
    Allow,
    /// `prefer`, and no `sslmode` at all (libpq's default): TLS (unverified) if the
    /// server offers it, plain TCP if it refuses.
    Prefer,
    /// `require` without `sslrootcert`: encrypted; the certificate is not checked.
    Require,
    /// `verify-ca`, and `require` with `sslrootcert` (as libpq does): encrypted; the
    /// chain must lead to a trusted root.
    VerifyCa,
    /// `verify-full`: `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

/// Where one of a DSN's hosts sends the connection: what `allowed_hosts` judges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A host name, resolved at connect time.
    Name(String),
    /// An IP literal (from `host` or `hostaddr`).
    Ip(IpAddr),
    /// A directory holding the server's Unix socket.
    Unix(PathBuf),
}

/// One network endpoint a connection may be made to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The address the socket connects to (`hostaddr` when given, else `host`).
    pub address: Address,
    /// The host name, as `.pgpass` and TLS name checks see it.
    pub host_name: String,
    pub port: u16,
}

/// A parsed tenant connection string.
#[derive(Clone)]
pub struct Dsn {
    /// The string as given, password included: only for sealing into the store.
    text: String,
    config: Config,
    tls: TlsMode,
    root_cert: Option<PathBuf>,
    host: String,
    endpoints: Vec<Endpoint>,
}

/// Why a connection string is unusable. Never includes the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("invalid connection string: {0}")]
    Invalid(String),
    #[error(
        "invalid connection string: sslmode is not one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    SslMode,
    #[error(
        "invalid connection string: no host (Flotilla needs host and port to schedule per server)"
    )]
    NoHost,
}

/// The libpq keywords Flotilla accepts. Anything else is refused by position, not by
/// name: an unknown "keyword" is often the tail of an unquoted password.
const KEYWORDS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// libpq parameters Flotilla handles itself instead of handing them to tokio-postgres.
#[derive(Default)]
struct Extracted {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

impl Dsn {
    /// Parses a libpq URL or `key=value` connection string. Never panics, whatever the
    /// input.
    pub fn parse(text: &str) -> Result<Self, DsnError> {
        let text = text.trim();
        let (rest, extracted) = if is_url(text) {
            extract_from_url(text)?
        } else {
            extract_from_keywords(text)?
        };
        // Keywords were checked above, so tokio-postgres's messages name only keywords.
        let mut config: Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| DsnError::Invalid(e.to_string()))?;
        let root_cert = extracted.sslrootcert.map(PathBuf::from);
        let tls = match extracted.sslmode.as_deref() {
            Some("disable") => TlsMode::Disable,
            Some("allow") => TlsMode::Allow,
            None | Some("prefer") => TlsMode::Prefer,
            Some("require") if root_cert.is_some() => TlsMode::VerifyCa,
            Some("require") => TlsMode::Require,
            Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(_) => return Err(DsnError::SslMode),
        };
        config.ssl_mode(match tls {
            TlsMode::Disable | TlsMode::Allow => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let endpoints = endpoints(&config)?;
        let first = endpoints.first().ok_or(DsnError::NoHost)?;
        // The per-host key names where the socket goes: `hostaddr` when given, so two
        // names for one server share its per-host limit.
        let host = match &first.address {
            Address::Unix(p) => format!("{}:{}", p.display(), first.port),
            Address::Ip(ip) => format!("{}:{}", url_host(&ip.to_string()), first.port),
            Address::Name(_) => format!("{}:{}", url_host(&first.host_name), first.port),
        };
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".to_string());
            config.user(user);
        }
        Ok(Self {
            text: text.to_string(),
            config,
            tls,
            root_cert,
            host,
            endpoints,
        })
    }

    /// The connection string exactly as given, password included. Only for sealing it
    /// into the progress store; never log or return it.
    pub fn secret_text(&self) -> &str {
        &self.text
    }

    /// The same server and credentials, another database: for discovery.
    pub fn with_dbname(&self, dbname: &str) -> Result<Self, DsnError> {
        let text = &self.text;
        if is_url(text) {
            let scheme_end = text.find("://").map(|i| i + 3).unwrap_or(0);
            let (base, query) = match text.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (text.as_str(), None),
            };
            let authority_end = base
                .get(scheme_end..)
                .and_then(|rest| rest.find('/'))
                .map(|i| scheme_end + i)
                .unwrap_or(base.len());
            let mut out = format!(
                "{}/{}",
                base.get(..authority_end).unwrap_or(base),
                percent_encode(dbname)
            );
            if let Some(q) = query {
                out.push('?');
                out.push_str(q);
            }
            Self::parse(&out)
        } else {
            let quoted = dbname.replace('\\', "\\\\").replace('\'', "\\'");
            Self::parse(&format!("{text} dbname='{quoted}'"))
        }
    }

    /// The connect configuration (holds the password: never print it).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// True when the string itself carries a password (not the daemon's ambient one).
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// The TLS mode.
    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// `sslrootcert`, when given: trusted roots for `verify-ca`/`verify-full`.
    pub fn root_cert(&self) -> Option<&PathBuf> {
        self.root_cert.as_ref()
    }

    /// `host:port` of the tenant's (first) server.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Every endpoint a connection may try, in order (libpq tries each host).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("")
    }

    /// The role the session logs in as.
    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("")
    }
}

/// Every host with its port and network address, as tokio-postgres will try them.
fn endpoints(config: &Config) -> Result<Vec<Endpoint>, DsnError> {
    let hosts = config.get_hosts();
    let ports = config.get_ports();
    let addrs = config.get_hostaddrs();
    let port_of = |i: usize| match ports.len() {
        0 => Ok(5432),
        1 => Ok(ports[0]),
        n if n == hosts.len().max(addrs.len()) => Ok(ports[i]),
        _ => Err(DsnError::Invalid(
            "port: give one port, or one per host".into(),
        )),
    };
    let mut out = Vec::new();
    if hosts.is_empty() {
        // `hostaddr` alone: the address is also the name.
        for (i, ip) in addrs.iter().enumerate() {
            out.push(Endpoint {
                address: Address::Ip(*ip),
                host_name: ip.to_string(),
                port: port_of(i)?,
            });
        }
        return Ok(out);
    }
    if !addrs.is_empty() && addrs.len() != hosts.len() {
        return Err(DsnError::Invalid(
            "hostaddr: give one per host, or none".into(),
        ));
    }
    for (i, host) in hosts.iter().enumerate() {
        let port = port_of(i)?;
        let endpoint = match (host, addrs.get(i)) {
            // `hostaddr` wins over any `host`, a socket directory included: tokio-postgres
            // connects over TCP to it (the name is only for TLS and `.pgpass`).
            (Host::Unix(path), Some(ip)) => Endpoint {
                address: Address::Ip(*ip),
                host_name: path.display().to_string(),
                port,
            },
            (Host::Tcp(name), Some(ip)) => Endpoint {
                address: Address::Ip(*ip),
                host_name: name.clone(),
                port,
            },
            (Host::Unix(path), None) => Endpoint {
                address: Address::Unix(path.clone()),
                host_name: path.display().to_string(),
                port,
            },
            (Host::Tcp(name), None) => Endpoint {
                address: match name.parse::<IpAddr>() {
                    Ok(ip) => Address::Ip(ip),
                    Err(_) => Address::Name(name.to_ascii_lowercase()),
                },
                host_name: name.clone(),
                port,
            },
        };
        out.push(endpoint);
    }
    Ok(out)
}

/// A host as a URL names it: IPv6 literals in brackets, anything unusual escaped.
fn url_host(host: &str) -> String {
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => format!("[{ip}]"),
        Err(_) => percent_encode(host),
    }
}

/// `postgresql://user@host:port/db`: everything but the password and the options. It
/// parses back to the same text.
impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match self.endpoints.first() {
            Some(e) => format!("{}:{}", url_host(&e.host_name), e.port),
            None => String::new(),
        };
        write!(
            f,
            "postgresql://{}@{host}/{}",
            percent_encode(self.user()),
            percent_encode(self.dbname())
        )
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dsn")
            .field("url", &self.to_string())
            .field(
                "password",
                &self.config.get_password().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls)
            .finish()
    }
}

/// Removes `sslmode` and `sslrootcert` from a URL's query string, refusing unknown
/// parameters by position.
fn extract_from_url(url: &str) -> Result<(String, Extracted), DsnError> {
    let mut extracted = Extracted::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), extracted));
    };
    let mut kept = Vec::new();
    for (n, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key);
        match key.as_str() {
            "sslmode" => extracted.sslmode = Some(percent_decode(value)),
            "sslrootcert" => extracted.sslrootcert = Some(percent_decode(value)),
            k if KEYWORDS.contains(&k) => kept.push(pair),
            _ => {
                return Err(DsnError::Invalid(format!(
                    "query parameter #{} is not a connection keyword Flotilla knows",
                    n + 1
                )));
            }
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, extracted))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes on bytes (a `%` not followed by two hex digits stays as it
/// is); invalid UTF-8 becomes U+FFFD rather than an error or a panic.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `text` starts with `keyword=` for a keyword Flotilla knows.
fn starts_with_keyword(text: &str) -> bool {
    KEYWORDS.iter().any(|k| {
        text.strip_prefix(k)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// Removes `sslmode` and `sslrootcert` from a `key=value` string, honouring libpq's
/// quoting (`'…'` with `\'` and `\\`). Errors name a character position and known
/// keywords only.
fn extract_from_keywords(text: &str) -> Result<(String, Extracted), DsnError> {
    let mut extracted = Extracted::default();
    let mut kept = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_space(&mut chars);
        let Some(&(key_at, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        // Position, not text: an unknown word here is often the tail of an unquoted
        // password (`password=correct horse`).
        let at = text[..key_at].chars().count() + 1;
        if !KEYWORDS.contains(&key.as_str()) {
            return Err(DsnError::Invalid(format!(
                "character {at}: not a connection keyword Flotilla knows (values with spaces must be quoted: key='a b')"
            )));
        }
        skip_space(&mut chars);
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(DsnError::Invalid(format!(
                "character {at}: expected `=` after {key}"
            )));
        }
        let value_at = chars.peek().map(|(i, _)| *i).unwrap_or(text.len());
        skip_space(&mut chars);
        // `host= password=x` is libpq's host "password=x": almost surely a mistake,
        // and one that would show the password as a host name.
        let after = chars.peek().map(|(i, _)| *i).unwrap_or(text.len());
        if after > value_at && starts_with_keyword(&text[after..]) {
            return Err(DsnError::Invalid(format!(
                "character {at}: {key}= has no value (write {key}='' for an empty one)"
            )));
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek().map(|(_, c)| *c) == Some('\'') {
            chars.next();
            raw.push('\'');
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            raw.push(n);
                            value.push(n);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    _ => value.push(c),
                }
            }
            if !closed {
                return Err(DsnError::Invalid(format!(
                    "unterminated quoted value for {key}"
                )));
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                raw.push(c);
                // libpq: a backslash takes the next character literally, a space too.
                if c == '\\'
                    && let Some((_, n)) = chars.next()
                {
                    raw.push(n);
                    value.push(n);
                    continue;
                }
                value.push(c);
            }
        }
        match key.as_str() {
            "sslmode" => extracted.sslmode = Some(value),
            "sslrootcert" => extracted.sslrootcert = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    Ok((kept.join(" "), extracted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_password_is_redacted_everywhere() {
        let dsn =
            Dsn::parse("postgresql://app:s3cret@db1.internal:6432/tenant_7?application_name=x")
                .expect("parses");
        assert_eq!(
            dsn.to_string(),
            "postgresql://app@db1.internal:6432/tenant_7"
        );
        assert_eq!(dsn.host(), "db1.internal:6432");
        assert!(!format!("{dsn:?}").contains("s3cret"));
        assert_eq!(dsn.config().get_password(), Some(&b"s3cret"[..]));
        assert_eq!(dsn.tls(), TlsMode::Prefer, "libpq's default");
    }

    #[test]
    fn keyword_form_with_quotes_and_ssl() {
        let dsn = Dsn::parse(
            "host=10.0.0.5 port=5433 dbname=t1 user=app password='it\\'s secret' sslmode=verify-full sslrootcert=/etc/ca.pem",
        )
        .expect("parses");
        assert_eq!(dsn.host(), "10.0.0.5:5433");
        assert_eq!(dsn.tls(), TlsMode::VerifyFull);
        assert_eq!(dsn.root_cert(), Some(&PathBuf::from("/etc/ca.pem")));
        assert_eq!(dsn.config().get_password(), Some(&b"it's secret"[..]));
        assert!(!format!("{dsn:?} {dsn}").contains("secret"));
    }

    #[test]
    fn url_sslmode_require_and_default_port() {
        let dsn =
            Dsn::parse("postgres://u@h/db?sslmode=require&connect_timeout=3").expect("parses");
        assert_eq!(dsn.tls(), TlsMode::Require);
        assert_eq!(dsn.host(), "h:5432");
    }

    #[test]
    fn errors_never_echo_the_password() {
        for bad in [
            "postgresql://u:hunter2@h:notaport/db",
            "host=h password=hunter2 sslmode=sometimes",
            "host=h password='hunter2",
            "host=h password=hunter2 bogus_option=1",
            "password=hunter2 dbname=x",
        ] {
            let err = Dsn::parse(bad).expect_err(bad);
            assert!(!err.to_string().contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn another_database_on_the_same_server() {
        let url = Dsn::parse("postgresql://u:pw@h:5433/postgres?sslmode=require").expect("url");
        let t = url.with_dbname("tenant_7").expect("with db");
        assert_eq!(t.to_string(), "postgresql://u@h:5433/tenant_7");
        assert_eq!(t.tls(), TlsMode::Require);
        assert_eq!(t.config().get_password(), Some(&b"pw"[..]));
        let kv = Dsn::parse("host=h port=5433 dbname=postgres user=u").expect("kv");
        assert_eq!(kv.with_dbname("it's").expect("with db").dbname(), "it's");
    }

    #[test]
    fn percent_escapes_never_panic() {
        for text in [
            "postgresql://u@h/db?sslmode=%aé",
            "postgresql://u@h/db?sslmode=%",
            "postgresql://u@h/db?sslmode=%é1",
            "postgresql://u@h/db?%é=1",
        ] {
            // An error or a DSN, never a panic.
            let _ = Dsn::parse(text);
        }
        assert_eq!(percent_decode("a%41%zz%4"), "aA%zz%4");
        assert_eq!(percent_decode("%é"), "%é");
    }

    #[test]
    fn an_unquoted_space_in_a_password_is_not_echoed() {
        let err = Dsn::parse("host=h user=u password=correct horse battery").unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains("horse") && !text.contains("correct"),
            "{text}"
        );
        assert!(
            text.contains("character 32") && text.contains("quoted"),
            "{text}"
        );
        let err = Dsn::parse("postgresql://u:pw@h/db?pass&qzx=1").unwrap_err();
        assert!(!err.to_string().contains("qzx"), "{err}");
    }

    #[test]
    fn tls_modes_as_libpq_means_them() {
        let mode = |q: &str| Dsn::parse(&format!("postgresql://u@h/db{q}")).map(|d| d.tls());
        assert_eq!(mode(""), Ok(TlsMode::Prefer));
        assert_eq!(mode("?sslmode=prefer"), Ok(TlsMode::Prefer));
        assert_eq!(mode("?sslmode=allow"), Ok(TlsMode::Allow));
        assert_eq!(mode("?sslmode=disable"), Ok(TlsMode::Disable));
        assert_eq!(mode("?sslmode=require"), Ok(TlsMode::Require));
        assert_eq!(
            mode("?sslmode=require&sslrootcert=/ca.pem"),
            Ok(TlsMode::VerifyCa),
            "require with a root cert verifies the chain"
        );
        assert_eq!(mode("?sslmode=verify-full"), Ok(TlsMode::VerifyFull));
    }

    #[test]
    fn every_host_and_hostaddr_is_an_endpoint() {
        let d = Dsn::parse("host=a.internal,10.1.2.3 port=5433,5434 user=u dbname=d")
            .expect("two hosts");
        assert_eq!(
            d.endpoints()
                .iter()
                .map(|e| (e.address.clone(), e.port))
                .collect::<Vec<_>>(),
            [
                (Address::Name("a.internal".into()), 5433),
                (Address::Ip("10.1.2.3".parse().expect("ip")), 5434)
            ]
        );
        let d = Dsn::parse("host=db.internal hostaddr=192.0.2.7 user=u").expect("hostaddr");
        assert_eq!(
            d.endpoints()[0].address,
            Address::Ip("192.0.2.7".parse().expect("ip")),
            "the socket goes to hostaddr, whatever the name says"
        );
        assert_eq!(d.endpoints()[0].host_name, "db.internal");
        let d = Dsn::parse("postgresql://u@[::1]:6000/db").expect("ipv6");
        assert_eq!(d.host(), "[::1]:6000");
        assert_eq!(d.to_string(), "postgresql://u@[::1]:6000/db");
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// A password no generated text contains by accident.
        const SECRET: &str = "Zq7Secret";

        fn dsn_like() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("postgresql://".to_string()),
                Just("host=".to_string()),
                Just(" password=".to_string()),
                Just(format!(" password={SECRET}")),
                Just(format!(":{SECRET}@")),
                Just("%".to_string()),
                Just("'".to_string()),
                Just("?sslmode=".to_string()),
                Just("&".to_string()),
                Just("/".to_string()),
                Just("[".to_string()),
                "[a-z0-9:@/?=&%' .,é\\[\\]\\\\-]{0,12}",
            ];
            proptest::collection::vec(piece, 0..10).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,80}") {
                let _ = Dsn::parse(&text);
            }

            #[test]
            fn the_password_is_in_no_display_and_no_error(text in dsn_like()) {
                match Dsn::parse(&text) {
                    Ok(d) => {
                        let shown = format!("{d} {d:?}");
                        // The password, wherever the generator put it; unless the same
                        // text is also the host, user or database (those are shown).
                        if let Some(pw) = d.config().get_password() {
                            let pw = String::from_utf8_lossy(pw).into_owned();
                            let named = format!("{} {} {}", d.host(), d.user(), d.dbname());
                            if pw.contains(SECRET) && !named.contains(SECRET) {
                                prop_assert!(!shown.contains(SECRET), "{text:?} shows {shown}");
                            }
                        }
                    }
                    Err(e) => {
                        let shown = e.to_string();
                        prop_assert!(!shown.contains(SECRET), "{text:?} errs {shown}");
                    }
                }
            }

            #[test]
            fn display_parses_back_to_itself(text in dsn_like()) {
                if let Ok(d) = Dsn::parse(&text) {
                    let shown = d.to_string();
                    let again = Dsn::parse(&shown);
                    prop_assert!(again.is_ok(), "{text:?} shows {shown:?}, which does not parse: {again:?}");
                    if let Ok(again) = again {
                        prop_assert_eq!(again.to_string(), shown.clone());
                        prop_assert_eq!(again.host(), d.host());
                        prop_assert_eq!(again.dbname(), d.dbname());
                        prop_assert_eq!(again.user(), d.user());
                    }
                }
            }
        }
    }
}
