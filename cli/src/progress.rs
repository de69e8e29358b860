//! Following a wave live: the watch stream rendered as a progress bar on a terminal
//! (counts per state, rate, ETA, and each failure printed above the bar as it happens),
//! as plain lines when stdout is not a terminal, and not at all for `--output json`.
//! When the daemon goes away mid-wave (a restart), it reconnects and carries on: the
//! wave itself resumes on the daemon's side.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use flotilla::api::v1;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::Code;

use crate::client::{Client, Failure};
use crate::exit::Exit;
use crate::output::Output;
use crate::render;

/// How long a daemon may be unreachable before `watch` gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// Plain-line mode prints a changed count at most this often.
const LINE_EVERY: Duration = Duration::from_secs(1);

enum View {
    Bar(ProgressBar),
    Lines { last: String, at: Option<Instant> },
    Quiet,
}

impl View {
    fn new(output: Output) -> Self {
        match output {
            Output::Json => View::Quiet,
            Output::Table if std::io::stdout().is_terminal() => {
                let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
                // Compact enough for 80 columns: the bar takes what is left.
                let style = ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} {rate} ETA {eta} {msg}",
                )
                .map(|s| {
                    s.with_key(
                        "rate",
                        |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.1}/s", state.per_sec());
                        },
                    )
                })
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.enable_steady_tick(Duration::from_millis(200));
                View::Bar(bar)
            }
            Output::Table => View::Lines {
                last: String::new(),
                at: None,
            },
        }
    }

    fn event(&mut self, ev: &v1::WaveEvent) {
        let state = render::wave_state(ev.state);
        let c = ev.tenants.unwrap_or_default();
        let failure = ev
            .tenant
            .as_ref()
            .filter(|t| v1::TenantState::try_from(t.state) == Ok(v1::TenantState::Failed));
        let failure_text = failure.map(|t| {
            let why = t
                .last_error
                .as_ref()
                .map(render::failure_line)
                .unwrap_or_default();
            format!("FAILED {}: {why}", t.tenant_id)
        });
        match self {
            View::Bar(bar) => {
                bar.set_length(c.total);
                bar.set_position(c.succeeded + c.failed + c.cancelled);
                bar.set_message(format!("{state} {} running {} failed", c.running, c.failed));
                if let Some(text) = failure_text {
                    bar.println(text);
                }
            }
            View::Lines { last, at } => {
                if let Some(text) = failure_text {
                    println!("{text}");
                }
                let line = format!("{state} {}", render::counts_line(Some(&c)));
                let due = at.is_none_or(|t| t.elapsed() >= LINE_EVERY)
                    || !last.starts_with(state)
                    || c.running == 0;
                if *last != line && due {
                    println!("{line}");
                    *last = line;
                    *at = Some(Instant::now());
                }
            }
            View::Quiet => {}
        }
    }

    fn note(&self, text: &str) {
        match self {
            View::Bar(bar) => bar.println(text),
            View::Lines { .. } => println!("{text}"),
            View::Quiet => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        // The summary that follows repeats the final counts; a bar left behind would
        // also leave the cursor at the end of its line.
        if let View::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// True when following should stop at this event.
fn stop_at(ev: &v1::WaveEvent, through_pause: bool) -> bool {
    let running = ev.tenants.as_ref().map(|c| c.running).unwrap_or(0);
    // Settled, as the daemon decides it; or paused and drained: nothing happens until
    // someone resumes.
    flotilla::api::convert::event_settled(ev)
        || (!through_pause && running == 0 && ev.state == v1::WaveState::Paused as i32)
}

/// Follows a wave until it settles (or pauses, unless `through_pause`), rendering as
/// `output` asks; returns its final state.
pub async fn follow(
    client: &mut Client,
    wave_id: &str,
    output: Output,
    through_pause: bool,
) -> Result<v1::Wave, Failure> {
    let mut view = View::new(output);
    let mut unreachable_since: Option<Instant> = None;
    'watch: loop {
        let request = v1::WatchWaveRequest {
            wave_id: wave_id.to_string(),
        };
        let lost = match client.watch_wave(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            unreachable_since = None;
                            view.event(&ev);
                            if stop_at(&ev, through_pause) {
                                break 'watch;
                            }
                        }
                        Ok(None) => break 'watch,
                        Err(s) if s.code() == Code::Unavailable => break s,
                        Err(s) => {
                            view.finish();
                            return Err(s.into());
                        }
                    }
                }
            }
            Err(s) if s.code() == Code::Unavailable => s,
            Err(s) => {
                view.finish();
                return Err(s.into());
            }
        };
        let since = *unreachable_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_FOR {
            view.finish();
            return Err(Failure::new(
                Exit::Unavailable,
                format!(
                    "daemon unavailable for {}s: {}; the wave goes on when it is back (`flotilla wave watch {wave_id}`)",
                    RECONNECT_FOR.as_secs(),
                    lost.message()
                ),
            ));
        }
        view.note(&format!(
            "daemon unavailable ({}); reconnecting…",
            lost.message()
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    view.finish();
    let wave = client
        .get_wave(v1::GetWaveRequest {
            wave_id: wave_id.to_string(),
        })
        .await?
        .into_inner();
    Ok(wave)
}

/// How the process exits for a wave in this state.
pub fn exit_for(wave: &v1::Wave) -> Exit {
    use v1::WaveState as S;
    match v1::WaveState::try_from(wave.state) {
        Ok(S::Completed) => Exit::Ok,
        Ok(S::Failed) => Exit::WaveFailed,
        Ok(S::Paused | S::Cancelled) => Exit::WaveStopped,
        _ => Exit::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: v1::WaveState, running: u64) -> v1::WaveEvent {
        v1::WaveEvent {
            state: state as i32,
            tenants: Some(v1::TenantCounts {
                running,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn stops_when_settled_or_drained_pause() {
        use v1::WaveState as S;
        assert!(!stop_at(&event(S::Running, 3), false));
        assert!(!stop_at(&event(S::Cancelled, 1), false));
        assert!(stop_at(&event(S::Cancelled, 0), false));
        assert!(stop_at(&event(S::Completed, 0), false));
        assert!(!stop_at(&event(S::Paused, 2), false));
        assert!(stop_at(&event(S::Paused, 0), false));
        assert!(!stop_at(&event(S::Paused, 0), true));
    }
}
