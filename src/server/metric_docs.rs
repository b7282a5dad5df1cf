//! Descriptions and units of the metrics `/metrics` serves, registered once with the
//! recorder, and the build-info series.
//!
//! Label rules (see the README's metrics table): labels take values from fixed sets or
//! from configuration (gateway names), or are ids the vault makes itself (key job ids,
//! tenant ids on the rare honeytoken alarm); never a token, a card field, metadata or other
//! caller-supplied text.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Registers every description; call once, after the recorder is installed.
pub(super) fn describe() {
    describe_histogram!(
        "cardvault_db_pool_acquire_duration_seconds",
        Unit::Seconds,
        "Time to get a pooled database connection, failed attempts included, by backend."
    );
    describe_gauge!(
        "cardvault_db_pool_connections",
        Unit::Count,
        "Open database connections by state (idle, in_use)."
    );
    describe_gauge!(
        "cardvault_db_pool_max_connections",
        Unit::Count,
        "The most database connections the pool opens (database.max_connections)."
    );
    describe_gauge!(
        "cardvault_db_pool_waiters",
        Unit::Count,
        "Requests waiting for a database connection now."
    );
    describe_histogram!(
        "cardvault_db_batch_commit_duration_seconds",
        Unit::Seconds,
        "Time to commit one group-commit batch of cards and audit records, retries included, \
         by backend."
    );
    describe_histogram!(
        "cardvault_write_batch_size",
        Unit::Count,
        "Writes (cards and audit records) per group commit."
    );
    describe_counter!(
        "cardvault_dek_cache_hits_total",
        Unit::Count,
        "DEK cache lookups that found the unwrapped key."
    );
    describe_counter!(
        "cardvault_dek_cache_misses_total",
        Unit::Count,
        "DEK cache lookups that did not (the key provider unwraps the DEK)."
    );
    describe_counter!(
        "cardvault_dek_cache_evictions_total",
        Unit::Count,
        "Unwrapped DEKs pushed out of the cache by its capacity (keys.dek_cache_size)."
    );
    describe_histogram!(
        "cardvault_key_provider_request_duration_seconds",
        Unit::Seconds,
        "Key provider (local keyring or HSM) call latency by provider and operation."
    );
    describe_counter!(
        "cardvault_key_provider_errors_total",
        Unit::Count,
        "Failed key provider calls by provider and operation."
    );
    describe_gauge!(
        "cardvault_key_job_items_done",
        Unit::Count,
        "Items (keys rewrapped, records re-encrypted) a key job has processed, by kind and job_id."
    );
    describe_gauge!(
        "cardvault_key_job_items_expected",
        Unit::Count,
        "Items a key job has to process in all, by kind and job_id."
    );
    describe_counter!(
        "cardvault_charges_total",
        Unit::Count,
        "Charges entering a status (pending when created, then each settlement), by gateway \
         and status."
    );
    describe_counter!(
        "cardvault_gateway_requests_total",
        Unit::Count,
        "Charge requests sent to a payment gateway, by gateway and outcome."
    );
    describe_histogram!(
        "cardvault_gateway_latency_seconds",
        Unit::Seconds,
        "Charge request latency at a payment gateway, by gateway and outcome."
    );
    describe_histogram!(
        "cardvault_gateway_operation_latency_seconds",
        Unit::Seconds,
        "Capture, refund and cancel latency at a payment gateway, by gateway, operation and \
         outcome."
    );
    describe_histogram!(
        "cardvault_gateway_lookup_latency_seconds",
        Unit::Seconds,
        "Latency of asking a gateway about an earlier charge, by gateway and result."
    );
    describe_counter!(
        "cardvault_audit_appends_total",
        Unit::Count,
        "Audit records committed, by the audited event's outcome."
    );
    describe_counter!(
        "cardvault_audit_append_failures_total",
        Unit::Count,
        "Audit records lost with a failed transaction (their requests failed too)."
    );
    describe_counter!(
        "cardvault_audit_verify_failures_total",
        Unit::Count,
        "Audit checks that found the log tampered with, by check (head, chain)."
    );
    describe_counter!(
        "cardvault_honeytoken_accesses_total",
        Unit::Count,
        "Uses of a honeytoken (canary card), by tenant and action: a credential is compromised."
    );
    describe_gauge!(
        "cardvault_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "NotAfter of the served TLS certificate, in seconds since the Unix epoch, by listener."
    );
    describe_gauge!(
        "cardvault_build_info",
        "Always 1; the labels name the running build (version, git_sha)."
    );
}

/// Starts the counters alerts watch at 0: an alert on their increase then fires on the
/// first event too (a series born at 1 shows no increase).
pub(super) fn start_alerting_counters() {
    for check in ["head", "chain"] {
        metrics::counter!("cardvault_audit_verify_failures_total", "check" => check).increment(0);
    }
    metrics::counter!("cardvault_audit_append_failures_total").increment(0);
}

/// Sets `cardvault_build_info{version,git_sha} 1`, so a dashboard can tell which build
/// each replica runs (and join it onto other series).
pub(super) fn build_info() {
    metrics::gauge!(
        "cardvault_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => env!("BUILD_GIT_SHA"),
    )
    .set(1.0);
}
