//! What `wave start` and `plan` send: the bundle read from its directory, the targets
//! (CSV rows read here, or a catalog/discovery spec the daemon resolves) and the policy
//! flags. Local input is checked here, before anything reaches the daemon, so a typo in
//! a CSV names its line without a round trip.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use flotilla::api::convert::Targets;
use flotilla::api::v1;
use flotilla::bundle::Bundle;
use flotilla::target::TargetSource;

use crate::client::Failure;
use crate::exit::Exit;

/// Where the tenants come from: exactly one source.
#[derive(Debug, Args)]
#[group(id = "target_source", required = true, multiple = true)]
pub struct TargetArgs {
    /// A CSV file `tenant_id,dsn[,label…]` with a header row.
    #[arg(long, value_name = "FILE.csv", conflicts_with_all = ["catalog_dsn", "discover"])]
    pub targets: Option<PathBuf>,
    /// A catalog database to query for `tenant_id, dsn[, labels…]` (needs --catalog-query).
    #[arg(
        long,
        value_name = "DSN",
        requires = "catalog_query",
        conflicts_with = "discover"
    )]
    pub catalog_dsn: Option<String>,
    /// The catalog query.
    #[arg(long, value_name = "SQL", requires = "catalog_dsn")]
    pub catalog_query: Option<String>,
    /// A server whose databases matching --db-pattern are the tenants.
    #[arg(long, value_name = "URL", requires = "db_pattern")]
    pub discover: Option<String>,
    /// A `LIKE` pattern for --discover, e.g. `tenant_%`.
    #[arg(long, value_name = "PATTERN", requires = "discover")]
    pub db_pattern: Option<String>,
}

/// Where a wave's or a plan's tenants come from: a source, or a registered fleet.
#[derive(Debug, Args)]
pub struct WaveTargetArgs {
    #[command(flatten)]
    pub source: TargetArgs,
    /// A registered fleet (`flotilla fleet list`); catalog and discovery fleets
    /// resolve again now.
    #[arg(
        long,
        value_name = "NAME",
        group = "target_source",
        conflicts_with_all = ["targets", "catalog_dsn", "discover"]
    )]
    pub fleet: Option<String>,
}

impl WaveTargetArgs {
    /// The targets of a `StartWaveRequest`.
    pub fn for_start(&self) -> Result<v1::start_wave_request::Targets, Failure> {
        self.load()?.into_start().map_err(invalid)
    }

    /// The targets of a `PlanRequest`.
    pub fn for_plan(&self) -> Result<v1::plan_request::Targets, Failure> {
        self.load()?.into_plan().map_err(invalid)
    }

    fn load(&self) -> Result<Targets, Failure> {
        match &self.fleet {
            Some(name) => {
                flotilla::fleet::check_name(name)
                    .map_err(|e| Failure::new(Exit::Usage, format!("--fleet: {e}")))?;
                Ok(Targets::Fleet(name.clone()))
            }
            None => self.source.load(),
        }
    }
}

impl TargetArgs {
    /// The source of an `AddFleetRequest`.
    pub fn for_fleet(&self) -> Result<v1::add_fleet_request::Source, Failure> {
        self.load()?.into_fleet_source().map_err(invalid)
    }

    /// Reads and checks a CSV locally (line numbers without a round trip); passes
    /// catalog and discovery specs on, for the daemon to resolve.
    fn load(&self) -> Result<Targets, Failure> {
        if let Some(path) = &self.targets {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Failure::new(
                    Exit::InvalidInput,
                    format!("--targets {}: {e}", path.display()),
                )
            })?;
            let tenants = flotilla::target::parse_csv(&text, &path.display().to_string())
                .map_err(|e| Failure::new(Exit::InvalidInput, e.to_string()))?;
            return Ok(Targets::List(flotilla::api::convert::tenants_to_proto(
                tenants,
            )));
        }
        if let (Some(dsn), Some(query)) = (&self.catalog_dsn, &self.catalog_query) {
            return Ok(Targets::Source(TargetSource::Catalog {
                dsn: dsn.clone(),
                query: query.clone(),
            }));
        }
        if let (Some(dsn), Some(pattern)) = (&self.discover, &self.db_pattern) {
            return Ok(Targets::Source(TargetSource::Discover {
                dsn: dsn.clone(),
                pattern: pattern.clone(),
            }));
        }
        Err(Failure::new(
            Exit::Usage,
            "give one target source: --targets, --catalog-dsn with --catalog-query, --discover with --db-pattern, or --fleet",
        ))
    }
}

