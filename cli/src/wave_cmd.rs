//! `flotilla wave …`: start, follow, inspect and steer waves on a daemon.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use flotilla::api::v1;
use serde_json::json;

use crate::client::{self, Failure};
use crate::exit::Exit;
use crate::output::{Output, print_json, print_table};
use crate::progress;
use crate::render;
use crate::request::{PlaceholderArgs, PolicyArgs, WaveTargetArgs, load_bundle};

/// `flotilla wave …`
#[derive(Debug, Subcommand)]
pub enum WaveCommand {
    /// Upload a bundle and start rolling it out; prints the wave id.
    Start(Box<StartArgs>),
    /// One wave: state, counts per tenant state, history; for a paused or finished
    /// wave also the version histogram of its tenants, read from their logs.
    Status {
        wave_id: String,
        /// Skip reading the tenants' versions (one short session per tenant).
        #[arg(long)]
        no_versions: bool,
    },
    /// Follow a wave live until it completes, fails, is cancelled or pauses.
    Watch {
        wave_id: String,
        /// Keep following while the wave is paused (until someone resumes it).
        #[arg(long)]
        through_pause: bool,
    },
    /// Stop starting tenants; tenants in flight finish their bundle.
    Pause(ActionArgs),
    /// Continue a paused wave.
    Resume {
        #[command(flatten)]
        action: ActionArgs,
        /// Go on although a canary tenant failed (instead of retrying it).
        #[arg(long)]
        accept_canary_failure: bool,
    },
    /// Open the next stage of a wave paused at the end of a stage
    /// (--approve-between-stages); the approval is recorded with your token's name.
    Approve {
        #[command(flatten)]
        action: ActionArgs,
        /// Approve although some tenants of the stage failed or were cancelled.
        #[arg(long)]
        accept_failures: bool,
    },
    /// Stop starting tenants and stop in-flight ones at their next script boundary.
    Cancel(ActionArgs),
    /// Put the failed tenants of a finished or paused wave back to pending.
    Retry(ActionArgs),
    /// Remove a finished (or quarantined) wave from the daemon for good; the tenants'
    /// execution logs keep what ran. Cancel an unfinished wave first.
    Forget { wave_id: String },
    /// Waves known to the daemon, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A wave's tenants, optionally only those in one state.
    Tenants {
        wave_id: String,
        /// pending, running, succeeded, failed or cancelled.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// A tenant state filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// `wave start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The bundle directory (read and uploaded by the CLI).
    #[arg(long, value_name = "DIR")]
    pub bundle: PathBuf,
    #[command(flatten)]
    pub placeholders: PlaceholderArgs,
    #[command(flatten)]
    pub targets: WaveTargetArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Follow the wave with a progress bar; exit non-zero unless it completes.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: keep following while the wave is paused.
    #[arg(long, requires = "wait")]
    pub through_pause: bool,
}

/// pause, resume, cancel, retry.
#[derive(Debug, Args)]
pub struct ActionArgs {
    pub wave_id: String,
    /// Recorded in the wave's history.
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// Runs a wave command.
pub async fn run(
    cmd: WaveCommand,
    target: &client::Target,
    output: Output,
) -> Result<Exit, Failure> {
    // Local input first: a bad bundle or CSV is reported without contacting anyone.
    let start = match &cmd {
        WaveCommand::Start(args) => Some((
            load_bundle(&args.bundle, &args.placeholders)?,
            args.targets.for_start()?,
            args.policy.to_proto()?,
        )),
        _ => None,
    };
    let mut client = client::connect(target).await?;
    match cmd {
        WaveCommand::Start(args) => {
            let Some((bundle, targets, policy)) = start else {
                return Err(Failure::new(Exit::Internal, "start request not built"));
            };
            let wave_id = client
                .start_wave(v1::StartWaveRequest {
                    bundle: Some(bundle),
                    targets: Some(targets),
                    policy: Some(policy),
                })
                .await?
                .into_inner()
                .wave_id;
            if !args.wait {
                match output {
                    Output::Json => print_json(&json!({ "wave_id": wave_id })),
                    Output::Table => println!("{wave_id}"),
                }
                return Ok(Exit::Ok);
            }
            if output == Output::Table {
                println!("{wave_id}");
            }
            finish(&mut client, &wave_id, output, args.through_pause).await
        }
        WaveCommand::Status {
            wave_id,
            no_versions,
        } => {
            let wave = client
                .get_wave(v1::GetWaveRequest { wave_id })
                .await?
                .into_inner();
            let settled = matches!(
                v1::WaveState::try_from(wave.state),
                Ok(v1::WaveState::Paused
                    | v1::WaveState::Completed
                    | v1::WaveState::Failed
                    | v1::WaveState::Cancelled)
            ) && wave.tenants.as_ref().is_some_and(|c| c.running == 0);
            // A wave still moving changes under the reading: versions only once it
            // stands still (paused with nothing running, or finished).
            let versions = if settled && !no_versions {
                let census = client
                    .census(v1::CensusRequest {
                        subject: Some(v1::census_request::Subject::WaveId(wave.wave_id.clone())),
                        histogram_only: true,
                        ..Default::default()
                    })
                    .await;
                match census {
                    Ok(r) => Some(r.into_inner().histogram),
                    Err(e) => {
                        eprintln!("versions unavailable: {}", Failure::from(e).message);
                        None
                    }
                }
            } else {
                None
            };
            match output {
                Output::Json => {
                    let mut value = render::wave_json(&wave);
                    if let (Some(h), Some(obj)) = (&versions, value.as_object_mut()) {
                        obj.insert(
                            "versions".into(),
                            json!(
                                h.iter()
                                    .map(|v| json!({
                                        "version": v.version,
                                        "tenants": v.tenants,
                                    }))
                                    .collect::<Vec<_>>()
                            ),
                        );
                    }
                    print_json(&value);
                }
                Output::Table => {
                    render::print_wave(&wave);
                    if let Some(h) = &versions {
                        println!("versions (read from the tenants' logs now)");
                        render::print_histogram(h);
                    }
                }
            }
            Ok(Exit::Ok)
        }
        WaveCommand::Watch {
            wave_id,
            through_pause,
        } => finish(&mut client, &wave_id, output, through_pause).await,
        WaveCommand::Pause(a) => {
            let wave = client.pause_wave(action(a)).await?.into_inner();
            show_wave(&wave, output);
            Ok(Exit::Ok)
        }
        WaveCommand::Resume {
            action: a,
            accept_canary_failure,
        } => {
            let request = v1::WaveActionRequest {
                accept_canary_failure,
                ..action(a)
            };
            let wave = client.resume_wave(request).await?.into_inner();
            show_wave(&wave, output);
            Ok(Exit::Ok)
        }
        WaveCommand::Approve {
            action: a,
            accept_failures,
        } => {
            let request = v1::WaveActionRequest {
                accept_failures,
                ..action(a)
            };
            let wave = client.approve_wave(request).await?.into_inner();
            show_wave(&wave, output);
            Ok(Exit::Ok)
        }
        WaveCommand::Cancel(a) => {
            let wave = client.cancel_wave(action(a)).await?.into_inner();
            show_wave(&wave, output);
            Ok(Exit::Ok)
        }
        WaveCommand::Retry(a) => {
            let wave = client.retry_wave(action(a)).await?.into_inner();
            show_wave(&wave, output);
            Ok(Exit::Ok)
        }
        WaveCommand::Forget { wave_id } => {
            client
                .forget_wave(v1::WaveActionRequest {
                    wave_id: wave_id.clone(),
                    ..Default::default()
                })
                .await?;
            match output {
                Output::Json => print_json(&json!({ "wave_id": wave_id, "forgotten": true })),
                Output::Table => println!("wave {wave_id} forgotten"),
            }
            Ok(Exit::Ok)
        }
        WaveCommand::List { limit } => {
            let waves = client
                .list_waves(v1::ListWavesRequest {
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .waves;
            match output {
                Output::Json => print_json(&json!({
                    "waves": waves.iter().map(render::wave_json).collect::<Vec<_>>()
                })),
                Output::Table => print_table(
                    &["WAVE", "STATE", "TENANTS", "CREATED", "BUNDLE"],
                    &waves
                        .iter()
                        .map(|w| {
                            vec![
                                w.wave_id.clone(),
                                render::wave_state(w.state).to_string(),
                                render::counts_line(w.tenants.as_ref()),
                                render::time(w.created_at.as_ref()).unwrap_or_default(),
                                w.bundle_id.get(..12).unwrap_or(&w.bundle_id).to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
            Ok(Exit::Ok)
        }
        WaveCommand::Tenants {
            wave_id,
            state,
            limit,
        } => {
            let tenants = list_tenants(&mut client, &wave_id, state, limit as usize).await?;
            match output {
                Output::Json => print_json(&json!({
                    "wave_id": wave_id,
                    "tenants": tenants.iter().map(render::tenant_json).collect::<Vec<_>>(),
                })),
                Output::Table => print_table(
                    &["TENANT", "HOST", "STATE", "ATTEMPTS", "ROWS", "ERROR"],
                    &tenants
                        .iter()
                        .map(|t| {
                            vec![
                                t.tenant_id.clone(),
                                t.host.clone(),
                                render::tenant_state(t.state).to_string(),
                                t.attempts.to_string(),
                                t.rows_changed.to_string(),
                                t.last_error
                                    .as_ref()
                                    .map(render::failure_line)
                                    .unwrap_or_default(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
            Ok(Exit::Ok)
        }
    }
}

fn action(a: ActionArgs) -> v1::WaveActionRequest {
    v1::WaveActionRequest {
        wave_id: a.wave_id,
        reason: a.reason,
        accept_canary_failure: false,
        accept_failures: false,
    }
}

fn show_wave(wave: &v1::Wave, output: Output) {
    match output {
        Output::Json => print_json(&render::wave_json(wave)),
        Output::Table => render::print_wave(wave),
    }
}

/// Follows a wave to its end and reports it; the exit code says how it ended.
async fn finish(
    client: &mut client::Client,
    wave_id: &str,
    output: Output,
    through_pause: bool,
) -> Result<Exit, Failure> {
    let wave = progress::follow(client, wave_id, output, through_pause).await?;
    match output {
        Output::Json => print_json(&render::wave_json(&wave)),
        Output::Table => {
            render::print_wave(&wave);
            let failed = wave.tenants.as_ref().map(|c| c.failed).unwrap_or(0);
            if failed > 0 {
                let tenants = list_tenants(client, wave_id, Some(StateArg::Failed), 10).await?;
                println!("failed tenants (first {}):", tenants.len());
                for t in &tenants {
                    let why = t
                        .last_error
                        .as_ref()
                        .map(render::failure_line)
                        .unwrap_or_default();
                    println!("  {}  {why}", t.tenant_id);
                }
                println!("see all: flotilla wave tenants {wave_id} --state failed");
                println!("retry them: flotilla wave retry {wave_id}");
            }
            if v1::WaveState::try_from(wave.state) == Ok(v1::WaveState::Paused) {
                println!("resume with: flotilla wave resume {wave_id}");
            }
        }
    }
    Ok(progress::exit_for(&wave))
}

/// Pages through a wave's tenants, up to `limit`.
async fn list_tenants(
    client: &mut client::Client,
    wave_id: &str,
    state: Option<StateArg>,
    limit: usize,
) -> Result<Vec<v1::TenantRun>, Failure> {
    let state = match state {
        None => v1::TenantState::Unspecified,
        Some(StateArg::Pending) => v1::TenantState::Pending,
        Some(StateArg::Running) => v1::TenantState::Running,
        Some(StateArg::Succeeded) => v1::TenantState::Succeeded,
        Some(StateArg::Failed) => v1::TenantState::Failed,
        Some(StateArg::Cancelled) => v1::TenantState::Cancelled,
    };
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_wave_tenants(v1::ListWaveTenantsRequest {
                wave_id: wave_id.to_string(),
                state: state as i32,
                page_size: (limit - out.len()).min(1000) as u32,
                page_token: token,
            })
            .await?
            .into_inner();
        out.extend(page.tenants);
        if page.next_page_token.is_empty() || out.len() >= limit {
            break;
        }
        token = page.next_page_token;
    }
    out.truncate(limit);
    Ok(out)
}
