//! `flotilla bundle inspect|lint DIR`: read a bundle directory and report on it, offline.

use std::path::PathBuf;

use clap::Subcommand;
use flotilla::bundle::{Bundle, BundleError, Problem, Script, TransactionUse, safety};
use serde_json::json;

use crate::exit::Exit;
use crate::output::{Output, print_json, print_table};
use crate::request::{AllowArgs, PlaceholderArgs};

/// `flotilla bundle …`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// List a bundle's scripts in the order they apply, with checksums and the bundle id.
    Inspect {
        /// The bundle directory.
        dir: PathBuf,
        #[command(flatten)]
        placeholders: PlaceholderArgs,
    },
    /// Check a bundle, safety rules included; exits 6 when it has errors or a safety
    /// finding that is not waived.
    Lint {
        /// The bundle directory.
        dir: PathBuf,
        #[command(flatten)]
        placeholders: PlaceholderArgs,
        #[command(flatten)]
        allow: AllowArgs,
    },
    /// The safety rules, with what each is about.
    Rules,
}

/// Runs a bundle command and says how the process should exit.
pub fn run(cmd: BundleCommand, output: Output) -> Exit {
    match cmd {
        BundleCommand::Inspect { dir, placeholders } => {
            match Bundle::load_dir_with(&dir, &placeholders.options()) {
                Ok(bundle) => {
                    inspect(&bundle, output);
                    Exit::Ok
                }
                Err(e) => report_error(&e, output),
            }
        }
        BundleCommand::Lint {
            dir,
            placeholders,
            allow,
        } => match Bundle::load_dir_with(&dir, &placeholders.options()) {
            Ok(bundle) => lint_ok(&bundle, &allow.allow, output),
            Err(e) => report_error(&e, output),
        },
        BundleCommand::Rules => {
            match output {
                Output::Json => print_json(&json!({
                    "rules": safety::RULES.iter().map(|(id, why)| json!({"rule": id, "why": why})).collect::<Vec<_>>(),
                })),
                Output::Table => print_table(
                    &["RULE", "WHY"],
                    &safety::RULES
                        .iter()
                        .map(|(id, why)| vec![id.to_string(), why.to_string()])
                        .collect::<Vec<_>>(),
                ),
            }
            Exit::Ok
        }
    }
}

fn transaction_label(script: &Script) -> &'static str {
    match script.directives.transaction {
        TransactionUse::Transactional => "transaction",
        TransactionUse::NoTransaction => "no-transaction",
    }
}

fn inspect(bundle: &Bundle, output: Output) {
    match output {
        Output::Json => print_json(&json!({
            "bundle_id": bundle.id(),
            "scripts": bundle.scripts().iter().map(|s| json!({
                "kind": s.kind.as_str(),
                "version": s.version().or(s.kind.baseline_version()).map(|v| v.to_string()),
                "name": s.name,
                "description": s.description,
                "checksum": s.checksum,
                "transaction": transaction_label(s),
                "lock_timeout_ms": s.directives.lock_timeout.map(|d| d.as_millis() as u64),
                "statement_timeout_ms": s.directives.statement_timeout.map(|d| d.as_millis() as u64),
                "statements": s.executable_statements().count(),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!("bundle {}", bundle.id());
            let rows: Vec<Vec<String>> = bundle
                .scripts()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    vec![
                        (i + 1).to_string(),
                        s.kind.as_str().to_string(),
                        s.version()
                            .or(s.kind.baseline_version())
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.name.clone(),
                        transaction_label(s).to_string(),
                        s.executable_statements().count().to_string(),
                        s.checksum.clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "#",
                    "KIND",
                    "VERSION",
                    "NAME",
                    "MODE",
                    "STATEMENTS",
                    "CHECKSUM",
                ],
                &rows,
            );
        }
    }
}

fn problem_json(p: &Problem) -> serde_json::Value {
    json!({ "file": p.file, "line": p.line, "message": p.message })
}

fn lint_ok(bundle: &Bundle, allow: &[String], output: Output) -> Exit {
    let warnings = bundle.warnings();
    let findings: Vec<_> = safety::lint(bundle)
        .iter()
        .map(|f| flotilla::api::convert::safety_finding(f, allow))
        .collect();
    let unwaived = findings.iter().filter(|f| !f.waived).count();
    match output {
        Output::Json => print_json(&json!({
            "ok": unwaived == 0,
            "bundle_id": bundle.id(),
            "errors": [],
            "warnings": warnings.iter().map(problem_json).collect::<Vec<_>>(),
            "safety": findings.iter().map(crate::render::safety_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for f in &findings {
                eprintln!("{}", crate::render::safety_line(f));
            }
            println!(
                "{}: {} scripts, bundle {}, {} warning{}, {} safety finding{} ({} waived)",
                if unwaived == 0 { "ok" } else { "unsafe" },
                bundle.scripts().len(),
                bundle.id(),
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" },
                findings.len(),
                if findings.len() == 1 { "" } else { "s" },
                findings.len() - unwaived,
            );
        }
    }
    if unwaived == 0 {
        Exit::Ok
    } else {
        Exit::InvalidInput
    }
}

fn report_error(err: &BundleError, output: Output) -> Exit {
    match output {
        Output::Json => {
            let errors: Vec<serde_json::Value> = match err {
                BundleError::Invalid(problems) => problems.iter().map(problem_json).collect(),
                other => vec![json!({ "file": null, "line": null, "message": other.to_string() })],
            };
            print_json(&json!({ "ok": false, "errors": errors, "warnings": [] }));
        }
        Output::Table => eprintln!("error: {err}"),
    }
    Exit::InvalidInput
}