fn invalid(e: flotilla::api::ApiError) -> Failure {
    Failure::new(Exit::InvalidInput, e.to_string())
}

/// `--order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderArg {
    Id,
    Size,
}

/// `--allow RULE`: safety-lint rules waived for the whole wave.
#[derive(Debug, Args, Clone, Default)]
pub struct AllowArgs {
    /// Waive a safety-lint rule for the whole wave (repeatable; `flotilla bundle rules`
    /// lists them), or `RULE@SCRIPT` for one script (one that already ran, whose text
    /// must not change). Prefer `-- flotilla:allow RULE reason` in a new script.
    #[arg(long = "allow", value_name = "RULE", value_parser = parse_rule)]
    pub allow: Vec<String>,
}

fn parse_rule(s: &str) -> Result<String, String> {
    if flotilla::bundle::safety::is_allow_entry(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "no such safety rule {s:?} (RULE or RULE@SCRIPT; `flotilla bundle rules` lists them)"
        ))
    }
}

/// `--placeholder NAME=VALUE`, for commands that read a bundle.
#[derive(Debug, Args, Clone, Default)]
pub struct PlaceholderArgs {
    /// A value for `${NAME}` in the scripts (repeatable); over the folder's
    /// flyway.conf `placeholders.*`. Part of the bundle id, shown in `wave status`.
    #[arg(long = "placeholder", value_name = "NAME=VALUE", value_parser = parse_placeholder)]
    pub placeholders: Vec<(String, String)>,
}

impl PlaceholderArgs {
    /// The bundle options these flags give (a name given twice: the last wins, as a
    /// later flag overrides an earlier one).
    pub fn options(&self) -> flotilla::bundle::BundleOptions {
        flotilla::bundle::BundleOptions {
            placeholders: self.placeholders.iter().cloned().collect(),
            ..Default::default()
        }
    }
}

fn parse_placeholder(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    flotilla::bundle::flyway::check_wave_placeholder(name, value)?;
    Ok((name.to_string(), value.to_string()))
}

/// Reads and validates a bundle directory into its wire form.
pub fn load_bundle(dir: &Path, placeholders: &PlaceholderArgs) -> Result<v1::Bundle, Failure> {
    let bundle = Bundle::load_dir_with(dir, &placeholders.options())
        .map_err(|e| Failure::new(Exit::InvalidInput, e.to_string()))?;
    // Advice (config keys Flotilla does not honour, undo scripts left out) is said
    // before anything starts, never swallowed.
    for warning in bundle.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(flotilla::api::convert::bundle_to_proto(&bundle))
}

/// Which tenants go first: a count or a `key=value` label.
#[derive(Debug, Clone, PartialEq)]
pub enum CanaryArg {
    Count(u32),
    Label(String),
}

fn parse_canary(s: &str) -> Result<CanaryArg, String> {
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            return Err("a canary of 0 tenants is no canary; leave --canary out".into());
        }
        return Ok(CanaryArg::Count(n));
    }
    match s.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() => Ok(CanaryArg::Label(s.to_string())),
        _ => Err("expected a number of tenants or a label key=value".into()),
    }
}

fn parse_max_failures(s: &str) -> Result<v1::policy::MaxFailures, String> {
    use v1::policy::MaxFailures as M;
    let s = s.trim();
    if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("none") {
        return Ok(M::MaxFailuresUnlimited(true));
    }
    let ratio = |r: f64| {
        if (0.0..=1.0).contains(&r) {
            Ok(M::MaxFailuresRatio(r))
        } else {
            Err(format!("a ratio must be within 0..1 (0%..100%), got {s}"))
        }
    };
    if let Some(pct) = s.strip_suffix('%') {
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage"))?;
        return ratio(p / 100.0);
    }
    if let Ok(n) = s.parse::<u32>() {
        return Ok(M::MaxFailuresCount(n));
    }
    match s.parse::<f64>() {
        Ok(r) => ratio(r),
        Err(_) => {
            Err("expected a count (5), a percentage (10%), a ratio (0.1) or `unlimited`".into())
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 5s, 1500ms, 2m, 0)"))
}

/// How the transactional scripts of a tenant are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransactionArg {
    PerScript,
    PerTenant,
}

