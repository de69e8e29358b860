//! The planner: a pure function from a bundle and a tenant's execution log to the steps
//! that tenant needs. No I/O, no clock: every rule of PRODUCT.md §5.4 is decided here
//! and unit-tested without a database.
//!
//! Rules: a versioned script not `applied` is pending; one whose applied checksum differs
//! is drift (an error unless allowed); a pending version older than the newest applied one
//! is out of order (an error unless allowed); a `started` row is an interrupted
//! non-transactional run to resume at the statement it recorded; a repeatable is pending
//! when its latest applied checksum differs or it never ran; versions the bundle does not
//! know mean the tenant is ahead, which is reported but not fatal.

use std::collections::HashMap;

use crate::bundle::{Bundle, ScriptKind, Version};

/// What a log row says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStatus {
    /// The script finished.
    Applied,
    /// A non-transactional script began and did not finish.
    Started,
    /// Recorded as done without running (baseline, adoption): counts as applied.
    Baselined,
    /// Rolled back by its undo script: as if never applied.
    Undone,
    /// Not run: its precondition was not true (`on-fail=skip`); asked again next time.
    Skipped,
}

impl LogStatus {
    /// Applied, or recorded as if it were.
    pub fn counts_as_applied(self) -> bool {
        matches!(self, LogStatus::Applied | LogStatus::Baselined)
    }
}

/// One row of `flotilla.execution_log`, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub id: i64,
    /// Canonical version, `None` for a repeatable.
    pub version: Option<String>,
    pub script: String,
    /// `versioned` or `repeatable`.
    pub kind: String,
    pub checksum: String,
    pub status: LogStatus,
    /// For `started` rows: how many statements finished.
    pub statements_done: Option<i32>,
}

/// What to do about an applied script whose checksum changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftPolicy {
    /// Fail the tenant, naming both checksums.
    #[default]
    Fail,
    /// Leave the applied script alone and go on.
    Allow,
}

/// What to do about a missing version older than the newest applied one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderPolicy {
    /// Fail the tenant.
    #[default]
    Strict,
    /// Apply the missing version anyway.
    AllowOutOfOrder,
}

/// The wave's planning rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanOptions {
    pub drift: DriftPolicy,
    pub order: OrderPolicy,
}

/// How a step runs its script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAction {
    /// Never applied: run it.
    Apply,
    /// A repeatable whose checksum changed: run it again.
    Reapply,
    /// An interrupted non-transactional run: continue at `from_statement` (0-based,
    /// counting executable statements), updating log row `log_id`.
    Resume { log_id: i64, from_statement: usize },
    /// A repeatable whose run was interrupted (log row `log_id` stays `started`) and
    /// that has changed since: run the new version from the start, first dropping any
    /// index its `CREATE INDEX CONCURRENTLY` statements find left `INVALID`.
    Supersede { log_id: i64 },
}

/// One script to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Index into [`Bundle::scripts`].
    pub script: usize,
    pub action: StepAction,
}

/// What a tenant needs, and what is worth telling about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Not errors: versions the bundle does not know, drift that was allowed.
    pub notes: Vec<String>,
    /// Scripts (indexes into [`Bundle::scripts`]) of versions whose log row says
    /// `skipped` or `undone`: that row goes when the version is recorded again (one
    /// row per version).
    pub replaced: Vec<usize>,
}

/// Why a tenant cannot be migrated as it is. All permanent: a person must look.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "drift: {script} (version {version}) was applied with checksum {applied_checksum}, \
         the bundle has {bundle_checksum}; restore the original script or start the wave \
         with drift allowed"
    )]
    Drift {
        script: String,
        version: String,
        applied_checksum: String,
        bundle_checksum: String,
    },
    #[error(
        "out of order: {script} (version {version}) is not applied but version {newest} is; \
         start the wave with out-of-order allowed to apply it anyway"
    )]
    OutOfOrder {
        script: String,
        version: String,
        newest: String,
    },
    #[error(
        "{script} was interrupted (execution_log row {log_id} is 'started', checksum \
         {logged_checksum}) and the bundle now has checksum {bundle_checksum}; finish or undo \
         the partial run by hand, then delete that row"
    )]
    InterruptedScriptChanged {
        script: String,
        log_id: i64,
        logged_checksum: String,
        bundle_checksum: String,
    },
}

