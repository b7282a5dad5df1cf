//! What a run measured: per-RPC counts, errors by gRPC status code and an HDR latency
//! histogram, rendered as text for people or as one JSON object for scripts.
//!
//! The JSON field names are a contract: scripts parse them. Add fields, never rename.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::Code;

use super::{Rpc, Workload};

/// Significant figures kept by the latency histograms: 0.1 % relative error, the usual HDR
/// setting. Histograms resize themselves, so no upper bound is guessed in advance.
const SIGFIG: u8 = 3;

/// Counts and latencies of one RPC (or of all of them), in microseconds.
#[derive(Debug, Clone)]
pub struct RpcStats {
    /// Requests answered (OK or not) in the measured phase.
    pub requests: u64,
    /// Requests answered OK.
    pub ok: u64,
    /// Errors by gRPC status code, indexed by the code's number.
    errors: [u64; 17],
    /// Latency of the OK requests, in microseconds.
    latency_us: Histogram<u64>,
}

impl Default for RpcStats {
    fn default() -> RpcStats {
        RpcStats::new()
    }
}

impl RpcStats {
    /// Empty stats.
    pub fn new() -> RpcStats {
        RpcStats {
            requests: 0,
            ok: 0,
            errors: [0; 17],
            // Cannot fail: 3 significant figures is within the crate's 0..=5.
            latency_us: Histogram::new(SIGFIG).expect("valid histogram precision"),
        }
    }

    /// Records an OK answer after `latency`.
    pub fn record_ok(&mut self, latency: Duration) {
        self.requests += 1;
        self.ok += 1;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // `record` grows the auto-resizing histogram as needed (`saturating_record` would
        // clamp instead); it can only fail if growing overflows usize, and then clamping is
        // the best left to do.
        if self.latency_us.record(micros).is_err() {
            self.latency_us.saturating_record(micros);
        }
    }

    /// Records an error answer. Its latency is not recorded: fast refusals (UNAVAILABLE,
    /// RESOURCE_EXHAUSTED) would otherwise make an overloaded vault look quick.
    pub fn record_error(&mut self, code: Code) {
        self.requests += 1;
        self.errors[code as usize] += 1;
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &RpcStats) {
        self.requests += other.requests;
        self.ok += other.ok;
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        // Both histograms auto-resize, so adding cannot run out of range.
        self.latency_us
            .add(&other.latency_us)
            .expect("auto-resizing histograms add");
    }

    /// Errors by status code name (`UNAVAILABLE`, …), only the codes that occurred.
    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(code, n)| (code_name(Code::from(code as i32)), *n))
            .collect()
    }

    /// Number of error answers.
    pub fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Latency summary in milliseconds; `None` when nothing succeeded.
    pub fn latency_ms(&self) -> Option<Latency> {
        let h = &self.latency_us;
        if h.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: round(h.mean() / 1000.0, 3),
        })
    }
}

/// Latency percentiles, maximum and mean, in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest OK request.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was sent.
    pub workload: Workload,
    /// The `--target` URI.
    pub target: String,
    /// Workers (requests in flight at most).
    pub concurrency: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Open-loop rate in requests per second; `None` for a closed loop.
    pub rate: Option<f64>,
    /// Length of the measured phase, until its last answer.
    pub duration: Duration,
    /// Per-RPC stats; one entry unless the workload is mixed.
    pub by_rpc: Vec<(Rpc, RpcStats)>,
    /// Open loop only: sends that left more than [`super::LATE_AFTER`] after their slot
    /// because every worker was busy (their wait is in the latencies).
    pub late_sends: Option<u64>,
    /// Open loop only: slots of the measured phase never sent because every worker was
    /// still busy when the phase ended.
    pub missed_sends: Option<u64>,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
}

impl Report {
    /// All RPCs together.
    pub fn total(&self) -> RpcStats {
        let mut total = RpcStats::new();
        for (_, stats) in &self.by_rpc {
            total.merge(stats);
        }
        total
    }

    /// Stats of one RPC, if it was sent.
    pub fn rpc(&self, rpc: Rpc) -> Option<&RpcStats> {
        self.by_rpc.iter().find(|(r, _)| *r == rpc).map(|(_, s)| s)
    }

