//! The wave's rules without PostgreSQL: one test per rule, and a property test that
//! drives random sequences of starts, outcomes, commands and time, checking the
//! invariants after every step.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::apply::{AppliedScript, ApplyError};
use crate::failure::DbFailure;
use crate::policy::{FailureBudget, Policy};
use crate::store::FORMAT;

fn policy() -> Policy {
    Policy {
        concurrency: 3,
        per_host: Some(2),
        retries: 2,
        backoff_base_ms: 100,
        backoff_max_ms: 1_000,
        max_failures: FailureBudget::Unlimited,
        ..Policy::default()
    }
}

/// `n` tenants over `hosts` servers; the first `canaries` are canaries.
fn machine(n: u32, hosts: u32, canaries: u32, policy: Policy) -> Machine {
    let tenants = (0..n)
        .map(|seq| TenantRecord {
            format: FORMAT,
            seq,
            tenant_id: format!("t{seq:03}"),
            dsn_sealed: String::new(),
            dsn_redacted: String::new(),
            host: format!("h{}:5432", seq % hosts.max(1)),
            labels: BTreeMap::new(),
            canary: seq < canaries,
            state: TenantState::Pending,
            attempts: 0,
            retries_used: 0,
            generation: 0,
            last_error: None,
            busy_since_ms: None,
            started_at_ms: None,
            finished_at_ms: None,
            baselined: 0,
            rows_changed: 0,
        })
        .collect();
    let record = WaveRecord {
        format: FORMAT,
        id: "w".into(),
        bundle_id: "b".into(),
        policy,
        state: WaveState::Running,
        reason: None,
        created_at_ms: 0,
        canary_passed: false,
        history: Vec::new(),
        fleet: None,
        stages: Vec::new(),
        stage_open: 0,
    };
    Machine::new(record, tenants, 42).expect("machine")
}

/// `n` tenants in stages of `sizes` (the first is the canary; they must add up to `n`).
fn staged(n: u32, hosts: u32, sizes: &[u32], policy: Policy) -> Machine {
    let m = machine(n, hosts, sizes[0], policy);
    let (mut record, tenants) = m.into_parts();
    record.stages = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| crate::store::StageRecord {
            name: format!("s{}", i + 1),
            tenants: *size,
            approval: None,
        })
        .collect();
    Machine::new(record, tenants, 42).expect("staged machine")
}

/// Finishes every running tenant with `outcome`.
fn finish_running(m: &mut Machine, outcome: &Outcome, now: Now) {
    let running: Vec<(u32, u64)> = m
        .tenants()
        .iter()
        .filter(|t| t.state == TenantState::Running)
        .map(|t| (t.seq, t.generation))
        .collect();
    for (seq, generation) in running {
        m.on_outcome(seq, generation, outcome, now);
    }
}

/// Runs the open stage to its end, every tenant applied.
fn run_open_stage(m: &mut Machine, now: Now) -> Vec<u32> {
    let mut started = Vec::new();
    loop {
        let batch = start_all(m, now);
        if batch.is_empty() {
            return started;
        }
        started.extend(batch.iter().map(|s| s.0));
        finish_running(m, &applied(), now);
    }
}