/// Why a tenant cannot be undone as asked. All permanent: nothing ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndoError {
    #[error(
        "undo: version {version} ({script}) is applied and the bundle has no undo script \
         for it (U{version}__…sql); nothing was undone"
    )]
    Missing { version: String, script: String },
    #[error(
        "undo: {script} is no-transaction; an undo runs each script in a transaction with \
         its log row, so it cannot undo version {version}; nothing was undone"
    )]
    NotTransactional { version: String, script: String },
    #[error(
        "undo: {script} (version {version}) was interrupted (its log row is 'started'); \
         finish or repair it first; nothing was undone"
    )]
    Interrupted { version: String, script: String },
}

/// The undo of every version above `target` (every version, for `None`) that the
/// tenant's log holds applied or baselined, newest first, each by its undo script: the
/// steps run the bundle's `U…` scripts, whose log rows mark the version `undone`. A
/// version without an undo script (or one the bundle does not know), an interrupted
/// one, or a `no-transaction` undo script refuses the whole undo before anything runs.
/// Pure, as [`plan`].
pub fn plan_undo(
    bundle: &Bundle,
    log: &[LogRow],
    target: Option<&Version>,
) -> Result<Plan, UndoError> {
    let mut latest: HashMap<Version, &LogRow> = HashMap::new();
    for row in log.iter().filter(|r| r.kind == "versioned") {
        let Some(v) = row
            .version
            .as_deref()
            .and_then(|v| v.parse::<Version>().ok())
        else {
            continue;
        };
        let slot = latest.entry(v).or_insert(row);
        if row.id > slot.id {
            *slot = row;
        }
    }
    let mut above: Vec<(Version, &LogRow)> = latest
        .into_iter()
        .filter(|(v, _)| target.is_none_or(|t| v > t))
        .collect();
    above.sort_by(|a, b| b.0.cmp(&a.0));
    let mut out = Plan::default();
    for (version, row) in above {
        match row.status {
            LogStatus::Started => {
                return Err(UndoError::Interrupted {
                    version: version.to_string(),
                    script: row.script.clone(),
                });
            }
            s if !s.counts_as_applied() => continue,
            _ => {}
        }
        let Some(index) = bundle
            .scripts()
            .iter()
            .position(|s| s.kind.undo_version() == Some(&version))
        else {
            return Err(UndoError::Missing {
                version: version.to_string(),
                script: row.script.clone(),
            });
        };
        let script = &bundle.scripts()[index];
        if script.directives.transaction == crate::bundle::TransactionUse::NoTransaction {
            return Err(UndoError::NotTransactional {
                version: version.to_string(),
                script: script.name.clone(),
            });
        }
        out.steps.push(Step {
            script: index,
            action: StepAction::Apply,
        });
    }
    Ok(out)
}

