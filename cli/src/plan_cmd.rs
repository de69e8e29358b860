//! `flotilla plan` (a dry run: what each tenant would get, read from its own log) and
//! `flotilla tenant log` (one tenant's execution log). Both only read.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use flotilla::api::v1;
use serde_json::json;

use crate::client::{self, Failure};
use crate::exit::Exit;
use crate::output::{Output, print_json, print_table};
use crate::render;
use crate::request::{AllowArgs, PlaceholderArgs, WaveTargetArgs, load_bundle};

/// `flotilla plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The bundle directory.
    #[arg(long, value_name = "DIR")]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub placeholders: PlaceholderArgs,
    #[command(flatten)]
    pub targets: WaveTargetArgs,
    /// Plan as a wave with --allow-drift would.
    #[arg(long)]
    pub allow_drift: bool,
    /// Plan as a wave with --allow-out-of-order would.
    #[arg(long)]
    pub allow_out_of_order: bool,
    /// Plan as a wave with --baseline-version V would.
    #[arg(long, value_name = "V", conflicts_with = "adopt")]
    pub baseline_version: Option<String>,
    /// Plan as a wave with --adopt TOOL[=SCHEMA.TABLE] would: per tenant, what would be
    /// adopted from the previous tool's history, applied, or refused and why.
    #[arg(long, value_name = "TOOL[=SCHEMA.TABLE]")]
    pub adopt: Option<String>,
    #[command(flatten)]
    pub allow: AllowArgs,
    /// Plan as a wave with --undo-to V would: per tenant, the undo scripts that would
    /// run, newest first, or why the undo is refused.
    #[arg(long, value_name = "V", conflicts_with_all = ["baseline_version", "adopt"])]
    pub undo_to: Option<String>,
}

