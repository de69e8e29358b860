//! `flotilla fleet …`: register named fleets and take their census.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use flotilla::api::v1;
use serde_json::json;

use crate::client::{self, Failure};
use crate::exit::Exit;
use crate::output::{Output, print_json, print_table};
use crate::render;
use crate::request::{PlaceholderArgs, TargetArgs, load_bundle};

/// `flotilla fleet …`
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Register a fleet by name (operator): listed tenants, a catalog query or a
    /// discovery pattern (the last two run again every time the fleet is used).
    Add(Box<AddArgs>),
    /// Registered fleets.
    List,
    /// One fleet.
    Show { name: String },
    /// Remove a fleet (operator); waves started from it keep their tenants.
    Remove { name: String },
    /// Where every tenant of a fleet stands: versions, drift, interrupted scripts,
    /// unreachable tenants, and (with --fingerprint) schemas that differ.
    Census(Box<CensusArgs>),
}

/// `fleet add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// 1 to 63 of `a-z 0-9 - _`.
    pub name: String,
    #[command(flatten)]
    pub targets: TargetArgs,
    /// A label every tenant of the fleet carries unless it sets its own (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Replace a fleet of the same name.
    #[arg(long)]
    pub replace: bool,
}

/// `fleet census`.
#[derive(Debug, Args)]
pub struct CensusArgs {
    pub name: String,
    /// Compare each tenant's log with this bundle: checksum drift, pending scripts,
    /// versions the bundle does not know.
    #[arg(long, value_name = "DIR", conflicts_with = "cached")]
    pub bundle: Option<PathBuf>,
    #[command(flatten)]
    pub placeholders: PlaceholderArgs,
    /// Tenants read at once (default 16, at most 64).
    #[arg(long, conflicts_with = "cached")]
    pub concurrency: Option<u32>,
    /// Tenants read at once on one server (default 8, at most 16).
    #[arg(long, conflicts_with = "cached")]
    pub per_host: Option<u32>,
    /// Also fingerprint each tenant's schema and single out those that differ from
    /// most tenants at their version.
    #[arg(long, conflicts_with = "cached")]
    pub fingerprint: bool,
    /// Show the fleet's last census (on request or scheduled) without reading tenants.
    #[arg(long)]
    pub cached: bool,
    /// List every tenant, not only the outliers.
    #[arg(long)]
    pub all: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs a fleet command.
pub async fn run(
    cmd: FleetCommand,
    target: &client::Target,
    output: Output,
) -> Result<Exit, Failure> {
    // Local input first: a bad CSV or bundle is named without contacting anyone.
    let add = match &cmd {
        FleetCommand::Add(args) => Some(args.targets.for_fleet()?),
        _ => None,
    };
    let bundle = match &cmd {
        FleetCommand::Census(args) => match &args.bundle {
            Some(dir) => Some(load_bundle(dir, &args.placeholders)?),
            None => None,
        },
        _ => None,
    };
    let mut client = client::connect(target).await?;
    match cmd {
        FleetCommand::Add(args) => {
            let fleet = client
                .add_fleet(v1::AddFleetRequest {
                    name: args.name,
                    source: add,
                    labels: args.labels.into_iter().collect(),
                    replace: args.replace,
                })
                .await?
                .into_inner();
            match output {
                Output::Json => print_json(&fleet_json(&fleet)),
                Output::Table => println!(
                    "fleet {} registered: {} ({} tenants now)",
                    fleet.name, fleet.source, fleet.tenants_when_added
                ),
            }
        }
        FleetCommand::List => {
            let fleets = client
                .list_fleets(v1::ListFleetsRequest {})
                .await?
                .into_inner()
                .fleets;
            match output {
                Output::Json => {
                    print_json(&json!(fleets.iter().map(fleet_json).collect::<Vec<_>>()))
                }
                Output::Table => print_table(
                    &["NAME", "KIND", "TENANTS", "LABELS", "SOURCE"],
                    &fleets
                        .iter()
                        .map(|f| {
                            vec![
                                f.name.clone(),
                                f.kind.clone(),
                                f.tenants_when_added.to_string(),
                                labels_text(&f.labels),
                                if f.unloadable.is_empty() {
                                    render::printable(&f.source).into_owned()
                                } else {
                                    format!("unloadable: {}", render::printable(&f.unloadable))
                                },
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        FleetCommand::Show { name } => {
            let f = client
                .get_fleet(v1::GetFleetRequest { name })
                .await?
                .into_inner();
            match output {
                Output::Json => print_json(&fleet_json(&f)),
                Output::Table => {
                    println!("fleet {} ({})", f.name, f.kind);
                    println!("  source: {}", render::printable(&f.source));
                    println!("  tenants when added: {}", f.tenants_when_added);
                    if !f.labels.is_empty() {
                        println!("  labels: {}", labels_text(&f.labels));
                    }
                    println!(
                        "  added by {} at {}",
                        f.created_by,
                        render::time(f.created_at.as_ref()).unwrap_or_default()
                    );
                }
            }
        }
        FleetCommand::Remove { name } => {
            client
                .remove_fleet(v1::RemoveFleetRequest { name: name.clone() })
                .await?;
            match output {
                Output::Json => print_json(&json!({ "removed": name })),
                Output::Table => println!("fleet {name} removed"),
            }
        }
        FleetCommand::Census(args) => {
            let report = client
                .census(v1::CensusRequest {
                    subject: Some(v1::census_request::Subject::Fleet(args.name)),
                    bundle,
                    concurrency: args.concurrency.unwrap_or(0),
                    per_host: args.per_host.unwrap_or(0),
                    fingerprint: args.fingerprint,
                    cached: args.cached,
                    histogram_only: false,
                })
                .await?
                .into_inner();
            match output {
                Output::Json => print_json(&render::census_json(&report)),
                Output::Table => render::print_census(&report, args.all),
            }
        }
    }
    Ok(Exit::Ok)
}

fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

fn fleet_json(f: &v1::Fleet) -> serde_json::Value {
    let labels: std::collections::BTreeMap<_, _> = f.labels.iter().collect();
    json!({
        "name": f.name,
        "kind": f.kind,
        "source": f.source,
        "labels": labels,
        "tenants_when_added": f.tenants_when_added,
        "created_by": f.created_by,
        "created_at": render::time(f.created_at.as_ref()),
        "unloadable": (!f.unloadable.is_empty()).then_some(&f.unloadable),
    })
}