/// Plans `bundle` against `log`.
pub fn plan(bundle: &Bundle, log: &[LogRow], options: PlanOptions) -> Result<Plan, PlanError> {
    let mut out = Plan::default();
    let mut versioned: HashMap<&str, &LogRow> = HashMap::new();
    let mut newest_applied: Option<(Version, &str)> = None;
    for row in log.iter().filter(|r| r.kind == "versioned") {
        let Some(v) = row.version.as_deref() else {
            continue;
        };
        versioned.insert(v, row);
        if row.status.counts_as_applied()
            && let Ok(parsed) = v.parse::<Version>()
            && newest_applied.as_ref().is_none_or(|(n, _)| parsed > *n)
        {
            newest_applied = Some((parsed, v));
        }
    }
    let mut latest_repeatable: HashMap<&str, &LogRow> = HashMap::new();
    for row in log.iter().filter(|r| r.kind == "repeatable") {
        let slot = latest_repeatable.entry(row.script.as_str()).or_insert(row);
        if row.id > slot.id {
            *slot = row;
        }
    }

    // A tenant with no history runs the newest baseline script (Flyway's `B…`) instead
    // of every version up to its own; a tenant with any history never runs one.
    let baseline = if log.is_empty() {
        bundle
            .scripts()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.kind.baseline_version().map(|v| (i, v)))
            .max_by(|a, b| a.1.cmp(b.1))
    } else {
        None
    };
    for (index, script) in bundle.scripts().iter().enumerate() {
        let interrupted = |row: &LogRow| -> Result<StepAction, PlanError> {
            if row.checksum != script.checksum {
                return Err(PlanError::InterruptedScriptChanged {
                    script: script.name.clone(),
                    log_id: row.id,
                    logged_checksum: row.checksum.clone(),
                    bundle_checksum: script.checksum.clone(),
                });
            }
            Ok(StepAction::Resume {
                log_id: row.id,
                from_statement: usize::try_from(row.statements_done.unwrap_or(0).max(0))
                    .unwrap_or(0),
            })
        };
        let action = match &script.kind {
            ScriptKind::Baseline(_) => {
                (baseline.map(|(i, _)| i) == Some(index)).then_some(StepAction::Apply)
            }
            ScriptKind::Versioned(version) if baseline.is_some_and(|(_, b)| version <= b) => None,
            ScriptKind::Versioned(version) => {
                let key = version.to_string();
                match versioned.get(key.as_str()) {
                    Some(row) if row.status.counts_as_applied() => {
                        if row.checksum != script.checksum {
                            let drift = PlanError::Drift {
                                script: script.name.clone(),
                                version: key.clone(),
                                applied_checksum: row.checksum.clone(),
                                bundle_checksum: script.checksum.clone(),
                            };
                            match options.drift {
                                DriftPolicy::Fail => return Err(drift),
                                DriftPolicy::Allow => out.notes.push(format!("allowed {drift}")),
                            }
                        }
                        None
                    }
                    Some(row) if row.status == LogStatus::Started => Some(interrupted(row)?),
                    // Skipped by its precondition when its turn came: asked again, in
                    // order as it was then (not out of order).
                    Some(row) if row.status == LogStatus::Skipped => {
                        out.replaced.push(index);
                        Some(StepAction::Apply)
                    }
                    // Never applied, or undone since.
                    Some(_) | None => {
                        if versioned
                            .get(key.as_str())
                            .is_some_and(|r| r.status == LogStatus::Undone)
                        {
                            out.replaced.push(index);
                        }
                        if let Some((newest, newest_text)) = &newest_applied
                            && version < newest
                            && options.order == OrderPolicy::Strict
                        {
                            return Err(PlanError::OutOfOrder {
                                script: script.name.clone(),
                                version: key,
                                newest: newest_text.to_string(),
                            });
                        }
                        Some(StepAction::Apply)
                    }
                }
            }
            ScriptKind::Repeatable => match latest_repeatable.get(script.name.as_str()) {
                // A repeatable is meant to change: the new version replaces the one that
                // was cut short (whose row stays `started`, older than the new one).
                Some(row)
                    if row.status == LogStatus::Started && row.checksum != script.checksum =>
                {
                    out.notes.push(format!(
                        "{} was interrupted at an older version (execution_log row {}); running the new version",
                        script.name, row.id
                    ));
                    Some(StepAction::Supersede { log_id: row.id })
                }
                Some(row) if row.status == LogStatus::Started => Some(interrupted(row)?),
                Some(row) if row.status == LogStatus::Skipped => Some(StepAction::Reapply),
                Some(row) if row.checksum == script.checksum => None,
                Some(_) => Some(StepAction::Reapply),
                None => Some(StepAction::Apply),
            },
            // Run around the steps, never as one.
            ScriptKind::Callback(_) => None,
            // Run only by an undo plan ([`plan_undo`]).
            ScriptKind::Undo(_) => None,
        };
        if let Some(action) = action {
            out.steps.push(Step {
                script: index,
                action,
            });
        }
    }

    let known: std::collections::HashSet<String> = bundle
        .scripts()
        .iter()
        .filter_map(|s| s.version().map(|v| v.to_string()))
        .collect();
    let mut ahead: Vec<&LogRow> = versioned
        .values()
        .filter(|r| r.version.as_ref().is_some_and(|v| !known.contains(v)))
        .copied()
        .collect();
    ahead.sort_by_key(|r| r.id);
    for row in ahead {
        out.notes.push(format!(
            "the tenant has version {} ({}) which this bundle does not know",
            row.version.as_deref().unwrap_or("?"),
            row.script
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &str)]) -> Bundle {
        Bundle::from_sources(files, "test").expect("valid bundle")
    }

    fn three() -> Bundle {
        bundle(&[
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("V3__c.sql", "select 3;"),
            ("R__view.sql", "select 'v';"),
        ])
    }

    fn applied(b: &Bundle, index: usize, id: i64) -> LogRow {
        let s = &b.scripts()[index];
        LogRow {
            id,
            version: s.version().map(|v| v.to_string()),
            script: s.name.clone(),
            kind: s.kind.as_str().to_string(),
            checksum: s.checksum.clone(),
            status: LogStatus::Applied,
            statements_done: None,
        }
    }

    fn actions(p: &Plan) -> Vec<(usize, StepAction)> {
        p.steps
            .iter()
            .map(|s| (s.script, s.action.clone()))
            .collect()
    }

    /// A version skipped by its precondition is asked again, not out of order,
    /// and its row is named for replacement.
    #[test]
    fn a_skipped_version_is_pending_in_its_place() {
        let b = three();
        let mut skipped = applied(&b, 1, 2);
        skipped.status = LogStatus::Skipped;
        let log = [
            applied(&b, 0, 1),
            skipped,
            applied(&b, 2, 3),
            applied(&b, 3, 4),
        ];
        let p = plan(&b, &log, PlanOptions::default()).expect("not out of order");
        assert_eq!(actions(&p), [(1, StepAction::Apply)]);
        assert_eq!(p.replaced, [1]);
        // A repeatable skipped at the same checksum runs again.
        let mut view = applied(&b, 3, 5);
        view.status = LogStatus::Skipped;
        let log = [
            applied(&b, 0, 1),
            applied(&b, 1, 2),
            applied(&b, 2, 3),
            view,
        ];
        let p = plan(&b, &log, PlanOptions::default()).expect("plan");
        assert_eq!(actions(&p), [(3, StepAction::Reapply)]);
    }

    #[test]
    fn fresh_tenant_gets_everything_in_order() {
        let b = three();
        let p = plan(&b, &[], PlanOptions::default()).expect("plan");
        assert_eq!(
            actions(&p),
            [
                (0, StepAction::Apply),
                (1, StepAction::Apply),
                (2, StepAction::Apply),
                (3, StepAction::Apply)
            ]
        );
        assert!(p.notes.is_empty());
    }

    #[test]
    fn fully_applied_tenant_is_up_to_date() {
        let b = three();
        let log: Vec<_> = (0..4).map(|i| applied(&b, i, i as i64 + 1)).collect();
        let p = plan(&b, &log, PlanOptions::default()).expect("plan");
        assert!(p.steps.is_empty());
    }

    #[test]
    fn partially_applied_tenant_gets_the_rest() {
        let b = three();
        let p = plan(&b, &[applied(&b, 0, 1)], PlanOptions::default()).expect("plan");
        assert_eq!(
            actions(&p),
            [
                (1, StepAction::Apply),
                (2, StepAction::Apply),
                (3, StepAction::Apply)
            ]
        );
    }

    #[test]
    fn drift_fails_with_both_checksums_unless_allowed() {
        let b = three();
        let mut row = applied(&b, 1, 2);
        row.checksum = "0".repeat(64);
        let log = vec![applied(&b, 0, 1), row];
        let err = plan(&b, &log, PlanOptions::default()).expect_err("drift");
        let text = err.to_string();
        assert!(
            text.contains(&"0".repeat(64)) && text.contains(&b.scripts()[1].checksum),
            "{text}"
        );
        assert!(matches!(err, PlanError::Drift { ref version, .. } if version == "2"));

        let allowed = PlanOptions {
            drift: DriftPolicy::Allow,
            ..Default::default()
        };
        let p = plan(&b, &log, allowed).expect("plan");
        assert_eq!(
            actions(&p),
            [(2, StepAction::Apply), (3, StepAction::Apply)]
        );
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn out_of_order_fails_unless_allowed() {
        let b = three();
        let log = vec![applied(&b, 0, 1), applied(&b, 2, 2)];
        let err = plan(&b, &log, PlanOptions::default()).expect_err("out of order");
        assert_eq!(
            err,
            PlanError::OutOfOrder {
                script: "V2__b.sql".into(),
                version: "2".into(),
                newest: "3".into()
            }
        );
        let allowed = PlanOptions {
            order: OrderPolicy::AllowOutOfOrder,
            ..Default::default()
        };
        let p = plan(&b, &log, allowed).expect("plan");
        assert_eq!(
            actions(&p),
            [(1, StepAction::Apply), (3, StepAction::Apply)]
        );
    }

    #[test]
    fn started_row_is_resumed_at_its_statement() {
        let b = three();
        let mut row = applied(&b, 1, 2);
        row.status = LogStatus::Started;
        row.statements_done = Some(3);
        let p = plan(&b, &[applied(&b, 0, 1), row], PlanOptions::default()).expect("plan");
        assert_eq!(
            actions(&p)[0],
            (
                1,
                StepAction::Resume {
                    log_id: 2,
                    from_statement: 3
                }
            )
        );
    }

    #[test]
    fn started_row_of_a_changed_script_is_an_error() {
        let b = three();
        let mut row = applied(&b, 0, 1);
        row.status = LogStatus::Started;
        row.checksum = "f".repeat(64);
        let err = plan(&b, &[row], PlanOptions::default()).expect_err("changed");
        assert!(matches!(
            err,
            PlanError::InterruptedScriptChanged { log_id: 1, .. }
        ));
    }

    /// Issue 11, case 8: an interrupted repeatable that changed used to fail the tenant
    /// for ever ("interrupted script changed"); a repeatable is meant to change.
    #[test]
    fn an_interrupted_repeatable_that_changed_is_superseded() {
        let b = three();
        let mut row = applied(&b, 3, 4);
        row.status = LogStatus::Started;
        row.checksum = "e".repeat(64);
        let log: Vec<_> = (0..3)
            .map(|i| applied(&b, i, i as i64 + 1))
            .chain([row])
            .collect();
        let p = plan(&b, &log, PlanOptions::default()).expect("plan");
        assert_eq!(actions(&p), [(3, StepAction::Supersede { log_id: 4 })]);
        assert!(
            p.notes[0].contains("interrupted at an older version"),
            "{p:?}"
        );
        // Once the new version is applied, the old `started` row is history.
        let mut done = log.clone();
        done.push(applied(&b, 3, 5));
        assert!(
            plan(&b, &done, PlanOptions::default())
                .expect("plan")
                .steps
                .is_empty()
        );
    }

    #[test]
    fn changed_repeatable_is_reapplied_by_its_latest_row() {
        let b = three();
        let mut old = applied(&b, 3, 4);
        old.checksum = "a".repeat(64);
        let mut log: Vec<_> = (0..3).map(|i| applied(&b, i, i as i64 + 1)).collect();
        log.push(old.clone());
        let p = plan(&b, &log, PlanOptions::default()).expect("plan");
        assert_eq!(actions(&p), [(3, StepAction::Reapply)]);
        // A later row with the current checksum wins over the old one.
        log.push(applied(&b, 3, 5));
        assert!(
            plan(&b, &log, PlanOptions::default())
                .expect("plan")
                .steps
                .is_empty()
        );
        // …and an older current row does not hide a newer changed one.
        let mut newer = old;
        newer.id = 6;
        log.push(newer);
        assert_eq!(
            actions(&plan(&b, &log, PlanOptions::default()).expect("plan")),
            [(3, StepAction::Reapply)]
        );
    }

    #[test]
    fn tenant_ahead_of_the_bundle_is_noted_not_failed() {
        let b = three();
        let mut log: Vec<_> = (0..4).map(|i| applied(&b, i, i as i64 + 1)).collect();
        log.push(LogRow {
            id: 9,
            version: Some("4".into()),
            script: "V4__future.sql".into(),
            kind: "versioned".into(),
            checksum: "c".repeat(64),
            status: LogStatus::Applied,
            statements_done: None,
        });
        let p = plan(&b, &log, PlanOptions::default()).expect("plan");
        assert!(p.steps.is_empty());
        assert_eq!(
            p.notes,
            ["the tenant has version 4 (V4__future.sql) which this bundle does not know"]
        );
    }

    #[test]
    fn versions_compare_numerically_for_order() {
        let b = bundle(&[("V9__a.sql", "select 1;"), ("V10__b.sql", "select 1;")]);
        // "10" < "9" as text; the planner must compare numbers.
        let p = plan(&b, &[applied(&b, 0, 1)], PlanOptions::default()).expect("plan");
        assert_eq!(actions(&p), [(1, StepAction::Apply)]);
    }

    /// Issue 12: a baseline script (Flyway's `B…`) runs only on a tenant with no history,
    /// instead of the versions it covers; any history and it is never planned.
    #[test]
    fn a_baseline_script_replaces_the_versions_it_covers_on_a_new_tenant_only() {
        let b = bundle(&[
            ("B2__base.sql", "select 'b';"),
            ("B1__older_base.sql", "select 'b1';"),
            ("V1__a.sql", "select 1;"),
            ("V2__b.sql", "select 2;"),
            ("V3__c.sql", "select 3;"),
        ]);
        let names = |p: &Plan| -> Vec<String> {
            p.steps
                .iter()
                .map(|s| b.scripts()[s.script].name.clone())
                .collect()
        };
        let fresh = plan(&b, &[], PlanOptions::default()).expect("plan");
        assert_eq!(names(&fresh), ["B2__base.sql", "V3__c.sql"]);
        let v1 = b
            .scripts()
            .iter()
            .position(|s| s.name == "V1__a.sql")
            .expect("v1");
        let with_history = plan(&b, &[applied(&b, v1, 1)], PlanOptions::default()).expect("plan");
        assert_eq!(names(&with_history), ["V2__b.sql", "V3__c.sql"]);
    }
}