/// Runs a plan; exits 1 when some tenant could not be planned or would fail (drift,
/// out-of-order, unreachable), so CI can gate a rollout on it.
pub async fn plan(
    args: PlanArgs,
    target: &client::Target,
    output: Output,
) -> Result<Exit, Failure> {
    let bundle = load_bundle(&args.bundle, &args.placeholders)?;
    let targets = args.targets.for_plan()?;
    let mut client = client::connect(target).await?;
    let plans = client
        .plan(v1::PlanRequest {
            bundle: Some(bundle),
            targets: Some(targets),
            allow_drift: args.allow_drift,
            allow_out_of_order: args.allow_out_of_order,
            baseline_version: args.baseline_version.clone().unwrap_or_default(),
            adopt: args.adopt.clone().unwrap_or_default(),
            allow: args.allow.allow.clone(),
            undo_to: args.undo_to.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let without_undo = plans.versions_without_undo;
    let (plans, findings) = (plans.tenants, plans.findings);
    let unwaived = findings.iter().filter(|f| !f.waived).count();
    // Problems block (a wave would fail the tenant); notes do not.
    let blocked = plans.iter().filter(|p| !p.problems.is_empty()).count();
    let kind = |s: &v1::PlannedStep| {
        v1::PlanAction::try_from(s.kind).unwrap_or(v1::PlanAction::Unspecified)
    };
    let action = |s: &v1::PlannedStep| flotilla::api::convert::plan_action_name(kind(s));
    let is_baseline = |s: &&v1::PlannedStep| kind(s) == v1::PlanAction::Baseline;
    let problem_kind = |p: &v1::PlanProblem| {
        v1::PlanProblemKind::try_from(p.kind)
            .unwrap_or(v1::PlanProblemKind::Unspecified)
            .as_str_name()
            .trim_start_matches("PLAN_PROBLEM_KIND_")
            .to_ascii_lowercase()
    };
    // Baselined scripts can be hundreds: one phrase per tenant, then what runs.
    let steps_text = |p: &v1::TenantPlan| {
        let baselined: Vec<&v1::PlannedStep> = p.steps.iter().filter(is_baseline).collect();
        let mut parts = Vec::new();
        if let (Some(first), Some(last)) = (baselined.first(), baselined.last()) {
            let name = |s: &v1::PlannedStep| {
                if s.version.is_empty() {
                    s.script.clone()
                } else {
                    format!("V{}", s.version)
                }
            };
            parts.push(if baselined.len() == 1 {
                format!("baseline {}", name(first))
            } else {
                format!(
                    "baseline {} ({} .. {})",
                    baselined.len(),
                    name(first),
                    name(last)
                )
            });
        }
        parts.extend(
            p.steps
                .iter()
                .filter(|s| !is_baseline(s))
                .map(|s| format!("{} ({})", s.script, action(s))),
        );
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(", ")
        }
    };
    match output {
        Output::Json => print_json(&json!({
            "tenants": plans.iter().map(|p| json!({
                "tenant_id": p.tenant_id,
                "steps": p.steps.iter().map(|s| json!({
                    "script": s.script,
                    "version": (!s.version.is_empty()).then_some(&s.version),
                    "action": action(s),
                })).collect::<Vec<_>>(),
                "problems": p.problem_details.iter().map(|d| json!({
                    "kind": problem_kind(d),
                    "message": d.message,
                })).collect::<Vec<_>>(),
                "notes": p.notes,
                "touched": p.touched.iter().map(|t| json!({
                    "table": t.table,
                    "rules": t.rules,
                    "bytes": t.bytes,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "safety": findings.iter().map(crate::render::safety_json).collect::<Vec<_>>(),
            "versions_without_undo": without_undo,
        })),
        Output::Table => {
            print_table(
                &["TENANT", "STEPS", "PROBLEMS", "NOTES"],
                &plans
                    .iter()
                    .map(|p| {
                        vec![
                            p.tenant_id.clone(),
                            steps_text(p),
                            p.problems.join("; "),
                            p.notes
                                .iter()
                                .cloned()
                                .chain(p.touched.iter().map(|t| {
                                    format!(
                                        "touches {} ({}): {}",
                                        t.table,
                                        t.bytes
                                            .map(|b| format!("{:.1} MB", b as f64 / 1e6))
                                            .unwrap_or_else(|| "not there".into()),
                                        t.rules.join(", ")
                                    )
                                }))
                                .collect::<Vec<_>>()
                                .join("; "),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
            let up_to_date = plans
                .iter()
                .filter(|p| p.steps.is_empty() && p.problems.is_empty())
                .count();
            let baselining = plans
                .iter()
                .filter(|p| p.problems.is_empty() && p.steps.iter().any(|s| is_baseline(&s)))
                .count();
            println!(
                "{} tenants: {} up to date, {} with steps ({} baselining first), {} blocked",
                plans.len(),
                up_to_date,
                plans.iter().filter(|p| !p.steps.is_empty()).count(),
                baselining,
                blocked
            );
            if !without_undo.is_empty() {
                println!(
                    "versions without an undo script (U<version>__…): {}",
                    without_undo.join(", ")
                );
            }
            for f in &findings {
                eprintln!("{}", crate::render::safety_line(f));
            }
            if unwaived > 0 {
                eprintln!(
                    "{unwaived} safety finding(s) not waived: a wave would not start (--allow RULE, or -- flotilla:allow RULE reason)"
                );
            }
        }
    }
    Ok(if blocked > 0 || unwaived > 0 {
        Exit::WaveFailed
    } else {
        Exit::Ok
    })
}

/// `flotilla tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// A tenant's flotilla.execution_log, oldest first.
    Log(LogArgs),
}

/// Which tenant: a DSN, or a tenant of a wave.
#[derive(Debug, Args)]
#[group(id = "which", required = true, multiple = true)]
pub struct LogArgs {
    /// The tenant's connection string (read by the daemon).
    #[arg(long, conflicts_with_all = ["wave", "tenant"])]
    pub dsn: Option<String>,
    /// A wave the tenant is part of (with --tenant).
    #[arg(long, requires = "tenant")]
    pub wave: Option<String>,
    /// The tenant id within --wave.
    #[arg(long, requires = "wave")]
    pub tenant: Option<String>,
}

/// Runs a tenant command.
pub async fn tenant(
    cmd: TenantCommand,
    target: &client::Target,
    output: Output,
) -> Result<Exit, Failure> {
    let TenantCommand::Log(args) = cmd;
    let mut client = client::connect(target).await?;
    let rows = client
        .get_tenant_log(v1::GetTenantLogRequest {
            tenant_dsn: args.dsn.unwrap_or_default(),
            wave_id: args.wave.unwrap_or_default(),
            tenant_id: args.tenant.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .rows;
    match output {
        Output::Json => print_json(&json!({
            "rows": rows.iter().map(|r| json!({
                "id": r.id,
                "version": (!r.version.is_empty()).then_some(&r.version),
                "script": r.script,
                "kind": r.kind,
                "checksum": r.checksum,
                "bundle_id": r.bundle_id,
                "wave_id": r.wave_id,
                "status": r.status,
                "applied_at": render::time(r.applied_at.as_ref()),
                "applied_by": r.applied_by,
                "xact_id": (!r.xact_id.is_empty()).then_some(&r.xact_id),
                "duration_ms": r.duration_ms,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => print_table(
            &[
                "ID",
                "VERSION",
                "SCRIPT",
                "STATUS",
                "APPLIED AT",
                "BY",
                "MS",
                "WAVE",
            ],
            &rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.version.clone(),
                        r.script.clone(),
                        r.status.clone(),
                        render::time(r.applied_at.as_ref()).unwrap_or_default(),
                        r.applied_by.clone(),
                        r.duration_ms.to_string(),
                        r.wave_id.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    }
    Ok(Exit::Ok)
}