#[test]
fn three_stages_pause_after_each_and_an_approval_opens_the_next() {
    let base = Instant::now();
    let p = Policy {
        approve_between_stages: true,
        ..policy()
    };
    let mut m = staged(30, 3, &[5, 10, 15], p);
    let first = run_open_stage(&mut m, at(base, 0));
    assert_eq!(first, (0..5).collect::<Vec<_>>(), "only the canary stage");
    assert_eq!(m.record().state, WaveState::Paused);
    let reason = m.record().reason.clone().unwrap_or_default();
    assert!(
        reason.contains("stage 1 (s1) finished: 5 succeeded") && reason.contains("approve"),
        "{reason}"
    );
    assert_eq!(m.awaiting_approval(), Some(0));
    // A resume is no approval.
    let refused = m.command(
        Command::Resume(CanaryFailure::Accept),
        "bob",
        "",
        at(base, 1),
    );
    assert!(
        matches!(refused, Err(EngineError::AwaitingApproval { .. })),
        "{refused:?}"
    );
    m.command(
        Command::Approve {
            accept_failures: false,
        },
        "alice",
        "looks good",
        at(base, 2),
    )
    .expect("approve");
    assert_eq!(m.record().state, WaveState::Running);
    assert!(m.record().canary_passed);
    let approval = m.record().stages[0].approval.clone().expect("recorded");
    assert_eq!(
        (approval.by.as_str(), approval.succeeded, approval.failed),
        ("alice", 5, 0)
    );
    let last = m.record().history.last().cloned().expect("history");
    assert_eq!(last.actor, "alice");
    assert!(
        last.reason.contains("approved stage 1 (s1)") && last.reason.contains("looks good"),
        "{}",
        last.reason
    );

    let second = run_open_stage(&mut m, at(base, 3));
    assert_eq!(second, (5..15).collect::<Vec<_>>(), "only stage 2");
    assert_eq!(m.record().state, WaveState::Paused);
    m.command(
        Command::Approve {
            accept_failures: false,
        },
        "alice",
        "",
        at(base, 4),
    )
    .expect("approve stage 2");
    let third = run_open_stage(&mut m, at(base, 5));
    assert_eq!(third, (15..30).collect::<Vec<_>>());
    // The last stage needs no approval: the wave completes.
    assert_eq!(m.next_start(at(base, 6), false).0, Step::Exit);
    assert_eq!(m.record().state, WaveState::Completed);
    let stages = m.stages();
    assert_eq!(
        stages
            .iter()
            .map(|s| s.counts.succeeded)
            .collect::<Vec<_>>(),
        [5, 10, 15]
    );
    assert!(stages[2].approval.is_none());
    assert_eq!(m.counts(), m.recount());
}

#[test]
fn a_stage_that_did_not_all_succeed_is_approved_only_on_purpose() {
    let base = Instant::now();
    let p = Policy {
        approve_between_stages: true,
        ..policy()
    };
    let mut m = staged(9, 1, &[1, 4, 4], p);
    run_open_stage(&mut m, at(base, 0));
    m.command(
        Command::Approve {
            accept_failures: false,
        },
        "op",
        "",
        at(base, 1),
    )
    .expect("canary approved");
    // Stage 2: one tenant fails for good, the others succeed.
    let started = start_all(&mut m, at(base, 2));
    assert_eq!(started.first().map(|s| s.0), Some(1));
    m.on_outcome(started[0].0, started[0].1, &failed(PERMANENT), at(base, 3));
    run_open_stage(&mut m, at(base, 4));
    assert_eq!(m.record().state, WaveState::Paused);
    let approve = |accept_failures| Command::Approve { accept_failures };
    let refused = m.command(approve(false), "op", "", at(base, 5));
    assert!(
        matches!(refused, Err(EngineError::StageFailed { failed: 1, .. })),
        "{refused:?}"
    );
    assert_eq!(m.record().stage_open, 1, "still closed");
    assert!(start_all(&mut m, at(base, 6)).is_empty());
    // A retry makes the stage unfinished again: resumable, not approvable.
    m.command(Command::Retry, "op", "", at(base, 7))
        .expect("retry");
    let nothing = m.command(approve(false), "op", "", at(base, 8));
    assert!(
        matches!(nothing, Err(EngineError::NothingToApprove { .. })),
        "{nothing:?}"
    );
    m.command(
        Command::Resume(CanaryFailure::Refuse),
        "op",
        "",
        at(base, 9),
    )
    .expect("resume the retried tenant");
    let again = start_all(&mut m, at(base, 10));
    assert_eq!(again.len(), 1);
    m.on_outcome(again[0].0, again[0].1, &failed(PERMANENT), at(base, 11));
    assert_eq!(m.record().state, WaveState::Paused);
    m.command(approve(true), "carol", "known bad tenant", at(base, 12))
        .expect("accepted");
    let approval = m.record().stages[1].approval.clone().expect("recorded");
    assert!(approval.accepted_failures);
    assert_eq!((approval.succeeded, approval.failed), (3, 1));
    assert_eq!(run_open_stage(&mut m, at(base, 13)), vec![5, 6, 7, 8]);
}

#[test]
fn without_approval_each_stage_opens_when_the_one_before_is_done() {
    let base = Instant::now();
    let mut m = staged(6, 2, &[2, 2, 2], policy());
    let started = start_all(&mut m, at(base, 0));
    assert_eq!(started.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1]);
    finish_running(&mut m, &applied(), at(base, 1));
    // Stage 2 opens by itself; stage 3 waits for it even with room to spare.
    let started = start_all(&mut m, at(base, 2));
    assert_eq!(started.iter().map(|s| s.0).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(m.record().state, WaveState::Running);
    // A failure outside the canary does not hold the next stage (the budget does).
    m.on_outcome(started[0].0, started[0].1, &failed(PERMANENT), at(base, 3));
    m.on_outcome(started[1].0, started[1].1, &applied(), at(base, 3));
    let started = start_all(&mut m, at(base, 4));
    assert_eq!(started.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 5]);
    let opened: Vec<&str> = m
        .record()
        .history
        .iter()
        .map(|h| h.reason.as_str())
        .filter(|r| r.contains("opens"))
        .collect();
    assert_eq!(opened.len(), 2, "{opened:?}");
}

