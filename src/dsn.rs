//! Tenant connection strings: libpq URLs (`postgresql://…`) and `key=value` strings,
//! parsed into a connect configuration with the TLS mode libpq would use, the tenant's
//! host key (`host:port`, the unit of per-host limits), and a redacted form for humans.
//!
//! This module owns secrecy of connection strings: a [`Dsn`]'s `Debug` and `Display`
//! never show the password, and neither does any error it returns. It never connects;
//! `connect` does. Passwords missing from the string come from `PGPASSWORD` or the
//! `.pgpass` file (`PGPASSFILE`, else `~/.pgpass`), as libpq does.

use std::fmt;
use std::path::PathBuf;

use tokio_postgres::config::{Config, Host, SslMode};

/// How a session to the tenant is protected, from the DSN's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`, `allow` and `prefer`: plain TCP. Flotilla encrypts only when the DSN
    /// asks for it, which spares every tenant the TLS-negotiation round trip.
    Plain,
    /// `require`: encrypted; the certificate is not checked (libpq's meaning).
    Require,
    /// `verify-ca`: encrypted; the chain must lead to a trusted root.
    VerifyCa,
    /// `verify-full`: `verify-ca`, and the certificate must name the host.
    VerifyFull,
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
}

/// Why a connection string is unusable. Never includes the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("invalid connection string: {0}")]
    Invalid(String),
    #[error(
        "invalid connection string: sslmode {0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    SslMode(String),
    #[error(
        "invalid connection string: no host (Flotilla needs host and port to schedule per server)"
    )]
    NoHost,
}

/// libpq parameters Flotilla handles itself instead of handing them to tokio-postgres.
#[derive(Default)]
struct Extracted {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

impl Dsn {
    /// Parses a libpq URL or `key=value` connection string.
    pub fn parse(text: &str) -> Result<Self, DsnError> {
        let text = text.trim();
        let (rest, extracted) =
            if text.starts_with("postgres://") || text.starts_with("postgresql://") {
                extract_from_url(text)
            } else {
                extract_from_keywords(text)?
            };
        let mut config: Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| DsnError::Invalid(e.to_string()))?;
        let tls = match extracted.sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => TlsMode::Plain,
            Some("require") => TlsMode::Require,
            Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(other) => return Err(DsnError::SslMode(other.to_string())),
        };
        config.ssl_mode(match tls {
            TlsMode::Plain => SslMode::Disable,
            _ => SslMode::Require,
        });
        let host = match (config.get_hosts().first(), config.get_ports().first()) {
            (Some(Host::Tcp(h)), port) => format!("{h}:{}", port.copied().unwrap_or(5432)),
            (Some(Host::Unix(p)), port) => {
                format!("{}:{}", p.display(), port.copied().unwrap_or(5432))
            }
            (None, _) => return Err(DsnError::NoHost),
        };
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".to_string());
            config.user(user);
        }
        if config.get_password().is_none()
            && let Some(password) = password_from_environment(&config, &host)
        {
            config.password(password);
        }
        Ok(Self {
            text: text.to_string(),
            config,
            tls,
            root_cert: extracted.sslrootcert.map(PathBuf::from),
            host,
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
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            let scheme_end = text.find("://").map(|i| i + 3).unwrap_or(0);
            let (base, query) = match text.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (text.as_str(), None),
            };
            let authority_end = base[scheme_end..]
                .find('/')
                .map(|i| scheme_end + i)
                .unwrap_or(base.len());
            let mut out = format!("{}/{}", &base[..authority_end], percent_encode(dbname));
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

    /// The TLS mode.
    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// `sslrootcert`, when given: trusted roots for `verify-ca`/`verify-full`.
    pub fn root_cert(&self) -> Option<&PathBuf> {
        self.root_cert.as_ref()
    }

    /// `host:port` of the tenant's server.
    pub fn host(&self) -> &str {
        &self.host
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

/// `postgresql://user@host:port/db`: everything but the password.
impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgresql://{}@{}/{}",
            self.user(),
            self.host,
            self.dbname()
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

/// Removes `sslmode` and `sslrootcert` from a URL's query string.
fn extract_from_url(url: &str) -> (String, Extracted) {
    let mut extracted = Extracted::default();
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), extracted);
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => extracted.sslmode = Some(percent_decode(value)),
            "sslrootcert" => extracted.sslrootcert = Some(percent_decode(value)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, extracted)
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `sslmode` and `sslrootcert` from a `key=value` string, honouring libpq's
/// quoting (`'…'` with `\'` and `\\`).
fn extract_from_keywords(text: &str) -> Result<(String, Extracted), DsnError> {
    let mut extracted = Extracted::default();
    let mut kept = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(DsnError::Invalid(format!("expected `=` after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            raw.push(chars.next().unwrap_or('\''));
            let mut closed = false;
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
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
                    "unterminated quoted value for {key:?}"
                )));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                raw.push(c);
                value.push(c);
                chars.next();
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

/// `PGPASSWORD`, else the first matching line of the password file.
fn password_from_environment(config: &Config, host: &str) -> Option<String> {
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Some(p);
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = std::fs::read_to_string(file).ok()?;
    let (h, port) = host.rsplit_once(':').unwrap_or((host, "5432"));
    let want = [
        h,
        port,
        config.get_dbname().unwrap_or(""),
        config.get_user().unwrap_or(""),
    ];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| pgpass_match(line, &want))
}

/// Matches one `.pgpass` line (`host:port:db:user:password`, `*` wildcards, `\:` and
/// `\\` escapes) against `want`, returning the password.
fn pgpass_match(line: &str, want: &[&str; 4]) -> Option<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    if fields.len() != 5 {
        return None;
    }
    let matches = fields[..4]
        .iter()
        .zip(want)
        .all(|(f, w)| f == "*" || f == w || (f == "localhost" && *w == "127.0.0.1"));
    matches.then(|| fields[4].clone())
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
        assert_eq!(dsn.tls(), TlsMode::Plain);
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
    fn pgpass_lines() {
        let want = ["db1", "5432", "t1", "app"];
        assert_eq!(
            pgpass_match("db1:5432:t1:app:pw", &want).as_deref(),
            Some("pw")
        );
        assert_eq!(
            pgpass_match("*:*:*:app:p\\:w", &want).as_deref(),
            Some("p:w")
        );
        assert_eq!(pgpass_match("db2:5432:t1:app:pw", &want), None);
        assert_eq!(pgpass_match("garbage", &want), None);
    }
}
