//! `flotilla`: the command line for Flotilla.
//!
//! Thin on purpose: argument parsing, rendering and exit codes. It uses the library's
//! `bundle` module for the offline commands and, for the daemon, only the generated gRPC
//! client; it never reaches into daemon internals.

mod bundle_cmd;
mod exit;
mod output;

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
    /// How results are printed.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with a bundle directory, offline (no daemon needed).
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let exit = match cli.command {
        Command::Bundle(cmd) => bundle_cmd::run(cmd, cli.output),
    };
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