/// A crash between a stage's last outcome and the wave record that opens (or pauses
/// at) the next: the machine loaded from the store decides again before any start.
#[test]
fn the_end_of_a_stage_is_decided_again_after_a_restart() {
    let base = Instant::now();
    for approve in [false, true] {
        let p = Policy {
            approve_between_stages: approve,
            ..policy()
        };
        let m = staged(4, 1, &[2, 2], p);
        let (record, mut tenants) = m.into_parts();
        for t in &mut tenants[..2] {
            t.state = TenantState::Succeeded;
        }
        // The wave record as before the stage ended: stage 1 open, running.
        let mut m = Machine::new(record, tenants, 7).expect("reload");
        let (step, effects) = m.next_start(at(base, 0), false);
        assert!(
            effects.iter().any(|e| matches!(e, Effect::PersistWave(_))),
            "the decision is stored"
        );
        if approve {
            assert_eq!(step, Step::Wait);
            assert_eq!(m.record().state, WaveState::Paused);
            assert_eq!(m.awaiting_approval(), Some(0));
        } else {
            assert!(matches!(step, Step::Start { seq: 2, .. }), "{step:?}");
            assert_eq!(m.record().stage_open, 1);
        }
    }
}

#[test]
fn stages_are_assigned_in_order_and_an_empty_one_is_refused() {
    use crate::policy::{Canary, Stage};
    let labels: Vec<BTreeMap<String, String>> = ["eu", "us", "eu", "us", "eu", "ap"]
        .iter()
        .map(|r| [("region".to_string(), r.to_string())].into())
        .collect();
    let refs: Vec<&BTreeMap<String, String>> = labels.iter().collect();
    let p = Policy {
        canary: Canary::Count { count: 1 },
        stages: vec![
            Stage::Label {
                key: "region".into(),
                value: "eu".into(),
            },
            Stage::Count { count: 1 },
        ],
        ..policy()
    };
    let plan = assign_stages(&p, &refs).expect("valid").expect("staged");
    // t0 canary; t2, t4 (eu); t1 (the next one); t3, t5 left over: rest.
    assert_eq!(plan.stage_of, [0, 2, 1, 3, 1, 3]);
    assert_eq!(plan.names, ["canary (1)", "region=eu", "1", "rest"]);
    let empty = Policy {
        stages: vec![Stage::Label {
            key: "region".into(),
            value: "mars".into(),
        }],
        ..p.clone()
    };
    let e = assign_stages(&empty, &refs).expect_err("empty stage");
    assert!(e.contains("stage 2 (region=mars)"), "{e}");
    let none = Policy {
        stages: Vec::new(),
        approve_between_stages: false,
        ..p
    };
    assert_eq!(assign_stages(&none, &refs), Ok(None));
}

fn at(base: Instant, ms: u64) -> Now {
    Now {
        mono: base + Duration::from_millis(ms),
        wall_ms: 1_000_000 + ms,
    }
}

fn applied() -> Outcome {
    Outcome::Applied {
        scripts: vec![AppliedScript {
            script: "V1__a.sql".into(),
            version: Some("1".into()),
            duration: Duration::from_millis(1),
            rows: None,
        }],
        notes: Vec::new(),
        baselined: 0,
    }
}

fn failed(sqlstate: &str) -> Outcome {
    Outcome::Failed {
        scripts: Vec::new(),
        error: ApplyError::Script {
            script: "V1__a.sql".into(),
            line: None,
            failure: DbFailure {
                sqlstate: Some(sqlstate.into()),
                message: "boom".into(),
                retryability: crate::failure::classify_sqlstate(sqlstate),
                kind: crate::failure::FailureKind::Server,
            },
        },
    }
}

const RETRYABLE: &str = "40001";
const PERMANENT: &str = "42601";

/// Starts everything the machine allows now; the (seq, generation) started.
fn start_all(m: &mut Machine, now: Now) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    while let (Step::Start { seq, generation }, _) = m.next_start(now, false) {
        out.push((seq, generation));
    }
    out
}

