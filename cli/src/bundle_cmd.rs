//! `flotilla bundle inspect|lint DIR`: read a bundle directory and report on it, offline.

use std::path::PathBuf;

use clap::Subcommand;
use flotilla::bundle::{Bundle, BundleError, Problem, Script, TransactionUse};
use serde_json::json;

use crate::exit::Exit;
use crate::output::{Output, print_json, print_table};
use crate::request::PlaceholderArgs;

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
    /// Check a bundle; exits 6 when it has errors.
    Lint {
        /// The bundle directory.
        dir: PathBuf,
        #[command(flatten)]
        placeholders: PlaceholderArgs,
    },
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
        BundleCommand::Lint { dir, placeholders } => {
            match Bundle::load_dir_with(&dir, &placeholders.options()) {
                Ok(bundle) => {
                    lint_ok(&bundle, output);
                    Exit::Ok
                }
                Err(e) => report_error(&e, output),
            }
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

fn lint_ok(bundle: &Bundle, output: Output) {
    let warnings = bundle.warnings();
    match output {
        Output::Json => print_json(&json!({
            "ok": true,
            "bundle_id": bundle.id(),
            "errors": [],
            "warnings": warnings.iter().map(problem_json).collect::<Vec<_>>(),
        })),
        Output::Table => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "ok: {} scripts, bundle {}, {} warning{}",
                bundle.scripts().len(),
                bundle.id(),
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" }
            );
        }
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
