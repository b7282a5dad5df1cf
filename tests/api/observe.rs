//! Per-RPC metrics on `/metrics` after real calls: a request counter and a latency histogram
//! per service, method and status name, for successes and failures alike, with no card data
//! in any series.

use tonic::Code;

use crate::{
    errors::http_get,
    helpers::{Backend, spawn_app, tokenize_request, unique_pan},
    on_both_backends,
};

on_both_backends!(per_rpc_series_count_calls_by_method_and_status);

/// The value of the series whose line starts with `prefix` and holds every one of `labels`.
fn series(metrics: &str, prefix: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn per_rpc_series_count_calls_by_method_and_status(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let pan = unique_pan();
    app.client
        .tokenize(tokenize_request(&pan))
        .await
        .expect("tokenize");
    let mut bad = pan.clone();
    bad.pop();
    bad.push(if pan.ends_with('0') { '1' } else { '0' });
    let refused = app
        .client
        .tokenize(tokenize_request(&bad))
        .await
        .expect_err("a PAN failing the Luhn check is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);

    let metrics = http_get(app.admin_addr, "/metrics").await;
    let tokenize = ["service=\"cardvault.v1.CardVault\"", "method=\"Tokenize\""];
    let ok = [tokenize[0], tokenize[1], "code=\"OK\""];
    let invalid = [tokenize[0], tokenize[1], "code=\"INVALID_ARGUMENT\""];
    for labels in [&ok, &invalid] {
        let count = series(&metrics, "cardvault_grpc_server_requests_total{", labels)
            .unwrap_or_else(|| panic!("no request series {labels:?}:\n{metrics}"));
        assert!(count >= 1.0, "{labels:?}: {count}");
        let observed = series(
            &metrics,
            "cardvault_grpc_server_request_duration_seconds_count{",
            labels,
        )
        .unwrap_or_else(|| panic!("no duration series {labels:?}:\n{metrics}"));
        assert!(observed >= 1.0);
    }
    // Buckets when the admin port configures `_seconds` histograms with them; Prometheus
    // quantiles (the exporter's default rendering) otherwise.
    assert!(
        metrics.lines().any(|l| {
            (l.starts_with("cardvault_grpc_server_request_duration_seconds_bucket{")
                || (l.starts_with("cardvault_grpc_server_request_duration_seconds{")
                    && l.contains("quantile=")))
                && ok.iter().all(|label| l.contains(label))
        }),
        "the duration histogram has no buckets:\n{metrics}"
    );
    assert!(!metrics.contains(&pan));
    assert!(!metrics.contains(&bad));
    app.stop().await;
}
