//! Where the daemon may connect, and to whom it offers its own password.
//!
//! Every connection Flotilla opens — a tenant run, a plan or log read, a catalog query,
//! a discovery — goes through [`Reach::connect_config`] before a socket opens. It checks
//! every endpoint of the DSN (each `host`, and `hostaddr` where given, since that is
//! where the socket really goes) against `allowed_hosts`, and only then decides whether
//! the daemon's *ambient* password (`PGPASSWORD`, a `.pgpass` line) may be added: a
//! password from the daemon's environment must never reach a server a caller merely
//! named in a request. This module decides; it never opens a socket itself.
//!
//! Rules of `allowed_hosts` (unset: any TCP host, so a single-team setup keeps working):
//! `*` (any TCP host), a host name or a glob of one (`*.db.internal`, case-insensitive),
//! an IP address, a CIDR (`10.0.0.0/8`, `fd00::/8`), or a Unix socket directory
//! (`/var/run/postgresql`, exact). Each may end in `:PORT` (IPv6 in brackets:
//! `[fd00::/8]:5432`); without one any port matches. Name rules match only names and
//! address rules only IP literals: nothing is resolved to decide, so DNS cannot widen
//! the list.
//!
//! The ambient password is offered to an endpoint only when `allowed_hosts` is set (the
//! operator named where the daemon may go), or when a `.pgpass` line names that host
//! explicitly (not `*`). `PGPASSWORD` and the `.pgpass` file are read once, when the
//! daemon starts.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tokio_postgres::Config;

use crate::dsn::{Address, Dsn, Endpoint};

/// One entry of `allowed_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    address: AddressRule,
    /// `None`: any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AddressRule {
    /// `*`: any TCP host.
    AnyTcp,
    /// A host name or glob, lowercase.
    Name(String),
    /// An address and prefix length.
    Net(IpAddr, u8),
    /// A Unix socket directory.
    Unix(PathBuf),
}

/// Why a connection may not be made. Names the endpoint and the setting, never a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachError {
    #[error(
        "connecting to {endpoint} is not allowed: it matches no entry of allowed_hosts in the flotillad config"
    )]
    NotAllowed { endpoint: String },
    #[error("allowed_hosts entry {rule:?}: {message}")]
    BadRule { rule: String, message: String },
}

/// The parsed `allowed_hosts` setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// `None`: unset, any TCP host.
    rules: Option<Vec<HostRule>>,
}

impl AllowedHosts {
    /// Any TCP host (the setting left unset).
    pub fn any() -> Self {
        Self { rules: None }
    }

    /// Parses the config's list; an entry that is not a rule is an error naming it.
    pub fn parse(entries: &[String]) -> Result<Self, ReachError> {
        let rules = entries
            .iter()
            .map(|e| parse_rule(e))
            .collect::<Result<_, _>>()?;
        Ok(Self { rules: Some(rules) })
    }

    /// True when the setting was given (even empty: then nothing is allowed).
    pub fn is_set(&self) -> bool {
        self.rules.is_some()
    }

    fn allows(&self, e: &Endpoint) -> bool {
        let Some(rules) = &self.rules else {
            return !matches!(e.address, Address::Unix(_));
        };
        rules.iter().any(|r| r.matches(e))
    }

    /// True when a rule that names something — a host, a domain, a network narrower
    /// than everything — allows `e`: where the daemon's own password may go. `*` and
    /// `0.0.0.0/0` allow connecting, but vouch for nobody.
    fn vouches_for(&self, e: &Endpoint) -> bool {
        self.rules
            .iter()
            .flatten()
            .any(|r| r.address.names_something() && r.matches(e))
    }
}

impl HostRule {
    fn matches(&self, e: &Endpoint) -> bool {
        self.port.is_none_or(|p| p == e.port) && self.address.matches(&e.address)
    }
}

impl AddressRule {
    fn names_something(&self) -> bool {
        match self {
            AddressRule::AnyTcp => false,
            AddressRule::Net(_, bits) => *bits > 0,
            AddressRule::Name(glob) => glob.split('.').any(|label| label != "*"),
            AddressRule::Unix(_) => true,
        }
    }