#[test]
fn the_canary_gate_holds_the_rest_until_every_canary_succeeded() {
    let base = Instant::now();
    let mut m = machine(6, 3, 2, policy());
    let started = start_all(&mut m, at(base, 0));
    assert_eq!(
        started.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 1],
        "only canaries"
    );
    m.on_outcome(0, started[0].1, &applied(), at(base, 1));
    assert!(
        start_all(&mut m, at(base, 2)).is_empty(),
        "one canary still runs"
    );
    m.on_outcome(1, started[1].1, &applied(), at(base, 3));
    assert!(m.record().canary_passed);
    assert_eq!(
        start_all(&mut m, at(base, 4)).len(),
        3,
        "now up to concurrency"
    );
}

#[test]
fn a_failed_canary_pauses_and_resume_needs_acceptance() {
    let base = Instant::now();
    let mut m = machine(
        4,
        1,
        1,
        Policy {
            retries: 0,
            ..policy()
        },
    );
    let (seq, generation) = start_all(&mut m, at(base, 0))[0];
    let (action, effects) = m.on_outcome(seq, generation, &failed(PERMANENT), at(base, 1));
    assert_eq!(action, Some(TenantAction::Fail));
    assert_eq!(m.record().state, WaveState::Paused);
    assert!(effects.iter().any(|e| matches!(e, Effect::PersistWave(_))));
    let refused = m.command(
        Command::Resume(CanaryFailure::Refuse),
        "op",
        "",
        at(base, 2),
    );
    assert!(matches!(refused, Err(EngineError::CanaryFailed { .. })));
    m.command(
        Command::Resume(CanaryFailure::Accept),
        "op",
        "",
        at(base, 3),
    )
    .expect("accepted");
    assert_eq!(m.record().state, WaveState::Running);
    assert_eq!(
        start_all(&mut m, at(base, 4)).len(),
        2,
        "one host, per_host 2"
    );
}

#[test]
fn a_canary_failing_while_paused_still_counts() {
    let base = Instant::now();
    let mut m = machine(
        3,
        1,
        1,
        Policy {
            retries: 0,
            ..policy()
        },
    );
    let (seq, generation) = start_all(&mut m, at(base, 0))[0];
    m.command(Command::Pause, "op", "lunch", at(base, 1))
        .expect("pause");
    m.on_outcome(seq, generation, &failed(PERMANENT), at(base, 2));
    assert_eq!(m.record().state, WaveState::Paused);
    assert!(
        m.record()
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("canary tenant")
    );
    assert!(matches!(
        m.command(
            Command::Resume(CanaryFailure::Refuse),
            "op",
            "",
            at(base, 3)
        ),
        Err(EngineError::CanaryFailed { .. })
    ));
}

#[test]
fn the_failure_budget_pauses_past_its_exact_threshold() {
    let base = Instant::now();
    let p = Policy {
        concurrency: 10,
        per_host: None,
        retries: 0,
        max_failures: FailureBudget::Count(2),
        ..policy()
    };
    let mut m = machine(10, 1, 0, p);
    let started = start_all(&mut m, at(base, 0));
    for (i, (seq, generation)) in started.iter().take(2).enumerate() {
        m.on_outcome(
            *seq,
            *generation,
            &failed(PERMANENT),
            at(base, 1 + i as u64),
        );
        assert_eq!(m.record().state, WaveState::Running, "{} failed", i + 1);
    }
    let (seq, generation) = started[2];
    m.on_outcome(seq, generation, &failed(PERMANENT), at(base, 5));
    assert_eq!(m.record().state, WaveState::Paused, "3 > 2");
}

#[test]
fn a_ratio_budget_pauses_past_its_share() {
    let base = Instant::now();
    let p = Policy {
        concurrency: 10,
        per_host: None,
        retries: 0,
        max_failures: FailureBudget::Ratio(0.2),
        ..policy()
    };
    let mut m = machine(10, 1, 0, p);
    let started = start_all(&mut m, at(base, 0));
    for (i, (seq, generation)) in started.iter().take(3).enumerate() {
        m.on_outcome(*seq, *generation, &failed(PERMANENT), at(base, i as u64));
        let want = if i < 2 {
            WaveState::Running
        } else {
            WaveState::Paused
        };
        assert_eq!(m.record().state, want, "{} of 10 failed", i + 1);
    }
}

