//! Traces and metrics leave the daemon over OTLP when the standard environment asks: a
//! small OTLP/gRPC receiver in the test collects what a real `flotillad` exports during
//! a wave and checks one span per tenant, with the attributes an operator searches by.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla::api::v1;
use flotilla_testkit::{Daemon, shared};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    metric_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metric_names.lock().expect("lock");
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn attributes(span: &Span) -> BTreeMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// The password of one tenant's connection string (a role that does not exist).
const SECRET: &str = "Otter-otel-Secret-73";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_tenant_with_its_attributes_reaches_an_otlp_receiver() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let cluster = shared();
    let dbs = cluster
        .create_tenants("otel_", 5, "")
        .await
        .expect("tenants");
    // One tenant already has the table V1 creates: it fails with 42P07.
    let broken = cluster.connect(&dbs[4]).await.expect("connect");
    broken
        .batch_execute("CREATE TABLE items (id int)")
        .await
        .expect("conflicting table");

    let data = tempfile::tempdir().expect("data dir");
    let daemon = Daemon::start_with_env(
        data.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    )
    .expect("daemon");
    let mut client = v1::rollout_service_client::RolloutServiceClient::connect(daemon.url())
        .await
        .expect("connect");
    let bundle = flotilla::bundle::Bundle::from_sources(
        &[
            (
                "V1__items.sql",
                "CREATE TABLE items (id bigint PRIMARY KEY);",
            ),
            ("V2__name.sql", "ALTER TABLE items ADD COLUMN name text;"),
        ],
        "otel test",
    )
    .expect("bundle");
    let wave_id = client
        .start_wave(v1::StartWaveRequest {
            bundle: Some(flotilla::api::convert::bundle_to_proto(&bundle)),
            targets: Some(v1::start_wave_request::Targets::TargetList(
                v1::TargetList {
                    tenants: dbs
                        .iter()
                        .map(|db| v1::Tenant {
                            tenant_id: db.clone(),
                            dsn: cluster.url(db),
                            labels: Default::default(),
                        })
                        .chain([v1::Tenant {
                            tenant_id: "otel_secret".into(),
                            dsn: cluster.url_with_password(&dbs[0], "otel_nobody", SECRET),
                            labels: Default::default(),
                        }])
                        .collect(),
                },
            )),
            policy: Some(v1::Policy {
                concurrency: 2,
                max_failures: Some(v1::policy::MaxFailures::MaxFailuresUnlimited(true)),
                ..Default::default()
            }),
        })
        .await
        .expect("start")
        .into_inner()
        .wave_id;

    let deadline = Instant::now() + Duration::from_secs(60);
    let tenant_spans = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let tenants: Vec<Span> = spans.into_iter().filter(|s| s.name == "tenant").collect();
        let metrics = receiver.metric_names.lock().expect("lock").clone();
        if tenants.len() >= 6 && metrics.iter().any(|m| m == "flotilla_tenant_runs") {
            break tenants;
        }
        assert!(
            Instant::now() < deadline,
            "waited for 6 tenant spans and the run counter; got {} spans, metrics {metrics:?}\n{}",
            tenants.len(),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(tenant_spans.len(), 6, "one span per tenant run");
    let mut seen = Vec::new();
    for span in &tenant_spans {
        let a = attributes(span);
        assert_eq!(a.get("wave_id"), Some(&wave_id), "{a:?}");
        assert_eq!(a.get("host"), Some(&cluster.host()), "{a:?}");
        assert_eq!(a.get("attempt").map(String::as_str), Some("1"), "{a:?}");
        let tenant = a.get("tenant_id").cloned().expect("tenant_id");
        if tenant == "otel_secret" {
            assert!(a.contains_key("error"), "the failure is on the span: {a:?}");
        } else if tenant == dbs[4] {
            assert_eq!(
                a.get("sqlstate").map(String::as_str),
                Some("42P07"),
                "{a:?}"
            );
            assert_eq!(
                a.get("failed_script").map(String::as_str),
                Some("V1__items.sql"),
                "{a:?}"
            );
        } else {
            assert_eq!(a.get("sqlstate"), None, "{a:?}");
            assert_eq!(
                a.get("decision").map(String::as_str),
                Some("succeeded"),
                "{a:?}"
            );
        }
        seen.push(tenant);
    }
    seen.sort();
    let mut expected = dbs.clone();
    expected.push("otel_secret".into());
    expected.sort();
    assert_eq!(seen, expected);

    // A password in a connection string appears in no exported span.
    let spans = receiver.spans.lock().expect("lock").clone();
    for span in &spans {
        let text = format!("{} {:?}", span.name, attributes(span));
        assert!(!text.contains(SECRET), "password in span {text}");
    }

    // Script spans hang under their tenant's span.
    let tenant_ids: Vec<&Vec<u8>> = tenant_spans.iter().map(|s| &s.span_id).collect();
    let scripts: Vec<&Span> = spans.iter().filter(|s| s.name == "script").collect();
    assert!(!scripts.is_empty(), "script spans exported");
    assert!(
        scripts
            .iter()
            .all(|s| tenant_ids.contains(&&s.parent_span_id)),
        "every script span is a child of a tenant span"
    );
    // One span per message of scripts; a failure names its script.
    assert!(scripts.iter().any(|s| {
        let a = attributes(s);
        a.get("failed_script").map(String::as_str) == Some("V1__items.sql")
            && a.get("sqlstate").map(String::as_str) == Some("42P07")
    }));
}