    fn matches(&self, address: &Address) -> bool {
        match (self, address) {
            (AddressRule::AnyTcp, Address::Name(_) | Address::Ip(_)) => true,
            (AddressRule::Name(glob), Address::Name(name)) => glob_match(glob, name),
            (AddressRule::Net(net, bits), Address::Ip(ip)) => in_network(*net, *bits, *ip),
            (AddressRule::Unix(dir), Address::Unix(path)) => dir == path,
            _ => false,
        }
    }
}

fn parse_rule(text: &str) -> Result<HostRule, ReachError> {
    let bad = |message: &str| ReachError::BadRule {
        rule: text.to_string(),
        message: message.to_string(),
    };
    let text_trimmed = text.trim();
    if text_trimmed.is_empty() {
        return Err(bad("empty"));
    }
    if text_trimmed.starts_with('/') {
        if text_trimmed.contains(':') {
            return Err(bad(
                "a socket directory takes no :PORT (the port picks the socket file; list the directory)",
            ));
        }
        return Ok(HostRule {
            address: AddressRule::Unix(PathBuf::from(text_trimmed)),
            port: None,
        });
    }
    // Split off `:PORT`: after `]` for bracketed IPv6, else at the only colon.
    let (address, port) = if let Some(rest) = text_trimmed.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        match after {
            "" => (inside, None),
            _ => (
                inside,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("expected `:PORT` after `]`"))?,
                ),
            ),
        }
    } else if text_trimmed.matches(':').count() == 1 {
        let (a, p) = text_trimmed
            .split_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        (a, Some(p))
    } else {
        (text_trimmed, None)
    };
    let port = match port {
        None | Some("*") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("the port must be 1..65535 or `*`"))?,
        ),
    };
    let address = if address == "*" {
        AddressRule::AnyTcp
    } else if let Some((net, bits)) = address.split_once('/') {
        let net: IpAddr = net
            .parse()
            .map_err(|_| bad("a CIDR must be ADDRESS/BITS with an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits
            .parse::<u8>()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| bad("the prefix length is out of range"))?;
        AddressRule::Net(net, bits)
    } else if let Ok(ip) = address.parse::<IpAddr>() {
        AddressRule::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
    } else if looks_numeric(address) {
        // `127.1` or `0x7f.1` is no host name: the resolver reads it as an address.
        return Err(bad(
            "looks like an IP address but is not one; write it in full (10.0.0.1) or as a CIDR",
        ));
    } else if !address.is_empty()
        && address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'*'))
    {
        AddressRule::Name(address.to_ascii_lowercase())
    } else {
        return Err(bad(
            "expected `*`, a host name or glob, an IP address, a CIDR or a socket directory",
        ));
    };
    Ok(HostRule { address, port })
}

/// A name every label of which is a number (decimal or `0x…`), or which ends in one:
/// what a resolver may turn into an address.
fn looks_numeric(name: &str) -> bool {
    let numeric = |label: &str| {
        !label.is_empty()
            && (label.bytes().all(|b| b.is_ascii_digit())
                || label
                    .strip_prefix("0x")
                    .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())))
    };
    name.rsplit('.').next().is_some_and(numeric)
}

/// Matches label by label: `*` stands for one whole label or part of one, never for a
/// dot, so `*.db.internal` matches `t1.db.internal` but not `t1.evil.db.internal`, and
/// `db-*` does not match `db-1.evil.example`.
fn glob_match(glob: &str, name: &str) -> bool {
    let (globs, names): (Vec<&str>, Vec<&str>) =
        (glob.split('.').collect(), name.split('.').collect());
    globs.len() == names.len() && globs.iter().zip(&names).all(|(g, n)| label_match(g, n))
}