/// The policy flags of `wave start`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Tenants in flight for the whole wave.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Tenants in flight on one database server (default: only --concurrency limits).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub per_host: Option<u32>,
    /// Tenant starts per second, 0.001..100000 (default: unlimited).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Canary: the first N tenants, or those with label key=value, go first; the rest
    /// starts only when every canary succeeded.
    #[arg(long, value_parser = parse_canary)]
    pub canary: Option<CanaryArg>,
    /// Pause the wave after the canary succeeded, for an operator to resume.
    #[arg(long)]
    pub pause_after_canary: bool,
    /// A stage, in order (repeat the flag): `canary=N` (only first, the canary), a count
    /// N (the next N tenants), a label match key=value, or `rest`. Without --canary the
    /// first stage is the canary. Tenants no stage takes form a last stage.
    #[arg(long = "stage", value_name = "SPEC")]
    pub stages: Vec<String>,
    /// Pause at the end of every stage until `flotilla wave approve` opens the next.
    #[arg(long)]
    pub approve_between_stages: bool,
    /// Undo instead of apply: on each tenant, run the undo script (U<version>__…) of
    /// every applied version above V, newest first, marking each `undone`.
    #[arg(long, value_name = "V")]
    pub undo_to: Option<String>,
    /// Each canary applies, undoes what it applied, and applies it again before the
    /// next stage starts: the undo scripts run on real tenants first.
    #[arg(long)]
    pub rehearse_undo: bool,
    /// Failed tenants before the wave pauses itself: a count (5), a percentage (10%), a
    /// ratio (0.1) or `unlimited` [default: 10%].
    #[arg(long, value_parser = parse_max_failures)]
    pub max_failures: Option<v1::policy::MaxFailures>,
    /// Attempts after the first, for retryable errors only [default: 3].
    #[arg(long)]
    pub retries: Option<u32>,
    /// per-script: each script commits with its log row; per-tenant: one transaction
    /// for all transactional scripts of a tenant.
    #[arg(long, value_enum, default_value_t = TransactionArg::PerScript)]
    pub transaction: TransactionArg,
    /// `lock_timeout` of a tenant's first attempt, 1ms..2147483647ms; each retry
    /// doubles it up to --lock-timeout-max [default: 500ms].
    #[arg(long, value_parser = parse_duration)]
    pub lock_timeout: Option<Duration>,
    /// The ceiling retries escalate the lock timeout to [default: the larger of
    /// --lock-timeout and 5s].
    #[arg(long, value_parser = parse_duration)]
    pub lock_timeout_max: Option<Duration>,
    /// How long an application query may wait on a Flotilla session before the
    /// watchdog cancels Flotilla's statement and retries the tenant later [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub max_block: Option<Duration>,
    /// Health gate: hold a server while a standby's replay lags more than this; 0 turns
    /// it off [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub max_replication_lag: Option<Duration>,
    /// Health gate: hold a server while more than this share of max_connections is in
    /// use, within (0, 1]; 1 turns it off [default: 0.9].
    #[arg(long, value_name = "SHARE")]
    pub max_connections_share: Option<f64>,
    /// Health gate: read-only SQL returning one boolean, run on each server; false (or
    /// an error) holds the server's tenants.
    #[arg(long, value_name = "SQL")]
    pub gate_sql: Option<String>,
    /// A server held longer than this pauses the wave [default: 10m].
    #[arg(long, value_parser = parse_duration)]
    pub max_hold: Option<Duration>,
    /// In which order tenants start after the canaries: `id`, or `size` (smallest
    /// database first, the canaries too) [default: id].
    #[arg(long, value_enum)]
    pub order: Option<OrderArg>,
    /// `statement_timeout` for every script, 1ms..2147483647ms or 0 [default: 0, none].
    #[arg(long, value_parser = parse_duration)]
    pub statement_timeout: Option<Duration>,
    /// How long a tenant session may sit idle inside a transaction before the server
    /// ends it, 1ms..2147483647ms [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// How long a tenant may stay busy (locked by another runner) before it fails
    /// [default: 10m].
    #[arg(long, value_parser = parse_duration)]
    pub busy_timeout: Option<Duration>,
    /// On a tenant whose execution log is empty, record every version up to V as
    /// `baselined` (done, not run) before applying the rest.
    #[arg(long, value_name = "V", conflicts_with = "adopt")]
    pub baseline_version: Option<String>,
    /// On a tenant whose execution log is empty, record as `baselined` what the previous
    /// tool's history says ran: flyway, dbmate, golang-migrate or sqlx, optionally
    /// `=schema.table`; a failed, dirty or changed history fails the tenant.
    #[arg(long, value_name = "TOOL[=SCHEMA.TABLE]")]
    pub adopt: Option<String>,
    #[command(flatten)]
    pub allow: AllowArgs,
    /// Apply even when an applied script's checksum changed.
    #[arg(long)]
    pub allow_drift: bool,
    /// Apply a missing older version after newer ones.
    #[arg(long)]
    pub allow_out_of_order: bool,
}

