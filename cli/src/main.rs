//! `flotilla`: the command line for Flotilla.
//!
//! Thin on purpose: argument parsing, rendering and exit codes. It uses the library's
//! `bundle` module for the offline commands and, for the daemon, only the generated gRPC
//! client; it never reaches into daemon internals.

mod bundle_cmd;
mod client;
mod demo;
mod exit;
mod fleet_cmd;
mod output;
mod plan_cmd;
mod progress;
mod render;
mod request;
mod wave_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::output::Output;

/// Roll a PostgreSQL schema change out across a fleet of tenant databases.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, propagate_version = true)]
struct Cli {
    /// The daemon's gRPC address.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// Bearer token for the daemon.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify an `https://` server with, instead of the
    /// system's roots.
    #[arg(long, global = true, env = "FLOTILLA_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// How results are printed.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Try Flotilla on a throwaway local PostgreSQL with 200 tenant databases.
    Demo(demo::DemoArgs),
    /// Start, follow, inspect and steer waves.
    #[command(subcommand)]
    Wave(wave_cmd::WaveCommand),
    /// Dry run: what each tenant would get, read from its own execution log.
    Plan(Box<plan_cmd::PlanArgs>),
    /// Register named fleets and take their census.
    #[command(subcommand)]
    Fleet(fleet_cmd::FleetCommand),
    /// Look at one tenant.
    #[command(subcommand)]
    Tenant(plan_cmd::TenantCommand),
    /// Work with a bundle directory, offline (no daemon needed).
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let target = client::Target {
        server: cli.server,
        token: cli.token,
        ca_cert: cli.ca_cert,
    };
    let result = match cli.command {
        Command::Bundle(cmd) => Ok(bundle_cmd::run(cmd, cli.output)),
        Command::Wave(cmd) => wave_cmd::run(cmd, &target, cli.output).await,
        Command::Fleet(cmd) => fleet_cmd::run(cmd, &target, cli.output).await,
        Command::Plan(args) => plan_cmd::plan(*args, &target, cli.output).await,
        Command::Tenant(cmd) => plan_cmd::tenant(cmd, &target, cli.output).await,
        Command::Demo(args) => demo::run(args, cli.output).await,
    };
    let exit = result.unwrap_or_else(|failure| {
        eprintln!("error: {}", failure.message);
        failure.exit
    });
    exit.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "flotilla", "--token", "t", "bundle", "lint", "x", "--output", "json",
        ])
        .expect("parses");
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert_eq!(cli.server, "http://127.0.0.1:50051");
        assert_eq!(cli.output, Output::Json);
    }
}
