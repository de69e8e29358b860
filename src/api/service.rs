//! The `RolloutService` implementation: authorizes each call, converts the request, asks
//! the [`Engine`] (or, for plans and logs, reads tenants directly) and converts back.
//! Handlers hold no state of their own and never decide anything about a wave: every
//! decision is the engine's, so the API and the engine cannot disagree.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ApiError;
use super::auth::{Authenticator, TokenCheck};
use super::convert::{self, Targets};
use super::v1;
use super::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use crate::apply::PlanOptions;
use crate::bundle::Bundle;
use crate::config::{Limits, Role};
use crate::dsn::Dsn;
use crate::policy::Policy;
use crate::target::Tenant;
use crate::wave::{Engine, WaveStatus, now_ms};

/// Tenants whose logs a plan reads at once, in all and on one server.
const PLAN_CONCURRENCY: usize = 16;
const PLAN_PER_HOST: usize = 4;
/// Plans the daemon runs at once; more are refused (RESOURCE_EXHAUSTED), not queued.
const MAX_CONCURRENT_PLANS: usize = 4;
/// Tenant log reads at once (each is a connection with the daemon's credentials, and a
/// viewer may ask for them); more are refused (RESOURCE_EXHAUSTED).
const MAX_CONCURRENT_LOG_READS: usize = 8;
/// Page sizes when a request leaves them at 0, and their caps.
const DEFAULT_WAVE_PAGE: usize = 50;
const DEFAULT_TENANT_PAGE: usize = 100;
const MAX_PAGE: usize = 1_000;

/// The control API over one engine.
#[derive(Clone)]
pub struct RolloutApi {
    engine: Engine,
    auth: Arc<Authenticator>,
    limits: Limits,
    plans: Arc<Semaphore>,
    log_reads: Arc<Semaphore>,
}

impl RolloutApi {
    /// An API serving `engine`, checking calls with `auth`.
    pub fn new(engine: Engine, auth: Authenticator, limits: Limits) -> Self {
        Self {
            engine,
            auth: Arc::new(auth),
            limits,
            plans: Arc::new(Semaphore::new(MAX_CONCURRENT_PLANS)),
            log_reads: Arc::new(Semaphore::new(MAX_CONCURRENT_LOG_READS)),
        }
    }

    /// The tonic service, accepting requests as large as the limits allow — from
    /// callers whose token is checked before the body is read.
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<RolloutServiceServer<Self>, TokenCheck>
    {
        let max = self.limits.max_message_bytes();
        let check = TokenCheck(self.auth.clone());
        let server = RolloutServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        tonic::service::interceptor::InterceptedService::new(server, check)
    }