    /// OK answers per second of the measured phase.
    pub fn throughput(&self, stats: &RpcStats) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            stats.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// The report as one JSON object (no trailing newline).
    pub fn to_json(&self) -> String {
        let total = self.total();
        let by_rpc = (self.workload == Workload::Mixed).then(|| {
            self.by_rpc
                .iter()
                .map(|(rpc, stats)| (rpc.name(), self.json_stats(stats)))
                .collect::<BTreeMap<_, _>>()
        });
        let json = JsonReport {
            rpc: self.workload.name(),
            target: &self.target,
            concurrency: self.concurrency,
            connections: self.connections,
            rate: self.rate,
            duration_s: round(self.duration.as_secs_f64(), 3),
            stats: self.json_stats(&total),
            by_rpc,
            late_sends: self.late_sends,
            missed_sends: self.missed_sends,
            interrupted: self.interrupted,
        };
        // Serializing plain structs, strings and numbers into a String cannot fail.
        serde_json::to_string(&json).expect("report serializes")
    }

    fn json_stats(&self, stats: &RpcStats) -> JsonStats {
        JsonStats {
            requests: stats.requests,
            ok: stats.ok,
            errors: stats.errors(),
            throughput_rps: round(self.throughput(stats), 1),
            latency_ms: stats.latency_ms(),
        }
    }

    /// The report for people, several lines ending in a newline.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mode = match self.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".to_owned(),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "cardvault-bench: {} against {}, {} workers over {} connections, {mode}{}",
            self.workload.name(),
            self.target,
            self.concurrency,
            self.connections,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
        );
        let _ = writeln!(
            out,
            "  duration    {:.2} s (measured phase)",
            self.duration.as_secs_f64()
        );
        let total = self.total();
        self.text_stats(&mut out, "", &total);
        if self.workload == Workload::Mixed {
            for (rpc, stats) in &self.by_rpc {
                let _ = writeln!(out, "  {}:", rpc.name());
                self.text_stats(&mut out, "  ", stats);
            }
        }
        if let (Some(late), Some(missed)) = (self.late_sends, self.missed_sends) {
            let _ = writeln!(
                out,
                "  schedule    {late} sends late, {missed} missed{}",
                if late + missed > 0 {
                    " (every worker was busy: raise --concurrency or lower --rate)"
                } else {
                    ""
                }
            );
        }
        out
    }

    fn text_stats(&self, out: &mut String, indent: &str, stats: &RpcStats) {
        let _ = writeln!(
            out,
            "{indent}  requests    {} ({} ok, {} errors)",
            stats.requests,
            stats.ok,
            stats.error_count()
        );
        let _ = writeln!(
            out,
            "{indent}  throughput  {:.1} ok/s",
            self.throughput(stats)
        );
        match stats.latency_ms() {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "{indent}  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean
                );
            }
            None => {
                let _ = writeln!(out, "{indent}  latency ms  - (no OK answers)");
            }
        }
        let errors = stats.errors();
        if !errors.is_empty() {
            let list: Vec<String> = errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
            let _ = writeln!(out, "{indent}  errors      {}", list.join(", "));
        }
    }
}

#[derive(Serialize)]
struct JsonReport<'a> {
    rpc: &'static str,
    target: &'a str,
    concurrency: usize,
    connections: usize,
    rate: Option<f64>,
    duration_s: f64,
    #[serde(flatten)]
    stats: JsonStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    by_rpc: Option<BTreeMap<&'static str, JsonStats>>,
    late_sends: Option<u64>,
    missed_sends: Option<u64>,
    interrupted: bool,
}

#[derive(Serialize)]
struct JsonStats {
    requests: u64,
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    throughput_rps: f64,
    latency_ms: Option<Latency>,
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// The canonical upper-case name of a gRPC status code, as in the gRPC spec and `grpcurl`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 000 OK requests of 1, 2, … 1 000 ms, plus errors.
    fn known_stats() -> RpcStats {
        let mut stats = RpcStats::new();
        for ms in 1..=1000 {
            stats.record_ok(Duration::from_millis(ms));
        }
        for _ in 0..6 {
            stats.record_error(Code::Unavailable);
        }
        stats.record_error(Code::NotFound);
        stats
    }