/// `*` matches any run of characters within one label.
fn label_match(glob: &str, name: &str) -> bool {
    let (g, n) = (glob.as_bytes(), name.as_bytes());
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ni));
            gi += 1;
        } else if gi < g.len() && g[gi] == n[ni] {
            gi += 1;
            ni += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

fn in_network(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    let ip = match (net, ip) {
        (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        _ => ip,
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The daemon's ambient credentials, read once at start.
#[derive(Clone, Default)]
struct Ambient {
    pgpassword: Option<String>,
    /// Lines of the password file: `host:port:db:user:password`.
    pgpass: Vec<PgpassLine>,
}

#[derive(Clone)]
struct PgpassLine {
    fields: [String; 4],
    password: String,
}

impl std::fmt::Debug for Ambient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ambient")
            .field(
                "pgpassword",
                &self.pgpassword.as_ref().map(|_| "<redacted>"),
            )
            .field("pgpass_lines", &self.pgpass.len())
            .finish()
    }
}

/// Where connections may go and which credentials they may carry. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    allowed: AllowedHosts,
    ambient: Ambient,
}

impl Reach {
    /// `allowed` with the ambient password of this process's environment (`PGPASSWORD`,
    /// then `PGPASSFILE` or `~/.pgpass`).
    pub fn from_environment(allowed: AllowedHosts) -> Self {
        let pgpassword = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty());
        let file = std::env::var_os("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
        let pgpass = file.as_deref().map(read_pgpass).unwrap_or_default();
        Self {
            allowed,
            ambient: Ambient { pgpassword, pgpass },
        }
    }

    /// `allowed`, and no ambient password at all.
    pub fn without_ambient_password(allowed: AllowedHosts) -> Self {
        Self {
            allowed,
            ambient: Ambient::default(),
        }
    }

    /// The `allowed_hosts` setting.
    pub fn allowed(&self) -> &AllowedHosts {
        &self.allowed
    }

    /// True when `PGPASSWORD` is set but no server may receive it (no `allowed_hosts`
    /// entry names a server): worth a warning at start.
    pub fn ignores_pgpassword(&self) -> bool {
        self.ambient.pgpassword.is_some()
            && !self
                .allowed
                .rules
                .iter()
                .flatten()
                .any(|r| r.address.names_something())
    }

    /// Refuses a DSN any of whose endpoints `allowed_hosts` does not allow.
    pub fn check(&self, dsn: &Dsn) -> Result<(), ReachError> {
        match dsn.endpoints().iter().find(|e| !self.allowed.allows(e)) {
            None => Ok(()),
            Some(e) => Err(ReachError::NotAllowed {
                endpoint: describe(e),
            }),
        }
    }

    /// The configuration to connect with: checked against `allowed_hosts`, with the
    /// ambient password added where this module's rules allow it.
    pub fn connect_config(&self, dsn: &Dsn) -> Result<Config, ReachError> {
        self.check(dsn)?;
        let mut config = dsn.config().clone();
        if !dsn.has_password()
            && let Some(password) = self.ambient_password(dsn)
        {
            config.password(password);
        }
        Ok(config)
    }

    fn ambient_password(&self, dsn: &Dsn) -> Option<String> {
        let endpoints = dsn.endpoints();
        let first = endpoints.first()?;
        // `hostaddr` sends the socket somewhere other than the name says; the name is
        // what `.pgpass` and `allowed_hosts` names vouch for. No ambient password then.
        if endpoints.iter().any(|e| match &e.address {
            Address::Ip(ip) => {
                ip.to_string() != e.host_name && e.host_name.parse::<IpAddr>().ok() != Some(*ip)
            }
            _ => false,
        }) {
            return None;
        }
        // One password goes to every host of the DSN: each must be vouched for.
        let vouched = endpoints.iter().all(|e| self.allowed.vouches_for(e));
        if vouched && let Some(p) = &self.ambient.pgpassword {
            return Some(p.clone());
        }
        if !vouched
            && endpoints
                .iter()
                .any(|e| e.host_name != first.host_name || e.port != first.port)
        {
            return None;
        }
        let port = first.port.to_string();
        let want = [
            first.host_name.as_str(),
            port.as_str(),
            dsn.dbname(),
            dsn.user(),
        ];
        // Unvouched, only a line naming this host and port explicitly may be used: a
        // wildcard (`*`, or `localhost` on any port) would let any listener collect it.
        self.ambient
            .pgpass
            .iter()
            .find(|line| {
                line.matches(&want) && (vouched || (line.fields[0] != "*" && line.fields[1] != "*"))
            })
            .map(|line| line.password.clone())
    }
}

fn describe(e: &Endpoint) -> String {
    match &e.address {
        Address::Unix(p) => format!("Unix socket {} port {}", p.display(), e.port),
        Address::Ip(ip) if ip.to_string() != e.host_name => {
            format!("host {} (hostaddr {ip}) port {}", e.host_name, e.port)
        }
        _ => format!("host {} port {}", e.host_name, e.port),
    }
}

impl PgpassLine {
    fn matches(&self, want: &[&str; 4]) -> bool {
        self.fields
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w || (f == "localhost" && *w == "127.0.0.1"))
    }
}