    async fn start(&self, req: Request<v1::StartWaveRequest>) -> Result<String, ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Operator, "starting a wave")?;
        let r = req.into_inner();
        let raw_adopt = r
            .policy
            .as_ref()
            .map(|p| p.adopt.clone())
            .unwrap_or_default();
        let mut policy = convert::policy_from_proto(r.policy)?;
        let bundle = convert::bundle_from_proto(r.bundle, &self.limits)?;
        policy.adopt = convert::adopt_for_bundle(&raw_adopt, &bundle);
        policy
            .validate()
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let convert::Resolved { tenants, fleet, .. } = Targets::from_start(r.targets)?
            .resolve(&self.limits, self.engine.reach(), self.engine.fleets())
            .await?;
        let (bundle_id, count) = (bundle.id().to_string(), tenants.len());
        let sizes = if policy.start_order == crate::policy::StartOrder::Size {
            crate::target::database_sizes(&tenants, self.engine.reach()).await
        } else {
            Default::default()
        };
        let engine = self.engine.clone();
        let actor = caller.name.clone();
        let id = off_runtime(move || {
            engine.start_wave_sized(bundle, tenants, policy, &actor, &sizes, fleet)
        })
        .await?;
        tracing::info!(wave = %id, bundle = %bundle_id, tenants = count, actor = %caller.name, "wave created");
        Ok(id)
    }

    fn get(&self, req: Request<v1::GetWaveRequest>) -> Result<v1::Wave, ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Viewer, "reading a wave")?;
        let status = self.engine.status(&wave_id(&req.get_ref().wave_id)?)?;
        Ok(convert::wave_for(&status, caller.role))
    }

    fn list(&self, req: Request<v1::ListWavesRequest>) -> Result<v1::ListWavesResponse, ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Viewer, "listing waves")?;
        let r = req.into_inner();
        let (offset, size) = page(r.page_size, &r.page_token, DEFAULT_WAVE_PAGE)?;
        let all = self.engine.list();
        let waves: Vec<v1::Wave> = all
            .iter()
            .skip(offset)
            .take(size)
            .map(|w| convert::wave_for(w, caller.role))
            .collect();
        let next = offset + waves.len();
        Ok(v1::ListWavesResponse {
            waves,
            next_page_token: if next < all.len() {
                next.to_string()
            } else {
                String::new()
            },
        })
    }

    async fn act(
        &self,
        req: Request<v1::WaveActionRequest>,
        what: &str,
        action: impl FnOnce(&Engine, &str, &str, &str) -> Result<WaveStatus, crate::wave::EngineError>
        + Send
        + 'static,
    ) -> Result<v1::Wave, ApiError> {
        let caller = self.auth.authorize(req.metadata(), Role::Operator, what)?;
        let r = req.into_inner();
        let id = wave_id(&r.wave_id)?;
        let engine = self.engine.clone();
        let status = off_runtime(move || action(&engine, &id, &caller.name, &r.reason)).await?;
        Ok(convert::wave(&status))
    }

    fn watch(
        &self,
        req: Request<v1::WatchWaveRequest>,
    ) -> Result<ReceiverStream<Result<v1::WaveEvent, Status>>, ApiError> {
        self.auth
            .authorize(req.metadata(), Role::Viewer, "watching a wave")?;
        let id = req.into_inner().wave_id;
        let id = wave_id(&id)?;
        let (snapshot, events) = self.engine.watch(&id)?;
        let (tx, rx) = mpsc::channel(64);
        let engine = self.engine.clone();
        let draining = engine.draining();
        tokio::spawn(forward_events(
            snapshot,
            events,
            move || engine.status(&id),
            draining,
            tx,
        ));
        Ok(ReceiverStream::new(rx))
    }

    async fn tenants(
        &self,
        req: Request<v1::ListWaveTenantsRequest>,
    ) -> Result<v1::ListWaveTenantsResponse, ApiError> {
        self.auth
            .authorize(req.metadata(), Role::Viewer, "listing tenants")?;
        let r = req.into_inner();
        let state = convert::tenant_state_filter(r.state)?;
        let (from_seq, size) = page(r.page_size, &r.page_token, DEFAULT_TENANT_PAGE)?;
        let from_seq = u32::try_from(from_seq)
            .map_err(|_| ApiError::Invalid("page_token: out of range".into()))?;
        // One more than asked tells whether another page exists; it starts the next one.
        let id = wave_id(&r.wave_id)?;
        let engine = self.engine.clone();
        // A finished wave's tenants come from the store: not on the threads that answer
        // status calls.
        let mut views = off_runtime(move || engine.tenants(&id, state, from_seq, size + 1)).await?;
        let next_page_token = if views.len() > size {
            views.truncate(size);
            views
                .last()
                .map(|v| (v.seq + 1).to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(v1::ListWaveTenantsResponse {
            next_page_token,
            tenants: views.iter().map(convert::tenant).collect(),
        })
    }

    async fn dry_run(&self, req: Request<v1::PlanRequest>) -> Result<v1::PlanResponse, ApiError> {
        // A plan connects to targets the request names: an operator's act.
        self.auth.authorize(
            req.metadata(),
            Role::Operator,
            "planning (it connects to the targets the request names)",
        )?;
        let _running = self.plans.clone().try_acquire_owned().map_err(|_| {
            ApiError::Busy(format!(
                "{MAX_CONCURRENT_PLANS} plans are running; try again when one has finished"
            ))
        })?;
        let r = req.into_inner();
        let bundle = Arc::new(convert::bundle_from_proto(r.bundle, &self.limits)?);
        // Validated as a wave's policy would validate it, before any connection.
        let prior = Policy {
            baseline_version: convert::baseline_version(&r.baseline_version),
            adopt: convert::adopt_for_bundle(&r.adopt, &bundle),
            allow: r.allow.clone(),
            ..Policy::default()
        };
        let findings: Vec<v1::SafetyFinding> = crate::bundle::safety::lint(&bundle)
            .iter()
            .map(|f| convert::safety_finding(f, &prior.allow))
            .collect();
        prior
            .validate()
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let prior = prior.prior();
        let reach = self.engine.reach();
        let tenants = Targets::from_plan(r.targets)?
            .resolve(&self.limits, reach, self.engine.fleets())
            .await?
            .tenants;
        let options = convert::plan_options(r.allow_drift, r.allow_out_of_order);
        let undo_to =
            match r.undo_to.trim() {
                "" => None,
                v => Some(v.parse::<crate::bundle::Version>().map_err(|e| {
                    ApiError::Invalid(format!("undo_to: {v:?} is not a version: {e}"))
                })?),
            };
        let versions_without_undo = bundle
            .versions_without_undo()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let reach = reach.clone();
        let plans =
            crate::target::visit_bounded(tenants, PLAN_CONCURRENCY, PLAN_PER_HOST, move |tenant| {
                let (bundle, prior, reach) = (bundle.clone(), prior.clone(), reach.clone());
                let undo_to = undo_to.clone();
                async move {
                    match undo_to {
                        Some(target) => plan_undo_tenant(&bundle, &tenant, &target, &reach).await,
                        None => {
                            plan_tenant(&bundle, &tenant, options, prior.as_ref(), &reach).await
                        }
                    }
                }
            })
            .await;
        Ok(v1::PlanResponse {
            tenants: plans.into_iter().flatten().collect(),
            findings,
            versions_without_undo,
        })
    }

    async fn tenant_log(
        &self,
        req: Request<v1::GetTenantLogRequest>,
    ) -> Result<v1::GetTenantLogResponse, ApiError> {
        // By DSN the daemon connects where the caller says: an operator's act. By wave
        // and tenant it reads a tenant the daemon already runs: a viewer's.
        let (need, what) = if req.get_ref().tenant_dsn.is_empty() {
            (Role::Viewer, "reading a tenant log")
        } else {
            (
                Role::Operator,
                "reading a tenant log by DSN (it connects where the request says)",
            )
        };
        self.auth.authorize(req.metadata(), need, what)?;
        let _reading = self.log_reads.clone().try_acquire_owned().map_err(|_| {
            ApiError::Busy(format!(
                "{MAX_CONCURRENT_LOG_READS} tenant log reads are running; try again when one has finished"
            ))
        })?;
        let r = req.into_inner();
        let (dsn, name) = if !r.tenant_dsn.is_empty() {
            let dsn = Dsn::parse(&r.tenant_dsn)
                .map_err(|e| ApiError::Invalid(format!("tenant_dsn: {e}")))?;
            let name = dsn.to_string();
            (dsn, name)
        } else if !r.wave_id.is_empty() && !r.tenant_id.is_empty() {
            (
                self.engine
                    .tenant_dsn(&wave_id(&r.wave_id)?, &r.tenant_id)?,
                r.tenant_id.clone(),
            )
        } else {
            return Err(ApiError::Invalid(
                "give tenant_dsn, or wave_id and tenant_id".into(),
            ));
        };
        let settings = Policy::default().session_settings();
        let entries = crate::apply::read_log_entries(&dsn, &settings, self.engine.reach())
            .await
            .map_err(|error| ApiError::Tenant {
                tenant: name,
                error,
            })?;
        Ok(v1::GetTenantLogResponse {
            rows: entries.iter().map(convert::log_row).collect(),
        })
    }

    async fn register_fleet(
        &self,
        req: Request<v1::AddFleetRequest>,
    ) -> Result<v1::Fleet, ApiError> {
        // Registering resolves the source now: it connects where the request says.
        let caller = self.auth.authorize(
            req.metadata(),
            Role::Operator,
            "registering a fleet (it connects to the source the request names)",
        )?;
        let r = req.into_inner();
        crate::fleet::check_name(&r.name)?;
        let labels: std::collections::BTreeMap<String, String> = r.labels.into_iter().collect();
        crate::fleet::check_labels(&labels)?;
        let targets = Targets::from_fleet_source(r.source)?;
        let source = match &targets {
            Targets::Source(source) => source.clone(),
            // Listed tenants are kept as resolved; the text is not needed again.
            _ => crate::target::TargetSource::Csv {
                text: String::new(),
                origin: "target list".into(),
            },
        };
        let tenants = targets
            .resolve(&self.limits, self.engine.reach(), self.engine.fleets())
            .await?
            .tenants;
        let new = crate::fleet::NewFleet {
            name: r.name,
            source,
            tenants,
            labels,
        };
        let engine = self.engine.clone();
        let replace = r.replace;
        let actor = caller.name.clone();
        let view =
            off_runtime(move || Ok(engine.fleets().add(new, &actor, replace, now_ms()))).await??;
        tracing::info!(fleet = %view.name, kind = view.kind, tenants = view.tenants_when_added, actor = %caller.name, "fleet registered");
        Ok(convert::fleet(&view, caller.role))
    }

    fn fleet_list(
        &self,
        req: Request<v1::ListFleetsRequest>,
    ) -> Result<v1::ListFleetsResponse, ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Viewer, "listing fleets")?;
        Ok(v1::ListFleetsResponse {
            fleets: self
                .engine
                .fleets()
                .list()?
                .iter()
                .map(|f| convert::fleet(f, caller.role))
                .collect(),
        })
    }

    fn fleet_get(&self, req: Request<v1::GetFleetRequest>) -> Result<v1::Fleet, ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Viewer, "reading a fleet")?;
        Ok(convert::fleet(
            &self.engine.fleets().get(&req.get_ref().name)?,
            caller.role,
        ))
    }

    async fn fleet_remove(&self, req: Request<v1::RemoveFleetRequest>) -> Result<(), ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Operator, "removing a fleet")?;
        let name = req.into_inner().name;
        let engine = self.engine.clone();
        let removing = name.clone();
        off_runtime(move || Ok(engine.fleets().remove(&removing))).await??;
        tracing::info!(fleet = %name, actor = %caller.name, "fleet removed");
        Ok(())
    }

    async fn take_census(
        &self,
        req: Request<v1::CensusRequest>,
    ) -> Result<v1::CensusReport, ApiError> {
        // A census reads tenants the daemon already knows (a registered fleet, a wave's
        // tenants): a viewer's act, like reading a wave tenant's log.
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Viewer, "taking a census")?;
        let r = req.into_inner();
        let answer = |census: &crate::census::Census| {
            let mut report = convert::census(census);
            if r.histogram_only {
                report.tenants.clear();
                for group in &mut report.fingerprints {
                    group.changes.clear();
                }
            }
            report
        };
        use v1::census_request::Subject;
        if r.cached {
            let Some(Subject::Fleet(name)) = &r.subject else {
                return Err(ApiError::Invalid(
                    "cached: only a fleet's census is kept".into(),
                ));
            };
            if r.bundle.is_some() || r.fingerprint || r.concurrency > 0 || r.per_host > 0 {
                return Err(ApiError::Invalid(
                    "cached: the last census is shown as it was taken; give no bundle, fingerprint, concurrency or per_host"
                        .into(),
                ));
            }
            crate::fleet::check_name(name)?;
            let census = self
                .engine
                .fleets()
                .cached_census(name)
                .ok_or_else(|| crate::fleet::FleetError::NoCensus(name.clone()))?;
            return Ok(answer(&census));
        }
        let bounded = |field: &str, value: u32, default: usize, max: usize| match value as usize {
            0 => Ok(default),
            n if n > max => Err(ApiError::Invalid(format!(
                "{field}: {n} is more than {max} (a census must not crowd the fleet's servers)"
            ))),
            n => Ok(n),
        };
        let plain = r.concurrency == 0 && r.per_host == 0 && !r.fingerprint;
        let options = crate::census::CensusOptions {
            concurrency: bounded(
                "concurrency",
                r.concurrency,
                crate::census::DEFAULT_CONCURRENCY,
                crate::census::MAX_CONCURRENCY,
            )?,
            per_host: bounded(
                "per_host",
                r.per_host,
                crate::census::DEFAULT_PER_HOST,
                crate::census::MAX_PER_HOST,
            )?,
            fingerprint: r.fingerprint,
        };
        let mut bundle = match r.bundle.clone() {
            Some(b) => Some(Arc::new(convert::bundle_from_proto(Some(b), &self.limits)?)),
            None => None,
        };
        // `wave status` of a settled wave asks again and again: while the wave does not
        // change, a recent census answers without a slot (at most one reading of its
        // tenants per 30 s, not one per status call).
        let for_status = r.histogram_only && bundle.is_none() && plain;
        let wave_changes = match &r.subject {
            Some(Subject::WaveId(id)) => {
                let id = wave_id(id)?;
                let changes = self.engine.status(&id)?.history.len();
                if for_status && let Some(census) = self.engine.fleets().wave_census(&id, changes) {
                    return Ok(answer(&census));
                }
                Some((id, changes))
            }
            _ => None,
        };
        let _slot = self
            .engine
            .fleets()
            .census_slots()
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ApiError::Busy(format!(
                    "{} censuses are running; try again when one has finished",
                    crate::fleet::MAX_CONCURRENT_CENSUSES
                ))
            })?;
        let reach = self.engine.reach();
        match &r.subject {
            None => Err(ApiError::Invalid("give a fleet or a wave_id".into())),
            Some(Subject::Fleet(name)) => {
                let resolved = Targets::Fleet(name.clone())
                    .resolve(&self.limits, reach, self.engine.fleets())
                    .await
                    .map_err(|e| viewer_safe(e, caller.role, name))?;
                let mut census = crate::census::take(
                    name,
                    resolved.tenants,
                    bundle,
                    &options,
                    reach,
                    crate::census::CensusTrigger::Request,
                )
                .await;
                census.fleet_registration = resolved.fleet_registration;
                let census = self.engine.fleets().remember_census(census);
                Ok(answer(&census))
            }
            Some(Subject::WaveId(_)) => {
                let (id, changes) = wave_changes
                    .ok_or_else(|| ApiError::Internal("a wave census without its wave".into()))?;
                if bundle.is_none() {
                    bundle = Some(self.engine.bundle(&id)?);
                }
                let tenants = self.engine.wave_tenants(&id)?;
                let census = crate::census::take(
                    &format!("wave:{id}"),
                    tenants,
                    bundle,
                    &options,
                    reach,
                    crate::census::CensusTrigger::Request,
                )
                .await;
                if for_status {
                    let census = self
                        .engine
                        .fleets()
                        .remember_wave_census(&id, changes, census);
                    return Ok(answer(&census));
                }
                Ok(answer(&census))
            }
        }
    }

    async fn forget(&self, req: Request<v1::WaveActionRequest>) -> Result<(), ApiError> {
        let caller = self
            .auth
            .authorize(req.metadata(), Role::Operator, "forgetting a wave")?;
        let r = req.into_inner();
        let id = wave_id(&r.wave_id)?;
        let engine = self.engine.clone();
        off_runtime(move || engine.forget(&id, &caller.name, &r.reason)).await
    }
}