#[test]
fn retries_wait_for_their_backoff_and_stop_when_spent() {
    let base = Instant::now();
    let mut m = machine(1, 1, 0, policy());
    let (seq, generation) = start_all(&mut m, at(base, 0))[0];
    let (action, _) = m.on_outcome(seq, generation, &failed(RETRYABLE), at(base, 0));
    let Some(TenantAction::RetryAfter(delay)) = action else {
        panic!("{action:?}")
    };
    assert!((50..=100).contains(&delay.as_millis()), "{delay:?}");
    assert!(matches!(
        m.next_start(at(base, 1), false).0,
        Step::WaitUntil(_)
    ));
    let later = at(base, delay.as_millis() as u64);
    let (Step::Start { generation, .. }, _) = m.next_start(later, false) else {
        panic!("due")
    };
    let (action, _) = m.on_outcome(seq, generation, &failed(RETRYABLE), later);
    assert!(matches!(action, Some(TenantAction::RetryAfter(_))));
    let much_later = at(base, 5_000);
    let (Step::Start { generation, .. }, _) = m.next_start(much_later, false) else {
        panic!("due")
    };
    let (action, _) = m.on_outcome(seq, generation, &failed(RETRYABLE), much_later);
    assert_eq!(action, Some(TenantAction::Fail), "two retries spent");
    let (action, _) = {
        let mut m2 = machine(1, 1, 0, policy());
        let (s, g) = start_all(&mut m2, at(base, 0))[0];
        m2.on_outcome(s, g, &failed(PERMANENT), at(base, 0))
    };
    assert_eq!(
        action,
        Some(TenantAction::Fail),
        "a permanent error is not retried"
    );
}

#[test]
fn busy_requeues_without_spending_retries_until_busy_timeout() {
    let base = Instant::now();
    let mut m = machine(
        1,
        1,
        0,
        Policy {
            busy_timeout_ms: 1_000,
            ..policy()
        },
    );
    let busy = Outcome::Busy {
        holder: Some("pid 7".into()),
    };
    let mut t = 0;
    loop {
        let (Step::Start { seq, generation }, _) = m.next_start(at(base, t), false) else {
            t += 100;
            continue;
        };
        let (action, _) = m.on_outcome(seq, generation, &busy, at(base, t));
        match action {
            Some(TenantAction::RequeueBusy(_)) => {
                assert_eq!(m.tenant(0).map(|t| t.retries_used), Some(0));
                assert!(t < 1_000, "still requeued at {t} ms");
            }
            Some(TenantAction::Fail) => {
                assert!(t >= 1_000);
                let e = m.tenant(0).and_then(|t| t.last_error.clone()).expect("why");
                assert!(e.message.contains("pid 7") && e.message.contains("busy_timeout"));
                break;
            }
            other => panic!("{other:?}"),
        }
        t += 100;
    }
}

#[test]
fn commands_in_every_state() {
    use Command::*;
    let allowed = |state: WaveState, command: Command| -> bool {
        match command {
            Pause => matches!(state, WaveState::Running | WaveState::Pending),
            Resume(_) => matches!(state, WaveState::Paused | WaveState::Pending),
            Cancel => !state.is_finished(),
            Retry => matches!(
                state,
                WaveState::Failed | WaveState::Completed | WaveState::Paused
            ),
            // A wave without stages has nothing to approve.
            Approve { .. } => false,
        }
    };
    for state in WaveState::ALL {
        for command in [
            Pause,
            Resume(CanaryFailure::Refuse),
            Cancel,
            Retry,
            Approve {
                accept_failures: true,
            },
        ] {
            let mut m = machine(2, 1, 0, policy());
            // One failed tenant so that a retry has something to do.
            let base = Instant::now();
            let (seq, generation) = start_all(&mut m, at(base, 0))[0];
            m.on_outcome(seq, generation, &failed(PERMANENT), at(base, 0));
            m.record.state = state;
            let result = m.command(command, "op", "", at(base, 1));
            assert_eq!(
                result.is_ok(),
                allowed(state, command),
                "{command:?} in {state:?}: {result:?}"
            );
            assert_eq!(m.counts(), m.recount());
        }
    }
}

#[test]
fn a_stale_generation_changes_nothing() {
    let base = Instant::now();
    let mut m = machine(1, 1, 0, policy());
    let (seq, generation) = start_all(&mut m, at(base, 0))[0];
    let before = m.tenants().to_vec();
    let (action, effects) = m.on_outcome(seq, generation + 1, &applied(), at(base, 1));
    assert_eq!((action, effects.len()), (None, 0));
    assert_eq!(m.tenants(), before.as_slice());
    m.on_outcome(seq, generation, &applied(), at(base, 2));
    let (action, _) = m.on_outcome(seq, generation, &applied(), at(base, 3));
    assert_eq!(action, None, "a second result for a finished run is stale");
}