fn read_pgpass(path: &Path) -> Vec<PgpassLine> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_pgpass_line)
        .collect()
}

/// One `.pgpass` line (`host:port:db:user:password`, `\:` and `\\` escapes).
fn parse_pgpass_line(line: &str) -> Option<PgpassLine> {
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
    let [host, port, db, user]: [String; 4] = fields.try_into().ok()?;
    Some(PgpassLine {
        fields: [host, port, db, user],
        password: cur,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(rules: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(&rules.iter().map(|r| r.to_string()).collect::<Vec<_>>())
            .expect("rules")
    }

    fn dsn(text: &str) -> Dsn {
        Dsn::parse(text).expect("dsn")
    }

    #[test]
    fn rules_match_names_addresses_ports_and_sockets() {
        let a = Reach::without_ambient_password(allowed(&[
            "*.db.internal",
            "10.0.0.0/8:5432",
            "[fd00::/8]:6432",
            "127.0.0.1",
            "/var/run/postgresql",
        ]));
        for ok in [
            "postgresql://u@T1.db.internal:7000/x",
            "postgresql://u@10.9.8.7/x",
            "postgresql://u@[fd00::1]:6432/x",
            "postgresql://u@127.0.0.1:5999/x",
            "host=/var/run/postgresql user=u",
            "host=a.db.internal hostaddr=10.1.1.1 port=5432 user=u",
        ] {
            assert_eq!(a.check(&dsn(ok)), Ok(()), "{ok}");
        }
        // A socket directory with a hostaddr connects over TCP to the hostaddr.
        assert!(
            a.check(&dsn("host=/var/run/postgresql hostaddr=203.0.113.5 user=u"))
                .is_err()
        );
        for refused in [
            "postgresql://u@evil.example/x",
            "postgresql://u@db.internal.evil.example/x",
            "postgresql://u@10.9.8.7:6543/x",
            "postgresql://u@[fd00::1]:5432/x",
            "host=/tmp user=u",
            // The name is allowed, but the socket goes to hostaddr.
            "host=a.db.internal hostaddr=192.0.2.1 user=u",
            // The second host is tried too.
            "host=a.db.internal,evil.example user=u",
        ] {
            let err = a.check(&dsn(refused)).expect_err(refused);
            assert!(err.to_string().contains("allowed_hosts"), "{err}");
        }
    }

    #[test]
    fn unset_allows_any_tcp_host_but_no_socket() {
        let any = Reach::without_ambient_password(AllowedHosts::any());
        assert!(any.check(&dsn("postgresql://u@anything.example/x")).is_ok());
        assert!(any.check(&dsn("host=/var/run/postgresql user=u")).is_err());
        let none = Reach::without_ambient_password(allowed(&[]));
        assert!(none.check(&dsn("postgresql://u@h/x")).is_err());
    }

    #[test]
    fn bad_rules_are_named() {
        for bad in [
            "",
            "10.0.0.0/33",
            "h:0",
            "h:port",
            "[::1",
            "a b",
            "1.2.3/8",
            "127.1",
            "0x7f.1",
            "/var/run/postgresql:5432",
        ] {
            let err = AllowedHosts::parse(&[bad.to_string()]).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.db", "a.db"));
        assert!(glob_match("db-*-eu.*", "db-7-eu.internal"));
        assert!(!glob_match("*.db", "a.db.evil"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", "ab"));
        assert!(!glob_match("*.db.internal", "t1.evil.db.internal"));
        assert!(!glob_match("db-*", "db-1.evil.example"));
        assert!(glob_match("t*.db.internal", "t42.db.internal"));
    }

    fn with_ambient(allowed: AllowedHosts, pgpassword: Option<&str>, lines: &[&str]) -> Reach {
        Reach {
            allowed,
            ambient: Ambient {
                pgpassword: pgpassword.map(str::to_string),
                pgpass: lines.iter().filter_map(|l| parse_pgpass_line(l)).collect(),
            },
        }
    }

    fn password(reach: &Reach, text: &str) -> Option<Vec<u8>> {
        reach
            .connect_config(&dsn(text))
            .expect("allowed")
            .get_password()
            .map(<[u8]>::to_vec)
    }

    #[test]
    fn the_ambient_password_goes_only_where_it_was_meant_to() {
        let open = with_ambient(
            AllowedHosts::any(),
            Some("env-pw"),
            &["db1:5432:*:app:line-pw", "*:*:*:*:wild-pw"],
        );
        assert_eq!(
            password(&open, "postgresql://app@db1/t"),
            Some(b"line-pw".to_vec()),
            "a .pgpass line naming the host"
        );
        assert_eq!(
            password(&open, "postgresql://app@attacker.example/t"),
            None,
            "neither PGPASSWORD nor a wildcard line reaches a host nobody named"
        );
        assert_eq!(
            password(&open, "host=db1,attacker.example user=app"),
            None,
            "one password would go to every host"
        );
        assert_eq!(
            password(&open, "postgresql://app:own@attacker.example/t"),
            Some(b"own".to_vec()),
            "the DSN's own password is the caller's business"
        );
        let vetted = with_ambient(allowed(&["*.internal"]), Some("env-pw"), &[]);
        assert_eq!(
            password(&vetted, "postgresql://app@db1.internal/t"),
            Some(b"env-pw".to_vec())
        );
        assert!(!vetted.ignores_pgpassword() && open.ignores_pgpassword());

        // `*` and `0.0.0.0/0` let the daemon connect, but vouch for nobody.
        for rules in [&["*"][..], &["0.0.0.0/0"][..]] {
            let wide = with_ambient(allowed(rules), Some("env-pw"), &["*:*:*:*:wild-pw"]);
            assert_eq!(
                password(&wide, "postgresql://app@203.0.113.9/t"),
                None,
                "{rules:?}"
            );
            assert!(wide.ignores_pgpassword(), "{rules:?}");
        }
        // hostaddr sends the socket elsewhere than the name a .pgpass line vouches for.
        let named = with_ambient(AllowedHosts::any(), None, &["db1:5432:*:app:line-pw"]);
        assert_eq!(
            password(&named, "host=db1 hostaddr=203.0.113.5 user=app"),
            None
        );
        let vetted_addr = with_ambient(allowed(&["db1", "203.0.113.0/24"]), Some("env-pw"), &[]);
        assert_eq!(
            password(&vetted_addr, "host=db1 hostaddr=203.0.113.5 user=app"),
            None
        );
        // Unvouched, a line for any port (localhost:*) is no line for this listener.
        let any_port = with_ambient(AllowedHosts::any(), None, &["localhost:*:*:app:lh-pw"]);
        assert_eq!(
            password(&any_port, "postgresql://app@127.0.0.1:6543/t"),
            None
        );
    }

    #[test]
    fn pgpass_lines() {
        let line = parse_pgpass_line("*:*:*:app:p\\:w").expect("line");
        assert_eq!(line.password, "p:w");
        assert!(line.matches(&["db1", "5432", "t1", "app"]));
        assert!(!line.matches(&["db1", "5432", "t1", "other"]));
        assert!(parse_pgpass_line("garbage").is_none());
    }
}