/// Why a registered fleet did not resolve, as a viewer may see it: the catalog's own
/// error text can echo what its rows hold, so a viewer learns only that it failed.
fn viewer_safe(e: ApiError, role: Role, fleet: &str) -> ApiError {
    match e {
        ApiError::Fleet(crate::fleet::FleetError::Targets { .. }) if role < Role::Operator => {
            ApiError::Fleet(crate::fleet::FleetError::Targets {
                name: fleet.to_string(),
                source: crate::target::TargetError::Source {
                    origin: "its source".into(),
                    message: "does not resolve now (an operator sees why with `fleet census` or `plan --fleet`)".into(),
                },
            })
        }
        other => other,
    }
}

/// A request's `wave_id`, checked for shape: empty or not a UUID is INVALID_ARGUMENT
/// naming the field, so NOT_FOUND only ever means "well-formed, but unknown".
/// Any spelling of a UUID is accepted and looked up in the canonical form (lowercase,
/// hyphenated) that the daemon gives out.
fn wave_id(id: &str) -> Result<String, ApiError> {
    if id.is_empty() {
        return Err(ApiError::Invalid("wave_id: missing".into()));
    }
    match uuid::Uuid::try_parse(id) {
        Ok(uuid) => Ok(uuid.hyphenated().to_string()),
        Err(_) => {
            let shown: String = id.chars().take(64).collect();
            Err(ApiError::Invalid(format!(
                "wave_id: {shown:?} is not a wave id (a UUID such as 019a…)"
            )))
        }
    }
}