#[test]
fn a_cancel_stops_the_running_and_cancels_the_waiting() {
    let base = Instant::now();
    let mut m = machine(
        5,
        1,
        0,
        Policy {
            per_host: None,
            ..policy()
        },
    );
    let started = start_all(&mut m, at(base, 0));
    let effects = m
        .command(Command::Cancel, "op", "", at(base, 1))
        .expect("cancel");
    let stops: Vec<u32> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Stop(seq) => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(stops, started.iter().map(|s| s.0).collect::<Vec<_>>());
    assert_eq!(m.counts().cancelled, 2);
    assert!(matches!(m.next_start(at(base, 2), false).0, Step::Wait));
    for (seq, generation) in started {
        m.on_outcome(
            seq,
            generation,
            &Outcome::Cancelled {
                scripts: Vec::new(),
            },
            at(base, 3),
        );
    }
    assert_eq!(m.next_start(at(base, 4), false).0, Step::Exit);
    assert_eq!(m.counts().cancelled, 5);
}

/// One input to the machine.
#[derive(Debug, Clone)]
enum Op {
    Next,
    /// An outcome for the `n`-th running tenant (modulo how many run).
    Finish(usize, Kind),
    /// A result for a generation that is not the current one.
    Stale(usize),
    Command(u8),
    Advance(u64),
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Applied,
    Retryable,
    Permanent,
    Busy,
    Cancelled,
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        4 => Just(Kind::Applied),
        2 => Just(Kind::Retryable),
        1 => Just(Kind::Permanent),
        1 => Just(Kind::Busy),
        1 => Just(Kind::Cancelled),
    ];
    prop_oneof![
        6 => Just(Op::Next),
        6 => (0..8usize, kind).prop_map(|(n, k)| Op::Finish(n, k)),
        1 => (0..8usize).prop_map(Op::Stale),
        2 => (0..6u8).prop_map(Op::Command),
        2 => (0..3_000u64).prop_map(Op::Advance),
    ]
}

/// What the store would hold after applying every persist effect so far.
struct Stored {
    wave: WaveRecord,
    tenants: Vec<TenantRecord>,
}

impl Stored {
    fn apply(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::PersistTenant(t) => self.tenants[t.seq as usize] = t.clone(),
                Effect::PersistWave(w) => self.wave = w.clone(),
                Effect::Emit(_) | Effect::Stop(_) => {}
            }
        }
    }
}

