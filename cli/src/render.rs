//! How daemon answers look: state names, one JSON shape per message, and the human
//! summaries. The JSON shapes are the CLI's contract with scripts (README documents
//! them); they are built here and nowhere else.

use flotilla::api::v1;
use serde_json::{Value, json};

/// `RUNNING` for `WAVE_STATE_RUNNING`.
pub fn wave_state(raw: i32) -> &'static str {
    v1::WaveState::try_from(raw)
        .map(|s| s.as_str_name().trim_start_matches("WAVE_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// `FAILED` for `TENANT_STATE_FAILED`.
pub fn tenant_state(raw: i32) -> &'static str {
    v1::TenantState::try_from(raw)
        .map(|s| s.as_str_name().trim_start_matches("TENANT_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// RFC 3339, seconds.
pub fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    let t = t?;
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(t.seconds.max(0) as u64)
        + std::time::Duration::from_nanos(t.nanos.max(0) as u64);
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// The counts object every wave JSON carries.
pub fn counts_json(c: Option<&v1::TenantCounts>) -> Value {
    let c = c.cloned().unwrap_or_default();
    json!({
        "total": c.total,
        "pending": c.pending,
        "running": c.running,
        "succeeded": c.succeeded,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "baselined_tenants": c.baselined_tenants,
        "baselined_scripts": c.baselined_scripts,
    })
}

fn policy_json(p: &v1::Policy) -> Value {
    use v1::policy::MaxFailures as M;
    json!({
        "concurrency": p.concurrency,
        "per_host": (p.per_host > 0).then_some(p.per_host),
        "rate": (p.rate > 0.0).then_some(p.rate),
        "canary_count": (p.canary_count > 0).then_some(p.canary_count),
        "canary_label": (!p.canary_label.is_empty()).then_some(&p.canary_label),
        "pause_after_canary": p.pause_after_canary,
        "stages": p.stages,
        "approve_between_stages": p.approve_between_stages,
        "max_failures": match p.max_failures {
            Some(M::MaxFailuresCount(n)) => json!({"count": n}),
            Some(M::MaxFailuresRatio(r)) => json!({"ratio": r}),
            Some(M::MaxFailuresUnlimited(_)) => json!("unlimited"),
            None => Value::Null,
        },
        "retries": p.retries,
        "transaction": v1::TransactionMode::try_from(p.transaction)
            .map(|m| m.as_str_name().trim_start_matches("TRANSACTION_MODE_").to_ascii_lowercase().replace('_', "-"))
            .unwrap_or_default(),
        "lock_timeout_ms": p.lock_timeout_ms,
        "statement_timeout_ms": p.statement_timeout_ms,
        "allow_drift": p.allow_drift,
        "allow_out_of_order": p.allow_out_of_order,
        "baseline_version": (!p.baseline_version.is_empty()).then_some(&p.baseline_version),
        "adopt": (!p.adopt.is_empty()).then_some(&p.adopt),
        "allow": p.allow,
    })
}

/// `wave status --output json`: one object with `wave_id`, `state` and `tenants`.
pub fn wave_json(w: &v1::Wave) -> Value {
    json!({
        "wave_id": w.wave_id,
        "state": wave_state(w.state),
        "reason": (!w.reason.is_empty()).then_some(&w.reason),
        "bundle_id": w.bundle_id,
        "created_at": time(w.created_at.as_ref()),
        "tenants": counts_json(w.tenants.as_ref()),
        "policy": w.policy.as_ref().map(policy_json),
        "placeholders": w.placeholders.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "waivers": w.waivers,
        "held": w.held,
        "fleet": (!w.fleet.is_empty()).then_some(&w.fleet),
        "stages": w.stages.iter().map(|s| json!({
            "name": s.name,
            "open": s.open,
            "tenants": counts_json(s.tenants.as_ref()),
            "approval": s.approval.as_ref().map(|a| json!({
                "by": a.by,
                "at": time(a.at.as_ref()),
                "succeeded": a.succeeded,
                "failed": a.failed,
                "cancelled": a.cancelled,
                "accepted_failures": a.accepted_failures,
            })),
        })).collect::<Vec<_>>(),
        "history": w.history.iter().map(|h| json!({
            "from": (h.from != 0).then(|| wave_state(h.from)),
            "to": wave_state(h.to),
            "actor": h.actor,
            "reason": h.reason,
            "at": time(h.at.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

/// One tenant run.
pub fn tenant_json(t: &v1::TenantRun) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "host": t.host,
        "state": tenant_state(t.state),
        "attempts": t.attempts,
        "labels": t.labels,
        "started_at": time(t.started_at.as_ref()),
        "finished_at": time(t.finished_at.as_ref()),
        "rows_changed": t.rows_changed,
        "error": t.last_error.as_ref().map(|e| json!({
            "script": (!e.script.is_empty()).then_some(&e.script),
            "sqlstate": (!e.sqlstate.is_empty()).then_some(&e.sqlstate),
            "message": e.message,
            "retryable": e.retryable,
        })),
    })
}

/// A failure in one line: `V2__x.sql: 42P07 relation "t" already exists`.
pub fn failure_line(e: &v1::TenantFailure) -> String {
    let mut out = String::new();
    if !e.script.is_empty() {
        out.push_str(&e.script);
        out.push_str(": ");
    }
    if !e.sqlstate.is_empty() {
        out.push_str(&e.sqlstate);
        out.push(' ');
    }
    out.push_str(e.message.lines().next().unwrap_or_default());
    out
}

/// A safety finding as JSON (`plan`, `bundle lint`).
pub fn safety_json(f: &v1::SafetyFinding) -> Value {
    json!({
        "rule": f.rule,
        "script": f.script,
        "line": (f.line > 0).then_some(f.line),
        "table": (!f.table.is_empty()).then_some(&f.table),
        "why": f.why,
        "fix": f.fix,
        "waived": f.waived,
        "waiver": (!f.waiver.is_empty()).then_some(&f.waiver),
    })
}

/// `error: V2__x.sql:3: rule (why); fix` or `waived: … (reason)`.
pub fn safety_line(f: &v1::SafetyFinding) -> String {
    let place = if f.line > 0 {
        format!("{}:{}", f.script, f.line)
    } else {
        f.script.clone()
    };
    if f.waived {
        format!("waived: {place}: {} ({})", f.rule, f.waiver)
    } else {
        format!(
            "error: {place}: {} ({}); safe pattern: {}",
            f.rule, f.why, f.fix
        )
    }
}

/// `40/100 done (38 succeeded, 2 failed, 0 cancelled) · 4 running · 56 pending`
pub fn counts_line(c: Option<&v1::TenantCounts>) -> String {
    let c = c.cloned().unwrap_or_default();
    format!(
        "{}/{} done ({} succeeded, {} failed, {} cancelled) · {} running · {} pending",
        c.succeeded + c.failed + c.cancelled,
        c.total,
        c.succeeded,
        c.failed,
        c.cancelled,
        c.running,
        c.pending
    )
}

/// `wave status` for people.
pub fn print_wave(w: &v1::Wave) {
    println!("wave     {}", w.wave_id);
    let reason = if w.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", w.reason)
    };
    println!("state    {}{reason}", wave_state(w.state));
    println!("bundle   {}", w.bundle_id);
    if !w.fleet.is_empty() {
        println!("fleet    {}", w.fleet);
    }
    if let Some(created) = time(w.created_at.as_ref()) {
        println!("created  {created}");
    }
    println!("tenants  {}", counts_line(w.tenants.as_ref()));
    if let Some(c) = w.tenants.as_ref().filter(|c| c.baselined_tenants > 0) {
        println!(
            "baseline {} tenants recorded {} scripts as baselined (not run)",
            c.baselined_tenants, c.baselined_scripts
        );
    }
    if let Some(p) = w.policy.as_ref() {
        if !p.adopt.is_empty() {
            println!("adopt    {}", p.adopt);
        }
        if !p.baseline_version.is_empty() {
            println!("baseline up to version {}", p.baseline_version);
        }
    }
    for (i, s) in w.stages.iter().enumerate() {
        let approval = match &s.approval {
            Some(a) => format!(
                " · approved by {} at {}{}",
                a.by,
                time(a.at.as_ref()).unwrap_or_default(),
                if a.accepted_failures {
                    " (failures accepted)"
                } else {
                    ""
                }
            ),
            None if !s.open => " · not open".to_string(),
            None => String::new(),
        };
        println!(
            "stage {}  {}: {}{approval}",
            i + 1,
            printable(&s.name),
            counts_line(s.tenants.as_ref())
        );
    }
    for waiver in &w.waivers {
        println!("waived   {waiver}");
    }
    for hold in &w.held {
        println!("held     {hold}");
    }
    let placeholders: std::collections::BTreeMap<_, _> = w.placeholders.iter().collect();
    for (name, value) in placeholders {
        println!("placeholder {name}={value}");
    }
    if !w.history.is_empty() {
        println!("history");
        for h in &w.history {
            let why = if h.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", h.reason)
            };
            println!(
                "  {}  {} -> {}  by {}{why}",
                time(h.at.as_ref()).unwrap_or_default(),
                if h.from == 0 {
                    "(new)"
                } else {
                    wave_state(h.from)
                },
                wave_state(h.to),
                h.actor
            );
        }
    }
}

/// `schema_drift` for `CENSUS_STATE_SCHEMA_DRIFT`.
pub fn census_state(raw: i32) -> &'static str {
    flotilla::api::convert::census_state_from_proto(raw).map_or("unknown", |s| s.as_str())
}

/// Text from a tenant (ids, server messages, object names) as a terminal may show it:
/// control characters escaped, so a table name cannot move the cursor or clear the
/// screen.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

fn states_json(states: &[v1::StateCount]) -> Value {
    let map: serde_json::Map<String, Value> = states
        .iter()
        .map(|s| (census_state(s.state).to_string(), json!(s.tenants)))
        .collect();
    Value::Object(map)
}

/// One tenant of a census.
pub fn census_tenant_json(t: &v1::TenantCensus) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "host": t.host,
        "state": census_state(t.state),
        "version": (!t.version.is_empty()).then_some(&t.version),
        "applied": t.applied,
        "baselined": t.baselined,
        "started": t.started,
        "drifted": t.drifted,
        "ahead": t.ahead,
        "pending": t.pending,
        "pending_count": t.pending_count,
        "schema_drift": t.schema_drift,
        "error": (!t.error.is_empty()).then(|| json!({
            "message": t.error,
            "sqlstate": (!t.sqlstate.is_empty()).then_some(&t.sqlstate),
        })),
        "fingerprint": (!t.fingerprint.is_empty()).then_some(&t.fingerprint),
        "has_log": t.has_log,
        "notes": t.notes,
    })
}

fn change_name(raw: i32) -> &'static str {
    match v1::SchemaChangeKind::try_from(raw) {
        Ok(v1::SchemaChangeKind::Added) => "added",
        Ok(v1::SchemaChangeKind::Removed) => "removed",
        Ok(v1::SchemaChangeKind::Changed) => "changed",
        _ => "unknown",
    }
}

/// Whether a census tenant needs a person (being behind or current does not).
fn is_outlier(t: &v1::TenantCensus) -> bool {
    flotilla::api::convert::census_state_from_proto(t.state).is_none_or(|s| s.is_outlier())
}

/// `fleet census --output json` (README "Where does my fleet stand?" documents it).
pub fn census_json(c: &v1::CensusReport) -> Value {
    let total: u64 = c.histogram.iter().map(|h| h.tenants).sum();
    json!({
        "fleet": c.fleet,
        "bundle_id": (!c.bundle_id.is_empty()).then_some(&c.bundle_id),
        "fingerprinted": c.fingerprinted,
        "trigger": c.trigger,
        "started_at": time(c.started_at.as_ref()),
        "finished_at": time(c.finished_at.as_ref()),
        "tenants": total,
        "histogram": c.histogram.iter().map(|h| json!({
            "version": h.version,
            "tenants": h.tenants,
        })).collect::<Vec<_>>(),
        "states": states_json(&c.states),
        "hosts": c.hosts.iter().map(|h| json!({
            "host": h.host,
            "tenants": h.tenants,
            "states": states_json(&h.states),
        })).collect::<Vec<_>>(),
        "outliers": c.tenants.iter().filter(|t| is_outlier(t)).map(census_tenant_json).collect::<Vec<_>>(),
        "fingerprints": c.fingerprints.iter().map(|g| json!({
            "version": g.version,
            "fingerprint": g.fingerprint,
            "tenants": g.tenants,
            "reference": g.reference,
            "tied": g.tied,
            "changes": g.changes.iter().map(|ch| json!({
                "change": change_name(ch.kind),
                "object": ch.object,
                "reference": ch.reference,
                "found": ch.found,
            })).collect::<Vec<_>>(),
            "more_changes": g.more_changes,
            "tenant_ids": g.tenant_ids,
        })).collect::<Vec<_>>(),
        "tenant_results": c.tenants.iter().map(census_tenant_json).collect::<Vec<_>>(),
    })
}

/// The version histogram as bars, one line per bucket.
pub fn print_histogram(histogram: &[v1::VersionCount]) {
    const WIDTH: u64 = 40;
    let max = histogram
        .iter()
        .map(|h| h.tenants)
        .max()
        .unwrap_or(0)
        .max(1);
    let label_width = histogram
        .iter()
        .map(|h| h.version.chars().count())
        .max()
        .unwrap_or(0)
        .max(7);
    for h in histogram {
        // A bucket with tenants shows at least one block: one tenant must be visible.
        let blocks = (h.tenants * WIDTH).div_ceil(max) as usize;
        println!(
            "  {:<label_width$}  {:<width$}  {}",
            h.version,
            "█".repeat(blocks),
            h.tenants,
            width = WIDTH as usize
        );
    }
}

fn states_line(states: &[v1::StateCount]) -> String {
    states
        .iter()
        .filter(|s| s.tenants > 0)
        .map(|s| format!("{} {}", census_state(s.state), s.tenants))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Why a census tenant is an outlier, in a few words.
fn outlier_reason(t: &v1::TenantCensus) -> String {
    let list = |v: &[String]| printable(&v.join(", ")).into_owned();
    match v1::CensusState::try_from(t.state) {
        Ok(v1::CensusState::Unreachable) => {
            if t.sqlstate.is_empty() {
                printable(&t.error).into_owned()
            } else {
                format!("{} (SQLSTATE {})", printable(&t.error), t.sqlstate)
            }
        }
        Ok(v1::CensusState::Interrupted) => format!("started, not finished: {}", list(&t.started)),
        Ok(v1::CensusState::Drifted) => {
            format!("checksum differs from the bundle: {}", list(&t.drifted))
        }
        Ok(v1::CensusState::Ahead) => {
            format!("versions the bundle does not know: {}", list(&t.ahead))
        }
        Ok(v1::CensusState::Unmanaged) => "no flotilla.execution_log".into(),
        Ok(v1::CensusState::SchemaDrift) => format!(
            "schema differs from most tenants at its version (fingerprint {})",
            t.fingerprint
        ),
        Ok(v1::CensusState::Behind) if t.pending_count > 0 => {
            format!("{} scripts to run", t.pending_count)
        }
        _ => String::new(),
    }
}

/// `1 tenant`, `2 tenants`.
fn tenants(n: u64) -> String {
    format!("{n} tenant{}", if n == 1 { "" } else { "s" })
}

/// `fleet census` for people: the histogram as bars, counts, then the outliers.
pub fn print_census(c: &v1::CensusReport, all: bool) {
    let total: u64 = c.histogram.iter().map(|h| h.tenants).sum();
    let took = match (&c.started_at, &c.finished_at) {
        (Some(a), Some(b)) => {
            let ms = (b.seconds - a.seconds) * 1000 + i64::from(b.nanos - a.nanos) / 1_000_000;
            format!(" in {:.1} s", ms.max(0) as f64 / 1000.0)
        }
        _ => String::new(),
    };
    println!(
        "fleet {}: {total} tenants, census at {}{took} ({})",
        c.fleet,
        time(c.started_at.as_ref()).unwrap_or_default(),
        c.trigger
    );
    if !c.bundle_id.is_empty() {
        println!("compared with bundle {}", c.bundle_id);
    }
    println!("versions");
    print_histogram(&c.histogram);
    println!("states   {}", states_line(&c.states));
    if c.hosts.len() > 1 {
        println!("hosts");
        for h in &c.hosts {
            println!(
                "  {}  {}  ({})",
                printable(&h.host),
                tenants(h.tenants),
                states_line(&h.states)
            );
        }
    }
    let listed: Vec<&v1::TenantCensus> =
        c.tenants.iter().filter(|t| all || is_outlier(t)).collect();
    if listed.is_empty() {
        println!("no outliers");
    } else {
        println!(
            "{} ({})",
            if all { "tenants" } else { "outliers" },
            listed.len()
        );
        // As printed (escapes widen an id); one very long id must not push every
        // line off the screen.
        let id_width = listed
            .iter()
            .map(|t| printable(&t.tenant_id).chars().count())
            .max()
            .unwrap_or(0)
            .min(40);
        for t in listed {
            println!(
                "  {:<id_width$}  {:<12}  {:<8}  {}",
                printable(&t.tenant_id),
                census_state(t.state),
                if t.version.is_empty() {
                    "-".into()
                } else {
                    printable(&t.version)
                },
                outlier_reason(t)
            );
            for note in &t.notes {
                println!("  {:<id_width$}  {}", "", printable(note));
            }
        }
    }
    for g in c.fingerprints.iter().filter(|g| !g.reference) {
        let reference = c
            .fingerprints
            .iter()
            .find(|r| r.reference && r.version == g.version);
        println!(
            "schema at version {}: {} ({}) {} from {}{}",
            g.version,
            tenants(g.tenants),
            printable(&g.tenant_ids.join(", ")),
            if g.tenants == 1 { "differs" } else { "differ" },
            reference.map_or("the others".to_string(), |r| format!(
                "the {} with fingerprint {}",
                r.tenants, r.fingerprint
            )),
            if g.tied {
                " (tied: no clear majority)"
            } else {
                ""
            },
        );
        for ch in &g.changes {
            let change = flotilla::api::convert::schema_change_from_proto(ch);
            println!("    {}", printable(&change.to_string()));
        }
        if g.more_changes > 0 {
            println!("    … and {} more", g.more_changes);
        }
    }
}