/// Runs an engine call that writes (and flushes) the store on the blocking pool, so an
/// fsync never stalls the runtime threads that answer status calls and stream events.
async fn off_runtime<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, crate::wave::EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| ApiError::Internal(format!("an engine call did not finish: {e}")))?
        .map_err(ApiError::from)
}

/// Where a page starts and its size; the token is where the previous page ended (an
/// offset for waves, a tenant `seq` for tenants).
fn page(size: u32, token: &str, default: usize) -> Result<(usize, usize), ApiError> {
    let offset = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| {
            ApiError::Invalid(format!("page_token: {token:?} is not one we gave out"))
        })?
    };
    let size = match size as usize {
        0 => default,
        n => n.min(MAX_PAGE),
    };
    Ok((offset, size))
}

/// Sends the snapshot, then every event, until the wave settles, the client hangs up or
/// `draining` resolves. A watcher that falls behind gets a fresh snapshot from `resync`
/// instead of the events it missed.
async fn forward_events(
    snapshot: WaveStatus,
    mut events: broadcast::Receiver<crate::wave::WaveEvent>,
    resync: impl Fn() -> Result<WaveStatus, crate::wave::EngineError> + Send + 'static,
    draining: impl std::future::Future<Output = ()> + Send + 'static,
    tx: mpsc::Sender<Result<v1::WaveEvent, Status>>,
) {
    let send_snapshot = |s: &WaveStatus| convert::snapshot_event(s, now_ms());
    let first = send_snapshot(&snapshot);
    let done = snapshot.state.is_settled(snapshot.counts.running);
    if tx.send(Ok(first)).await.is_err() || done {
        return;
    }
    tokio::pin!(draining);
    loop {
        let event = tokio::select! {
            _ = &mut draining => {
                let _ = tx.send(Err(Status::unavailable(
                    "the daemon is shutting down; the wave resumes when it restarts, watch again then",
                ))).await;
                return;
            }
            _ = tx.closed() => return,
            received = events.recv() => match received {
                Ok(e) => convert::event(&e, now_ms()),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(wave = %snapshot.id, missed, "watcher lagged; resending a snapshot");
                    match resync() {
                        Ok(s) => send_snapshot(&s),
                        Err(e) => {
                            let _ = tx.send(Err(Status::from(ApiError::from(e)))).await;
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        let done = convert::event_settled(&event);
        if tx.send(Ok(event)).await.is_err() || done {
            return;
        }
    }
}

/// What one tenant would get, read from its own log; problems instead of errors, so one
/// unreachable tenant does not hide the plan of the others.
/// What an undo to `target` would run on one tenant (its log read, nothing run).
async fn plan_undo_tenant(
    bundle: &Bundle,
    tenant: &Tenant,
    target: &crate::bundle::Version,
    reach: &crate::reach::Reach,
) -> v1::TenantPlan {
    let mut out = v1::TenantPlan {
        tenant_id: tenant.id.clone(),
        ..Default::default()
    };
    let refuse = |out: &mut v1::TenantPlan, error: crate::apply::ApplyError| {
        let problem = convert::plan_problem(&error);
        out.problems.push(problem.message.clone());
        out.problem_details.push(problem);
    };
    let settings = Policy::default().session_settings();
    let rows = match crate::apply::read_log(&tenant.dsn, &settings, reach).await {
        Ok(rows) => rows,
        Err(e) => {
            refuse(&mut out, e);
            return out;
        }
    };
    match crate::apply::plan::plan_undo(bundle, &rows, Some(target)) {
        Ok(plan) => out.steps.extend(plan.steps.iter().map(|step| {
            let script = &bundle.scripts()[step.script];
            v1::PlannedStep {
                script: script.name.clone(),
                version: script
                    .kind
                    .undo_version()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                action: convert::plan_action_name(v1::PlanAction::Undo).to_string(),
                kind: v1::PlanAction::Undo as i32,
            }
        })),
        Err(e) => refuse(&mut out, e.into()),
    }
    out
}

async fn plan_tenant(
    bundle: &Bundle,
    tenant: &Tenant,
    options: PlanOptions,
    prior: Option<&crate::apply::Prior>,
    reach: &crate::reach::Reach,
) -> v1::TenantPlan {
    let mut out = v1::TenantPlan {
        tenant_id: tenant.id.clone(),
        ..Default::default()
    };
    let refuse = |out: &mut v1::TenantPlan, context: &str, error: crate::apply::ApplyError| {
        let mut problem = convert::plan_problem(&error);
        problem.message = format!("{context}{}", problem.message);
        out.problems.push(problem.message.clone());
        out.problem_details.push(problem);
    };
    let settings = Policy::default().session_settings();
    let mut rows = match crate::apply::read_log(&tenant.dsn, &settings, reach).await {
        Ok(rows) => rows,
        Err(e) => {
            refuse(&mut out, "cannot read the log: ", e);
            return out;
        }
    };
    // What the wave would record first, planned as if it had.
    match prior {
        Some(prior) if !rows.is_empty() => out.notes.push(format!(
            "would not baseline: the log already has {} rows ({prior} applies only to an empty log)",
            rows.len()
        )),
        Some(prior) => {
            match crate::apply::rehearse_prior(&tenant.dsn, &settings, reach, bundle, prior).await
            {
                Ok(decision) => {
                    out.notes.extend(decision.describe(prior, false));
                    out.steps.extend(decision.rows.iter().map(|r| v1::PlannedStep {
                        script: r.script.clone(),
                        version: r.version.clone().unwrap_or_default(),
                        action: convert::plan_action_name(v1::PlanAction::Baseline).to_string(),
                        kind: v1::PlanAction::Baseline as i32,
                    }));
                    rows = decision.log_rows();
                }
                Err(e) => {
                    refuse(&mut out, "", e);
                    return out;
                }
            }
        }
        None => {}
    }
    match crate::apply::plan::plan(bundle, &rows, options) {
        Ok(plan) => {
            // What the steps would touch, and how big it is here.
            let running: std::collections::HashSet<&str> = plan
                .steps
                .iter()
                .map(|s| bundle.scripts()[s.script].name.as_str())
                .collect();
            let mut touched: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for f in crate::bundle::safety::lint(bundle) {
                if let Some(table) = f.table.filter(|_| running.contains(f.script.as_str())) {
                    let rules = touched.entry(table).or_default();
                    if !rules.iter().any(|r| r == f.rule) {
                        rules.push(f.rule.to_string());
                    }
                }
            }
            if !touched.is_empty() {
                let tables: Vec<String> = touched.keys().cloned().collect();
                match crate::apply::table_sizes(&tenant.dsn, &settings, reach, &tables).await {
                    Ok(sizes) => {
                        out.touched = sizes
                            .into_iter()
                            .map(|(table, bytes)| v1::TouchedTable {
                                rules: touched.remove(&table).unwrap_or_default(),
                                table,
                                bytes,
                            })
                            .collect();
                    }
                    Err(e) => out.notes.push(format!("cannot read table sizes: {e}")),
                }
            }
            out.steps.extend(plan.steps.iter().map(|step| {
                let script = &bundle.scripts()[step.script];
                let kind = convert::plan_action(&step.action);
                v1::PlannedStep {
                    script: script.name.clone(),
                    version: script.version().map(|v| v.to_string()).unwrap_or_default(),
                    action: convert::plan_action_name(kind).to_string(),
                    kind: kind as i32,
                }
            }));
            out.notes.extend(plan.notes);
        }
        Err(e) => refuse(&mut out, "", e.into()),
    }
    out
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::WaveEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RolloutService for RolloutApi {
    async fn start_wave(
        &self,
        request: Request<v1::StartWaveRequest>,
    ) -> Result<Response<v1::StartWaveResponse>, Status> {
        let wave_id = self.start(request).await?;
        Ok(Response::new(v1::StartWaveResponse { wave_id }))
    }

    async fn get_wave(
        &self,
        request: Request<v1::GetWaveRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        Ok(Response::new(self.get(request)?))
    }

    async fn list_waves(
        &self,
        request: Request<v1::ListWavesRequest>,
    ) -> Result<Response<v1::ListWavesResponse>, Status> {
        Ok(Response::new(self.list(request)?))
    }

    async fn pause_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        Ok(Response::new(
            self.act(request, "pausing a wave", Engine::pause).await?,
        ))
    }

    async fn resume_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        let canary_failure = if request.get_ref().accept_canary_failure {
            crate::wave::CanaryFailure::Accept
        } else {
            crate::wave::CanaryFailure::Refuse
        };
        Ok(Response::new(
            self.act(
                request,
                "resuming a wave",
                move |engine, id, actor, reason| engine.resume(id, actor, reason, canary_failure),
            )
            .await?,
        ))
    }

    async fn approve_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        let accept_failures = request.get_ref().accept_failures;
        Ok(Response::new(
            self.act(
                request,
                "approving a stage",
                move |engine, id, actor, reason| engine.approve(id, actor, reason, accept_failures),
            )
            .await?,
        ))
    }

    async fn cancel_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        Ok(Response::new(
            self.act(request, "cancelling a wave", Engine::cancel)
                .await?,
        ))
    }

    async fn retry_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::Wave>, Status> {
        Ok(Response::new(
            self.act(request, "retrying a wave", Engine::retry).await?,
        ))
    }

    type WatchWaveStream = EventStream;

    async fn watch_wave(
        &self,
        request: Request<v1::WatchWaveRequest>,
    ) -> Result<Response<Self::WatchWaveStream>, Status> {
        Ok(Response::new(Box::pin(self.watch(request)?)))
    }

    async fn list_wave_tenants(
        &self,
        request: Request<v1::ListWaveTenantsRequest>,
    ) -> Result<Response<v1::ListWaveTenantsResponse>, Status> {
        Ok(Response::new(self.tenants(request).await?))
    }

    async fn plan(
        &self,
        request: Request<v1::PlanRequest>,
    ) -> Result<Response<v1::PlanResponse>, Status> {
        Ok(Response::new(self.dry_run(request).await?))
    }

    async fn get_tenant_log(
        &self,
        request: Request<v1::GetTenantLogRequest>,
    ) -> Result<Response<v1::GetTenantLogResponse>, Status> {
        Ok(Response::new(self.tenant_log(request).await?))
    }

    async fn forget_wave(
        &self,
        request: Request<v1::WaveActionRequest>,
    ) -> Result<Response<v1::ForgetWaveResponse>, Status> {
        self.forget(request).await?;
        Ok(Response::new(v1::ForgetWaveResponse {}))
    }

    async fn add_fleet(
        &self,
        request: Request<v1::AddFleetRequest>,
    ) -> Result<Response<v1::Fleet>, Status> {
        Ok(Response::new(self.register_fleet(request).await?))
    }

    async fn list_fleets(
        &self,
        request: Request<v1::ListFleetsRequest>,
    ) -> Result<Response<v1::ListFleetsResponse>, Status> {
        Ok(Response::new(self.fleet_list(request)?))
    }

    async fn get_fleet(
        &self,
        request: Request<v1::GetFleetRequest>,
    ) -> Result<Response<v1::Fleet>, Status> {
        Ok(Response::new(self.fleet_get(request)?))
    }

    async fn remove_fleet(
        &self,
        request: Request<v1::RemoveFleetRequest>,
    ) -> Result<Response<v1::RemoveFleetResponse>, Status> {
        self.fleet_remove(request).await?;
        Ok(Response::new(v1::RemoveFleetResponse {}))
    }

    async fn census(
        &self,
        request: Request<v1::CensusRequest>,
    ) -> Result<Response<v1::CensusReport>, Status> {
        Ok(Response::new(self.take_census(request).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wave::WaveState;
    use crate::wave::{Counts, WaveEvent};

    fn status(state: WaveState, succeeded: u64, running: u64) -> WaveStatus {
        WaveStatus {
            id: "w".into(),
            bundle_id: "b".into(),
            state,
            reason: None,
            counts: Counts {
                total: 10,
                pending: 10 - succeeded - running,
                running,
                succeeded,
                ..Counts::default()
            },
            policy: crate::policy::Policy::default(),
            created_at_ms: 0,
            history: Vec::new(),
            placeholders: Default::default(),
            waivers: Vec::new(),
            held: Vec::new(),
            fleet: None,
            stages: Vec::new(),
        }
    }

    fn event(s: &WaveStatus) -> WaveEvent {
        WaveEvent {
            wave_id: s.id.clone(),
            state: s.state,
            counts: s.counts,
            tenant: None,
        }
    }

    #[tokio::test]
    async fn a_lagging_watcher_gets_a_fresh_snapshot_and_the_stream_ends_when_settled() {
        let (events, rx) = broadcast::channel(2);
        // Five events into a buffer of two before the forwarder reads: it lags.
        for n in 1..=5 {
            events
                .send(event(&status(WaveState::Running, n, 1)))
                .expect("send");
        }
        let (tx, mut out) = mpsc::channel(16);
        let resynced = status(WaveState::Running, 7, 1);
        let task = tokio::spawn(forward_events(
            status(WaveState::Running, 0, 1),
            rx,
            move || Ok(resynced.clone()),
            std::future::pending(),
            tx,
        ));
        let first = out.recv().await.expect("snapshot").expect("ok");
        assert_eq!(first.tenants.map(|c| c.succeeded), Some(0));
        let resync = out.recv().await.expect("resync").expect("ok");
        assert_eq!(
            resync.tenants.map(|c| c.succeeded),
            Some(7),
            "the snapshot, not event 4"
        );
        assert!(resync.tenant.is_none(), "a snapshot carries no tenant");
        // What is still buffered follows, then the settling event ends the stream.
        let mut rest = Vec::new();
        events
            .send(event(&status(WaveState::Completed, 10, 0)))
            .expect("send");
        while let Some(e) = out.recv().await {
            rest.push(e.expect("ok"));
        }
        assert_eq!(
            rest.last().map(|e| e.state),
            Some(v1::WaveState::Completed as i32)
        );
        task.await.expect("forwarder ends");
    }

    #[tokio::test]
    async fn draining_ends_the_stream_with_unavailable() {
        let (_events, rx) = broadcast::channel::<WaveEvent>(4);
        let (tx, mut out) = mpsc::channel(4);
        tokio::spawn(forward_events(
            status(WaveState::Running, 0, 1),
            rx,
            || Err(crate::wave::EngineError::ShuttingDown),
            async {},
            tx,
        ));
        assert!(out.recv().await.expect("snapshot").is_ok());
        let end = out
            .recv()
            .await
            .expect("a last message")
            .expect_err("unavailable");
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(out.recv().await.is_none());
    }
}