    fn report(workload: Workload, by_rpc: Vec<(Rpc, RpcStats)>) -> Report {
        Report {
            workload,
            target: "http://127.0.0.1:50051".to_owned(),
            concurrency: 32,
            connections: 4,
            rate: None,
            duration: Duration::from_millis(10_020),
            by_rpc,
            late_sends: None,
            missed_sends: None,
            interrupted: false,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        // 3 significant figures: within 0.1 % (plus the rounding to whole microseconds).
        (a - b).abs() <= b * 0.001 + 0.001
    }

    #[test]
    fn percentiles_of_a_known_histogram_are_within_its_precision() {
        let latency = known_stats().latency_ms().expect("samples");
        assert!(close(latency.p50, 500.0), "{latency:?}");
        assert!(close(latency.p90, 900.0), "{latency:?}");
        assert!(close(latency.p99, 990.0), "{latency:?}");
        assert!(close(latency.p999, 999.0), "{latency:?}");
        assert!(close(latency.max, 1000.0), "{latency:?}");
        assert!(close(latency.mean, 500.5), "{latency:?}");
    }

    #[test]
    fn errors_are_counted_by_status_code_name_and_not_timed() {
        let stats = known_stats();
        assert_eq!(stats.requests, 1007);
        assert_eq!(stats.ok, 1000);
        assert_eq!(stats.error_count(), 7);
        assert_eq!(
            stats.errors(),
            BTreeMap::from([("NOT_FOUND", 1), ("UNAVAILABLE", 6)])
        );
    }

    #[test]
    fn merged_stats_add_counts_and_samples() {
        let mut a = known_stats();
        a.merge(&known_stats());
        assert_eq!((a.requests, a.ok, a.error_count()), (2014, 2000, 14));
        assert!(close(a.latency_ms().expect("samples").p50, 500.0));
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let json = report(Workload::Tokenize, vec![(Rpc::Tokenize, known_stats())]).to_json();
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let object = value.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "concurrency",
                "connections",
                "duration_s",
                "errors",
                "interrupted",
                "late_sends",
                "latency_ms",
                "missed_sends",
                "ok",
                "rate",
                "requests",
                "rpc",
                "target",
                "throughput_rps",
            ]
        );
        assert_eq!(value["rpc"], "tokenize");
        assert_eq!(value["target"], "http://127.0.0.1:50051");
        assert_eq!(value["concurrency"], 32);
        assert_eq!(value["connections"], 4);
        assert!(value["rate"].is_null());
        assert_eq!(value["duration_s"], 10.02);
        assert_eq!(value["requests"], 1007);
        assert_eq!(value["ok"], 1000);
        assert_eq!(value["errors"]["UNAVAILABLE"], 6);
        assert_eq!(value["errors"]["NOT_FOUND"], 1);
        // 1000 OK in 10.02 s.
        assert_eq!(value["throughput_rps"], 99.8);
        let latency = value["latency_ms"].as_object().expect("latency object");
        let mut names: Vec<&str> = latency.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["max", "mean", "p50", "p90", "p99", "p999"]);
        assert!(close(latency["p99"].as_f64().expect("number"), 990.0));
        assert!(!json.contains('\n'), "one line");
    }

    #[test]
    fn mixed_json_adds_by_rpc_with_the_same_fields() {
        let report = report(
            Workload::Mixed,
            vec![
                (Rpc::Tokenize, known_stats()),
                (Rpc::Get, known_stats()),
                (Rpc::Reveal, RpcStats::new()),
            ],
        );
        let value: serde_json::Value = serde_json::from_str(&report.to_json()).expect("JSON");
        assert_eq!(value["rpc"], "mixed");
        assert_eq!(value["requests"], 2014);
        let by_rpc = value["by_rpc"].as_object().expect("by_rpc");
        assert_eq!(by_rpc.len(), 3);
        assert_eq!(by_rpc["get"]["ok"], 1000);
        assert_eq!(by_rpc["tokenize"]["requests"], 1007);
        assert!(by_rpc["tokenize"]["latency_ms"]["p50"].is_number());
        // Nothing answered OK: no made-up zero latencies.
        assert!(by_rpc["reveal"]["latency_ms"].is_null());
    }

    #[test]
    fn single_rpc_json_has_no_by_rpc() {
        let json = report(Workload::Reveal, vec![(Rpc::Reveal, known_stats())]).to_json();
        assert!(!json.contains("by_rpc"));
    }

    #[test]
    fn text_report_names_every_number() {
        let text = report(Workload::Tokenize, vec![(Rpc::Tokenize, known_stats())]).to_text();
        for needle in [
            "tokenize against http://127.0.0.1:50051",
            "10.02 s",
            "1007 (1000 ok, 7 errors)",
            "99.8 ok/s",
            "p99.9",
            "NOT_FOUND 1, UNAVAILABLE 6",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }

    #[test]
    fn every_code_has_its_grpc_name() {
        assert_eq!(code_name(Code::from(14)), "UNAVAILABLE");
        assert_eq!(code_name(Code::from(16)), "UNAUTHENTICATED");
        assert_eq!(code_name(Code::from(8)), "RESOURCE_EXHAUSTED");
    }
}
