//! The daemon's configuration file (TOML): its shape, defaults and validation. Flags and
//! environment variables override it field by field (the layering happens in
//! `flotillad`); this module only reads and checks files, it never opens a socket or a
//! store. Secrets stay out of it: tokens appear only as SHA-256 hashes, ideally in a
//! separate `tokens_file` (a Kubernetes Secret, a root-only file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./flotilla-data";
/// Default drain timeout for connected clients on SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read waves, tenants, plans and logs.
    Viewer,
    /// Also start, pause, resume, cancel and retry waves.
    Operator,
}

impl Role {
    /// The name used in config files and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

/// One named token, stored as the SHA-256 of its text (`flotillad hash-token`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Recorded as the actor of every wave state change made with this token.
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
}

/// Serve gRPC over TLS with these PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Request size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sum of a bundle's script bytes.
    pub max_bundle_bytes: usize,
    /// Tenants in one wave or plan.
    pub max_tenants: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bundle_bytes: 16 << 20,
            max_tenants: 100_000,
        }
    }
}

impl Limits {
    /// The largest gRPC message the daemon decodes: a full bundle plus a full target
    /// list (a generous 1 KiB per tenant), so the precise checks above can name the limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_bundle_bytes
            .saturating_add(self.max_tenants.saturating_mul(1024))
            .saturating_add(1 << 20)
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The config file. Every field is optional; flags and environment win over it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    /// A duration such as `10s`.
    #[serde(default, with = "humantime_serde_opt")]
    pub drain_timeout: Option<Duration>,
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics over HTTP at `/metrics` on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// A TOML file holding only `[[tokens]]`, kept apart from the rest.
    pub tokens_file: Option<PathBuf>,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub limits: Limits,
    /// Where the daemon may connect (tenants, catalogs, discovery): host names or
    /// globs, IPs, CIDRs, socket directories, each with an optional `:PORT`. Unset: any
    /// TCP host. Also where the daemon's own `PGPASSWORD` may be sent (see `reach`).
    pub allowed_hosts: Option<Vec<String>>,
    /// Finished waves older than this are forgotten, e.g. `30days`; `0` keeps them
    /// for ever. Default: 30 days.
    #[serde(default, with = "humantime_serde_opt")]
    pub wave_retention: Option<Duration>,
    /// Take a census of every registered fleet this often (e.g. `15m`) and export it
    /// as `flotilla_fleet_*` metrics; `0` or unset: never.
    #[serde(default, with = "humantime_serde_opt")]
    pub census_interval: Option<Duration>,
    /// Whether the scheduled census also reads schema fingerprints. Default: true.
    pub census_fingerprint: Option<bool>,
}

/// Default retention of finished waves.
pub const DEFAULT_WAVE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A tokens file: `[[tokens]]` entries only.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("token {name:?}: {message}")]
    Token { name: String, message: String },
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl FileConfig {
    /// Reads and parses a config file; unknown keys are errors (a typo must not be
    /// silently ignored).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        read_toml(path)
    }

    /// Every token: inline ones and those of `tokens_file` (resolved against `base`,
    /// the config file's directory, when relative), checked.
    pub fn all_tokens(&self, base: &Path) -> Result<Vec<TokenConfig>, ConfigError> {
        let mut tokens = self.tokens.clone();
        if let Some(file) = &self.tokens_file {
            tokens.extend(load_tokens_file(&base.join(file))?.tokens);
        }
        check_tokens(&tokens)?;
        Ok(tokens)
    }
}

/// Reads a tokens file.
pub fn load_tokens_file(path: &Path) -> Result<TokensFile, ConfigError> {
    read_toml(path)
}

/// Names are unique and non-empty; hashes are 64 lowercase hex digits.
pub fn check_tokens(tokens: &[TokenConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for t in tokens {
        let bad = |message: &str| ConfigError::Token {
            name: t.name.clone(),
            message: message.to_string(),
        };
        if t.name.trim().is_empty() {
            return Err(bad("empty name"));
        }
        if !names.insert(t.name.as_str()) {
            return Err(bad("the name is used twice"));
        }
        if t.sha256.len() != 64
            || !t
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad(
                "sha256 must be 64 lowercase hex digits (see `flotillad hash-token`)",
            ));
        }
    }
    Ok(())
}

/// The hash a config stores for `token`.
pub fn hash_token(token: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::Deserialize as _;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config_and_refuses_unknown_keys() {
        let config: FileConfig = toml::from_str(&format!(
            r#"
listen = "0.0.0.0:50051"
data_dir = "/var/lib/flotilla"
drain_timeout = "30s"
log_format = "json"
metrics_listen = "0.0.0.0:9090"
allowed_hosts = ["*.db.internal", "10.0.0.0/8:5432"]
wave_retention = "7days"
census_interval = "15m"
census_fingerprint = false
[tls]
cert = "/etc/flotilla/tls.crt"
key = "/etc/flotilla/tls.key"
[limits]
max_tenants = 10
[[tokens]]
name = "ci"
role = "operator"
sha256 = "{}"
"#,
            hash_token("s3cret")
        ))
        .expect("parses");
        assert_eq!(config.drain_timeout, Some(Duration::from_secs(30)));
        assert_eq!(config.limits.max_tenants, 10);
        assert_eq!(
            config.limits.max_bundle_bytes,
            Limits::default().max_bundle_bytes
        );
        assert_eq!(config.tokens[0].role, Role::Operator);
        assert_eq!(config.allowed_hosts.as_ref().map(Vec::len), Some(2));
        assert_eq!(
            config.wave_retention,
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        assert_eq!(config.census_interval, Some(Duration::from_secs(900)));
        assert_eq!(config.census_fingerprint, Some(false));
        assert!(config.all_tokens(Path::new("/")).is_ok());

        let typo = toml::from_str::<FileConfig>("listne = \"0.0.0.0:1\"");
        assert!(typo.unwrap_err().to_string().contains("listne"));
    }

    #[test]
    fn token_checks_name_what_is_wrong() {
        let token = |name: &str, sha: &str| TokenConfig {
            name: name.into(),
            role: Role::Viewer,
            sha256: sha.into(),
        };
        let good = hash_token("x");
        assert!(check_tokens(&[token("a", &good)]).is_ok());
        let err = check_tokens(&[token("a", "plaintext")]).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
        let err = check_tokens(&[token("a", &good), token("a", &good)]).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert!(check_tokens(&[token(" ", &good)]).is_err());
    }
}
