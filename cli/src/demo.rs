//! `flotilla demo`: the first thing a newcomer runs. A throwaway PostgreSQL with a fleet
//! of tenant databases, a daemon on a temporary data dir, the example bundle rolled out
//! with the progress bar, one pause and resume on the way, a summary and a look at one
//! tenant's execution log; then everything is removed. It drives the daemon exactly as
//! an operator would, through the same client and the same rendering.

use std::io::IsTerminal as _;
use std::time::Duration;

use clap::Args;
use flotilla::api::v1;
use flotilla_testkit::{Cluster, Daemon};

use crate::client::{self, Failure};
use crate::exit::Exit;
use crate::output::{Output, print_json};
use crate::progress;
use crate::render;

/// The example bundle, embedded so the demo runs from any directory.
const BUNDLE: &[(&str, &str)] = &[
    (
        "V1__create_accounts.sql",
        include_str!("../../examples/saas-bundle/V1__create_accounts.sql"),
    ),
    (
        "V2__add_plan_to_accounts.sql",
        include_str!("../../examples/saas-bundle/V2__add_plan_to_accounts.sql"),
    ),
    (
        "V3__index_accounts_email.sql",
        include_str!("../../examples/saas-bundle/V3__index_accounts_email.sql"),
    ),
    (
        "R__account_summary_view.sql",
        include_str!("../../examples/saas-bundle/R__account_summary_view.sql"),
    ),
];

/// `flotilla demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tenant databases to create.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub tenants: u32,
    /// Clean up at once instead of waiting for Enter (the default when stdin is not a
    /// terminal).
    #[arg(long)]
    pub no_wait: bool,
}

fn step(output: Output, text: &str) {
    // Narration goes to stderr in JSON mode so stdout stays one JSON document.
    match output {
        Output::Table => println!("==> {text}"),
        Output::Json => eprintln!("==> {text}"),
    }
}

fn failure(e: anyhow::Error) -> Failure {
    Failure::new(Exit::Internal, format!("{e:#}"))
}

/// Runs the demo.
pub async fn run(args: DemoArgs, output: Output) -> Result<Exit, Failure> {
    if flotilla_testkit::pg_bindir().is_err() {
        return Err(Failure::new(
            Exit::Unavailable,
            "flotilla demo needs the PostgreSQL server binaries (initdb, pg_ctl, postgres): install them \
             with `sudo apt-get install postgresql` (Debian/Ubuntu), `sudo dnf install postgresql-server` \
             (Fedora) or `brew install postgresql` (macOS), or set FLOTILLA_PG_BINDIR to their directory.",
        ));
    }
    let work = tempfile::Builder::new()
        .prefix("flotilla-demo-")
        .tempdir()
        .map_err(|e| Failure::new(Exit::Internal, format!("create a temp dir: {e}")))?;

    step(
        output,
        &format!(
            "starting a throwaway PostgreSQL with {} tenant databases",
            args.tenants
        ),
    );
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?
        .map_err(failure)?;
    let tenants = cluster
        .create_tenants("tenant_", args.tenants as usize, "")
        .await
        .map_err(failure)?;

    step(output, "starting flotillad on a temporary data dir");
    let mut daemon = Daemon::start(&work.path().join("data"), &[]).map_err(failure)?;

    let bundle_dir = work.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir)
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
    for (name, sql) in BUNDLE {
        std::fs::write(bundle_dir.join(name), sql)
            .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
    }
    let bundle = crate::request::load_bundle(&bundle_dir, &Default::default())?;

    let target = client::Target {
        server: daemon.url(),
        token: None,
        ca_cert: None,
    };
    let mut client = client::connect(&target).await?;
    step(
        output,
        &format!(
            "rolling {} scripts out to every database named tenant_% (discovered on the server), 8 at a time",
            BUNDLE.len()
        ),
    );
    let wave_id = client
        .start_wave(v1::StartWaveRequest {
            bundle: Some(bundle),
            targets: Some(v1::start_wave_request::Targets::Discover(
                v1::DiscoverTargets {
                    server_dsn: cluster.url("postgres"),
                    db_pattern: "tenant_%".into(),
                },
            )),
            policy: Some(v1::Policy {
                concurrency: 8,
                // Slow enough to watch, and to pause in the middle.
                rate: 40.0,
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .wave_id;

    let controller = tokio::spawn(pause_and_resume(client.clone(), wave_id.clone()));
    let wave = progress::follow(&mut client, &wave_id, output, true).await?;
    match controller.await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => step(output, "the wave finished before the demo could pause it"),
        Ok(Err(e)) => step(output, &format!("pause/resume: {}", e.message())),
        Err(e) => step(output, &format!("pause/resume task: {e}")),
    }

    let first = tenants.first().cloned().unwrap_or_default();
    match output {
        Output::Json => print_json(&render::wave_json(&wave)),
        Output::Table => {
            render::print_wave(&wave);
            println!();
            println!("the execution log of {first}, the source of truth for what it has:");
            let rows = client
                .get_tenant_log(v1::GetTenantLogRequest {
                    wave_id: wave_id.clone(),
                    tenant_id: first.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .rows;
            for r in rows {
                println!(
                    "  {:>2}  {:<4} {:<32} {:<8} {} ms",
                    r.id, r.version, r.script, r.status, r.duration_ms
                );
            }
            println!();
            println!("look for yourself:");
            println!(
                "  psql '{}' -c 'TABLE flotilla.execution_log'",
                cluster.url(&first)
            );
        }
    }
    if !args.no_wait && std::io::stdin().is_terminal() {
        println!();
        println!("press Enter to stop the demo and remove everything");
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)
        })
        .await;
    }
    step(
        output,
        "cleaning up: stopping flotillad and PostgreSQL, removing their files",
    );
    let _ = daemon.terminate(Duration::from_secs(15));
    drop(cluster);
    drop(work);
    Ok(progress::exit_for(&wave))
}

/// Pauses once about a third of the way in, waits for the tenants in flight to finish,
/// holds a moment so the paused state is visible, and resumes. `false` when the wave
/// finished first.
async fn pause_and_resume(
    mut client: client::Client,
    wave_id: String,
) -> Result<bool, tonic::Status> {
    let get = |c: &mut client::Client| {
        let mut c = c.clone();
        let wave_id = wave_id.clone();
        async move {
            c.get_wave(v1::GetWaveRequest { wave_id })
                .await
                .map(|r| r.into_inner())
        }
    };
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let wave = get(&mut client).await?;
        let c = wave.tenants.unwrap_or_default();
        if (c.succeeded + c.failed + c.cancelled) * 10 >= c.total * 3 {
            break;
        }
        if v1::WaveState::try_from(wave.state) != Ok(v1::WaveState::Running) && c.total > 0 {
            return Ok(false);
        }
    }
    let action = |reason: &str| v1::WaveActionRequest {
        wave_id: wave_id.clone(),
        reason: reason.to_string(),
        ..Default::default()
    };
    if let Err(s) = client
        .pause_wave(action("demo: a pause in the middle of a wave"))
        .await
    {
        return if s.code() == tonic::Code::FailedPrecondition {
            Ok(false)
        } else {
            Err(s)
        };
    }
    // In-flight tenants finish their bundle; nothing new starts.
    loop {
        let wave = get(&mut client).await?;
        if wave.tenants.map(|c| c.running).unwrap_or(0) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    client.resume_wave(action("demo: carry on")).await?;
    Ok(true)
}
