//! The optional Prometheus endpoint. Daemons record with the `metrics` crate's macros; without
//! `[metrics] listen` those calls cost next to nothing and go nowhere.

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::config::MetricsConfig;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {listen}: {message}")]
pub struct MetricsError {
    listen: String,
    message: String,
}

/// Starts the endpoint when configured. Must run inside a tokio runtime.
pub fn install(config: &MetricsConfig, daemon: &str) -> Result<(), MetricsError> {
    let Some(listen) = config.listen else {
        return Ok(());
    };
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .add_global_label("daemon", daemon)
        .install()
        .map_err(|err| MetricsError {
            listen: listen.to_string(),
            message: err.to_string(),
        })?;
    tracing::info!(%listen, "metrics endpoint listening");
    Ok(())
}