fn check(m: &Machine, stored: &Stored, succeeded_once: &HashSet<u32>) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.counts(), m.recount(), "counts equal the tenants' states");
    let retries = m.record().policy.retries;
    prop_assert!(
        m.tenants().iter().all(|t| t.retries_used <= retries),
        "retries within the policy"
    );
    prop_assert_eq!(u64::from(m.in_flight()), m.counts().running);
    let p = &m.record().policy;
    prop_assert!(m.in_flight() <= p.concurrency);
    let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
    for t in m
        .tenants()
        .iter()
        .filter(|t| t.state == TenantState::Running)
    {
        *per_host.entry(t.host.as_str()).or_default() += 1;
    }
    for (host, n) in per_host {
        prop_assert_eq!(n, m.in_flight_on(host));
        if let Some(limit) = p.per_host {
            prop_assert!(n <= limit, "{} runs {} > {}", host, n, limit);
        }
    }
    if m.record().state == WaveState::Completed {
        prop_assert!(
            m.tenants()
                .iter()
                .all(|t| t.state == TenantState::Succeeded)
        );
    }
    for seq in succeeded_once {
        prop_assert_eq!(
            m.tenant(*seq).map(|t| t.state),
            Some(TenantState::Succeeded)
        );
    }
    // What resume relies on: the stored records are the machine's, but for starts
    // (never stored: a RUNNING tenant is queued again on open).
    prop_assert_eq!(&stored.wave, m.record());
    for (live, kept) in m.tenants().iter().zip(&stored.tenants) {
        if live.state != TenantState::Running {
            prop_assert_eq!(live, kept);
        } else {
            prop_assert!(kept.state != TenantState::Running);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_after_every_step(
        n in 1u32..12,
        hosts in 1u32..4,
        canaries in 0u32..3,
        concurrency in 1u32..5,
        per_host in proptest::option::of(1u32..3),
        budget in prop_oneof![Just(FailureBudget::Unlimited), (0u32..3).prop_map(FailureBudget::Count)],
        extra_stages in 0u32..3,
        approve in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let canaries = if extra_stages > 0 { canaries.max(1) } else { canaries };
        let p = Policy {
            concurrency, per_host, max_failures: budget, busy_timeout_ms: 2_000,
            approve_between_stages: approve && extra_stages > 0,
            ..policy()
        };
        let mut m = if extra_stages > 0 && n > canaries {
            // The canary, then the rest split into `extra_stages` (the last takes the
            // remainder).
            let rest = n - canaries;
            let each = (rest / extra_stages).max(1);
            let mut sizes = vec![canaries];
            let mut left = rest;
            for i in 0..extra_stages {
                if left == 0 { break; }
                let size = if i + 1 == extra_stages { left } else { each.min(left) };
                sizes.push(size);
                left -= size;
            }
            staged(n, hosts, &sizes, p)
        } else {
            machine(n, hosts, canaries.min(n), Policy { approve_between_stages: false, ..p })
        };
        let mut stored = Stored { wave: m.record().clone(), tenants: m.tenants().to_vec() };
        let base = Instant::now();
        let mut t = 0u64;
        let mut succeeded_once: HashSet<u32> = HashSet::new();
        // When each requeued tenant is due again (ms).
        let mut due: BTreeMap<u32, u64> = BTreeMap::new();
        for op in ops {
            let now = at(base, t);
            match op {
                Op::Next => {
                    let state = m.record().state;
                    let gated = !m.record().canary_passed && canaries.min(n) > 0;
                    let open_end: u32 = m.stages().iter().filter(|s| s.open).map(|s| s.counts.total as u32).sum();
                    let staged_wave = !m.record().stages.is_empty();
                    let (step, effects) = m.next_start(now, false);
                    if let Step::Start { seq, .. } = step {
                        prop_assert_eq!(state, WaveState::Running, "no start unless running");
                        if staged_wave {
                            let open_now: u32 = m.stages().iter().filter(|s| s.open).map(|s| s.counts.total as u32).sum();
                            prop_assert!(
                                seq < open_now.max(open_end),
                                "tenant {} of a closed stage started", seq
                            );
                        }
                        prop_assert!(!succeeded_once.contains(&seq), "a succeeded tenant runs again");
                        if gated {
                            prop_assert!(
                                m.tenant(seq).is_some_and(|t| t.canary),
                                "a non-canary started before the canary stage passed"
                            );
                        }
                        if let Some(at_ms) = due.remove(&seq) {
                            prop_assert!(t >= at_ms, "started at {} before due at {}", t, at_ms);
                        }
                    }
                    stored.apply(&effects);
                }
                Op::Finish(i, kind) => {
                    let running: Vec<(u32, u64)> = m.tenants().iter()
                        .filter(|t| t.state == TenantState::Running)
                        .map(|t| (t.seq, t.generation)).collect();
                    if running.is_empty() { continue; }
                    let (seq, generation) = running[i % running.len()];
                    let outcome = match kind {
                        Kind::Applied => applied(),
                        Kind::Retryable => failed(RETRYABLE),
                        Kind::Permanent => failed(PERMANENT),
                        Kind::Busy => Outcome::Busy { holder: None },
                        Kind::Cancelled => Outcome::Cancelled { scripts: Vec::new() },
                    };
                    let state = m.record().state;
                    let retries_before = m.tenant(seq).map(|t| t.retries_used);
                    let (action, effects) = m.on_outcome(seq, generation, &outcome, now);
                    prop_assert!(action.is_some());
                    match action {
                        Some(TenantAction::Succeed) => {
                            succeeded_once.insert(seq);
                        }
                        Some(TenantAction::RetryAfter(d)) => {
                            due.insert(seq, t + d.as_millis() as u64);
                        }
                        Some(TenantAction::RequeueBusy(d)) => {
                            prop_assert_eq!(
                                m.tenant(seq).map(|t| t.retries_used),
                                retries_before,
                                "busy spends no retry"
                            );
                            due.insert(seq, t + d.as_millis() as u64);
                        }
                        Some(TenantAction::Fail) => {
                            let c = m.counts();
                            if state == WaveState::Running && budget.exceeded(c.failed, c.total) {
                                prop_assert_eq!(
                                    m.record().state,
                                    WaveState::Paused,
                                    "over the failure budget and still running"
                                );
                            }
                        }
                        _ => {}
                    }
                    stored.apply(&effects);
                }
                Op::Stale(i) => {
                    let seq = (i as u32) % n;
                    let generation = m.tenant(seq).map(|t| t.generation).unwrap_or(0) + 7;
                    let before = m.tenants().to_vec();
                    let (action, effects) = m.on_outcome(seq, generation, &applied(), now);
                    prop_assert!(action.is_none() && effects.is_empty());
                    prop_assert_eq!(m.tenants(), before.as_slice());
                }
                Op::Command(c) => {
                    let command = match c {
                        0 => Command::Pause,
                        1 => Command::Resume(CanaryFailure::Accept),
                        2 => Command::Cancel,
                        3 => Command::Retry,
                        c => Command::Approve { accept_failures: c == 4 },
                    };
                    let running: Vec<u32> = m.tenants().iter()
                        .filter(|t| t.state == TenantState::Running)
                        .map(|t| t.seq).collect();
                    if let Ok(effects) = m.command(command, "op", "", now) {
                        if command == Command::Cancel {
                            let stops: Vec<u32> = effects.iter()
                                .filter_map(|e| match e { Effect::Stop(s) => Some(*s), _ => None })
                                .collect();
                            prop_assert_eq!(stops, running, "a cancel stops every running tenant");
                        }
                        if command == Command::Retry {
                            due.clear();
                        }
                        stored.apply(&effects);
                    }
                }
                Op::Advance(ms) => t += ms,
            }
            check(&m, &stored, &succeeded_once)?;
        }
        // Replaying the store into a fresh machine gives the same wave (what a restart
        // does), with the running tenants queued again.
        let mut tenants = stored.tenants.clone();
        for t in tenants.iter_mut().filter(|t| t.state == TenantState::Running) {
            t.state = TenantState::Pending;
        }
        let fresh = Machine::new(stored.wave.clone(), tenants, 1).expect("reload");
        prop_assert_eq!(fresh.record(), m.record());
        let mut expected = m.counts();
        expected.pending += expected.running;
        expected.running = 0;
        prop_assert_eq!(fresh.counts(), expected);
    }
}

/// Health gates: a held host starts nothing while the other goes on; a release lets it
/// start; a hold past `max_hold` pauses the wave once, and a resume gives the host a new
/// `max_hold` instead of pausing again at the next reading.
#[test]
fn a_held_host_waits_others_go_on_and_a_long_hold_pauses_once() {
    let base = Instant::now();
    let mut m = machine(
        4,
        2,
        0,
        Policy {
            max_hold_ms: 1_000,
            ..policy()
        },
    );
    let held_host = m.tenant(0).expect("t0").host.clone();
    let effects = m.on_gate(
        &held_host,
        Some("gate SQL returned false".into()),
        at(base, 0),
    );
    assert!(!effects.is_empty(), "a new hold is told");
    assert_eq!(m.holds(), [format!("{held_host}: gate SQL returned false")]);
    let started: Vec<u32> = start_all(&mut m, at(base, 1))
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert!(!started.is_empty());
    assert!(
        started
            .iter()
            .all(|s| m.tenant(*s).expect("tenant").host != held_host),
        "nothing starts on the held host: {started:?}"
    );
    // Still held after max_hold: the wave pauses, naming the host.
    m.on_gate(
        &held_host,
        Some("gate SQL returned false".into()),
        at(base, 1_500),
    );
    assert_eq!(m.record().state, WaveState::Paused);
    assert!(
        m.record()
            .reason
            .as_deref()
            .unwrap_or("")
            .contains(&held_host)
    );
    m.command(
        Command::Resume(CanaryFailure::Refuse),
        "op",
        "",
        at(base, 1_600),
    )
    .expect("resume");
    m.on_gate(
        &held_host,
        Some("gate SQL returned false".into()),
        at(base, 1_700),
    );
    assert_eq!(
        m.record().state,
        WaveState::Running,
        "a resume restarts the hold's clock"
    );
    // Released: its tenants start.
    m.on_gate(&held_host, None, at(base, 1_800));
    assert!(m.holds().is_empty());
    let started: Vec<u32> = start_all(&mut m, at(base, 1_900))
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert!(
        started
            .iter()
            .any(|s| m.tenant(*s).expect("tenant").host == held_host),
        "{started:?}"
    );
}
