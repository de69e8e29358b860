//! What the daemon tells its operators besides the API: logs (tracing-subscriber, human
//! or JSON), traces (spans wave → tenant → script, exported over OTLP when the standard
//! `OTEL_EXPORTER_OTLP_*ENDPOINT` variables say where) and metrics ([`metrics`]: served
//! as Prometheus text on `--metrics-listen`, exported over OTLP when configured). With
//! no endpoint and no metrics listener, no exporter exists and the instruments are the
//! global no-ops. This module sets telemetry up and renders it; it never decides
//! anything about a wave.

pub mod metrics;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::LogFormat;

/// The service name traces and metrics carry unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "flotillad";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP {signal} exporter: {message}")]
    Otlp {
        signal: &'static str,
        message: String,
    },
    #[error("Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("logging is already set up: {0}")]
    Subscriber(String),
}

/// Live telemetry; flush it with [`Telemetry::shutdown`] before the process exits.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    registry: Option<prometheus::Registry>,
}

/// Renders the daemon's metrics in the Prometheus text format; cheap to clone into an
/// HTTP handler.
#[derive(Clone)]
pub struct PrometheusMetrics(prometheus::Registry);

impl PrometheusMetrics {
    /// Every metric, as `GET /metrics` serves it.
    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.0.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot render metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// True when the environment asks for OTLP export of `signal` (`TRACES`, `METRICS`).
pub fn otlp_requested(signal: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(SERVICE_NAME).build()
    }
}

impl Telemetry {
    /// Sets up logging, and traces and metrics where asked: `prometheus` when a metrics
    /// listener will serve [`Telemetry::prometheus`]. Must run inside a Tokio
    /// runtime (the OTLP exporters use tonic).
    pub fn init(log_format: LogFormat, prometheus: bool) -> Result<Self, TelemetryError> {
        let resource = resource();
        let tracer = if otlp_requested("TRACES") {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Otlp {
                    signal: "trace",
                    message: e.to_string(),
                })?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };

        let registry = prometheus.then(prometheus::Registry::new);
        let mut meter_builder = SdkMeterProvider::builder().with_resource(resource);
        let mut readers = 0;
        if let Some(registry) = &registry {
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .scope_info_enabled(false)
                .build()
                .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
            meter_builder = meter_builder.with_reader(exporter);
            readers += 1;
        }
        if otlp_requested("METRICS") {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Otlp {
                    signal: "metrics",
                    message: e.to_string(),
                })?;
            meter_builder = meter_builder.with_reader(PeriodicReader::builder(exporter).build());
            readers += 1;
        }
        let meter = (readers > 0).then(|| meter_builder.build());
        if let Some(provider) = &meter {
            opentelemetry::global::set_meter_provider(provider.clone());
        }

        // Logs follow RUST_LOG; spans for export are the library's own, at INFO, whatever
        // the log level, so turning logs down does not turn traces off.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let fmt = match log_format {
            LogFormat::Human => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
        };
        let otel = tracer.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(SERVICE_NAME))
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("flotilla", tracing::Level::INFO),
                )
        });
        tracing_subscriber::registry()
            .with(fmt)
            .with(otel)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        Ok(Self {
            tracer,
            meter,
            registry,
        })
    }

    /// The Prometheus side of the metrics, when a metrics listener was asked for.
    pub fn prometheus(&self) -> Option<PrometheusMetrics> {
        self.registry.clone().map(PrometheusMetrics)
    }

    /// Exports what is buffered and stops the exporters.
    pub fn shutdown(&self) {
        if let Some(tracer) = &self.tracer
            && let Err(e) = tracer.shutdown()
        {
            eprintln!("flotillad: flushing traces: {e}");
        }
        if let Some(meter) = &self.meter
            && let Err(e) = meter.shutdown()
        {
            eprintln!("flotillad: flushing metrics: {e}");
        }
    }
}