impl PolicyArgs {
    /// The wire policy, checked by the same [`flotilla::policy::Policy::validate`] the
    /// daemon runs, so a bad flag is refused (exit 2) before anything is sent.
    pub fn to_proto(&self) -> Result<v1::Policy, Failure> {
        use flotilla::policy::{ZeroTimeout, timeout_ms};
        let usage = |m: String| Failure::new(Exit::Usage, m);
        let ms = |flag: &str, d: Option<Duration>, zero| {
            d.map(|d| timeout_ms(flag, d, zero).map_err(|e| usage(e.to_string())))
                .transpose()
        };
        // `--stage canary=5 --stage region=eu` is `--canary 5 --stage region=eu`.
        let mut stages: Vec<String> = self.stages.clone();
        let canary = match (&self.canary, stages.first()) {
            (Some(_), _) if stages.iter().any(|s| s.trim().starts_with("canary=")) => {
                return Err(usage(
                    "--stage canary=…: the canary is --canary or the first --stage, not both"
                        .into(),
                ));
            }
            (Some(c), _) => Some(c.clone()),
            (None, Some(first)) => {
                let spec = first.trim();
                let spec = spec.strip_prefix("canary=").unwrap_or(spec);
                if spec == "rest" {
                    return Err(usage(
                        "--stage rest cannot be the first stage: the first is the canary".into(),
                    ));
                }
                let canary = parse_canary(spec.strip_prefix("count=").unwrap_or(spec))
                    .map_err(|e| usage(format!("--stage {first}: {e}")))?;
                stages.remove(0);
                Some(canary)
            }
            (None, None) => None,
        };
        if self.pause_after_canary && canary.is_none() {
            return Err(usage(
                "--pause-after-canary needs a canary (--canary or --stage)".into(),
            ));
        }
        for spec in &stages {
            flotilla::policy::Stage::parse(spec)
                .map_err(|e| usage(format!("--stage {spec}: {}", e.0)))?;
        }
        let (canary_count, canary_label) = match &canary {
            None => (0, String::new()),
            Some(CanaryArg::Count(n)) => (*n, String::new()),
            Some(CanaryArg::Label(l)) => (0, l.clone()),
        };
        let policy = v1::Policy {
            concurrency: self.concurrency,
            per_host: self.per_host.unwrap_or(0),
            rate: self.rate.unwrap_or(0.0),
            canary_count,
            canary_label,
            pause_after_canary: self.pause_after_canary,
            stages,
            approve_between_stages: self.approve_between_stages,
            undo_to: self.undo_to.clone().unwrap_or_default(),
            rehearse_undo: self.rehearse_undo,
            max_failures: self.max_failures,
            retries: self.retries,
            transaction: match self.transaction {
                TransactionArg::PerScript => v1::TransactionMode::PerScript,
                TransactionArg::PerTenant => v1::TransactionMode::PerTenant,
            } as i32,
            lock_timeout_ms: ms("--lock-timeout", self.lock_timeout, ZeroTimeout::Refused)?,
            statement_timeout_ms: ms(
                "--statement-timeout",
                self.statement_timeout,
                ZeroTimeout::MeansNone,
            )?,
            allow_drift: self.allow_drift,
            allow_out_of_order: self.allow_out_of_order,
            idle_in_transaction_timeout_ms: ms(
                "--idle-in-transaction-timeout",
                self.idle_in_transaction_timeout,
                ZeroTimeout::Refused,
            )?,
            busy_timeout_ms: ms("--busy-timeout", self.busy_timeout, ZeroTimeout::Refused)?,
            baseline_version: self.baseline_version.clone().unwrap_or_default(),
            adopt: self.adopt.clone().unwrap_or_default(),
            allow: self.allow.allow.clone(),
            lock_timeout_max_ms: ms(
                "--lock-timeout-max",
                self.lock_timeout_max,
                ZeroTimeout::Refused,
            )?,
            max_block_ms: ms("--max-block", self.max_block, ZeroTimeout::Refused)?,
            max_replication_lag_ms: ms(
                "--max-replication-lag",
                self.max_replication_lag,
                ZeroTimeout::MeansNone,
            )?,
            max_connections_share: self.max_connections_share,
            gate_sql: self.gate_sql.clone().unwrap_or_default(),
            max_hold_ms: ms("--max-hold", self.max_hold, ZeroTimeout::Refused)?,
            start_order: match self.order {
                None | Some(OrderArg::Id) => v1::StartOrder::Id,
                Some(OrderArg::Size) => v1::StartOrder::Size,
            } as i32,
        };
        flotilla::api::convert::policy_from_proto(Some(policy.clone()))
            .map_err(|e| usage(format!("{e} (see `flotilla wave start --help`)")))?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::policy::MaxFailures as M;

    #[test]
    fn max_failures_forms() {
        assert_eq!(parse_max_failures("5"), Ok(M::MaxFailuresCount(5)));
        assert_eq!(parse_max_failures("10%"), Ok(M::MaxFailuresRatio(0.1)));
        assert_eq!(parse_max_failures("0.25"), Ok(M::MaxFailuresRatio(0.25)));
        assert_eq!(
            parse_max_failures("unlimited"),
            Ok(M::MaxFailuresUnlimited(true))
        );
        assert!(parse_max_failures("150%").is_err());
        assert!(parse_max_failures("lots").is_err());
    }

    #[test]
    fn canary_forms() {
        assert_eq!(parse_canary("3"), Ok(CanaryArg::Count(3)));
        assert_eq!(
            parse_canary("tier=free"),
            Ok(CanaryArg::Label("tier=free".into()))
        );
        assert!(parse_canary("0").is_err());
        assert!(parse_canary("=x").is_err());
    }

    /// `--stage` as the daemon gets it: the first stage is the canary.
    #[test]
    fn stage_forms() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            policy: PolicyArgs,
        }
        let policy = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                std::iter::once("flotilla").chain(args.iter().copied()),
            )
            .expect("flags parse");
            cli.policy.to_proto()
        };
        let p =
            policy(&["--stage", "canary=3", "--stage", "12", "--stage", "rest"]).expect("stages");
        assert_eq!(
            (p.canary_count, p.stages.clone()),
            (3, vec!["12".into(), "rest".into()])
        );
        let p = policy(&["--stage", "region=eu", "--stage", "tier=free"]).expect("labels");
        assert_eq!(p.canary_label, "region=eu");
        assert_eq!(p.stages, vec!["tier=free".to_string()]);
        let p = policy(&[
            "--canary",
            "2",
            "--stage",
            "region=eu",
            "--approve-between-stages",
        ])
        .expect("canary and a stage");
        assert_eq!((p.canary_count, p.stages.len()), (2, 1));
        assert!(p.approve_between_stages);
        for bad in [
            &["--canary", "2", "--stage", "canary=3"][..],
            &["--stage", "rest"],
            &["--stage", "1", "--stage", "0"],
            &["--stage", "1", "--stage", "=x"],
            &["--pause-after-canary"],
        ] {
            let e = policy(bad).expect_err("refused");
            assert_eq!(e.exit, Exit::Usage, "{bad:?}");
        }
    }
}
