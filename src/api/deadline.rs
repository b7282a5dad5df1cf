//! How long a unary call may take before its caller gives up on it: the caller's
//! `grpc-timeout` header, bounded by the server's own request timeout (the server cancels
//! the call at the earlier of the two), less a margin to send the answer in.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Most of the margin kept for answering: enough for a database read and the response.
const MAX_MARGIN: Duration = Duration::from_millis(500);

/// The time a handler has to produce its answer: the caller's deadline (`grpc-timeout`, if
/// present and readable) or the server's `request_timeout`, whichever is shorter, less a
/// tenth of it (at most [`MAX_MARGIN`]).
pub fn budget(metadata: &MetadataMap, request_timeout: Duration) -> Duration {
    let total = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(request_timeout, |caller| caller.min(request_timeout));
    total.saturating_sub((total / 10).min(MAX_MARGIN))
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub(crate) fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_refused_when_malformed() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "12", "1x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_budget_is_the_shorter_deadline_less_a_bounded_margin() {
        let mut metadata = MetadataMap::new();
        assert_eq!(
            budget(&metadata, Duration::from_secs(10)),
            Duration::from_millis(9_500)
        );
        metadata.insert("grpc-timeout", "2000m".parse().unwrap());
        assert_eq!(
            budget(&metadata, Duration::from_secs(10)),
            Duration::from_millis(1_800)
        );
        assert_eq!(
            budget(&metadata, Duration::from_secs(1)),
            Duration::from_millis(900)
        );
        metadata.insert("grpc-timeout", "nonsense".parse().unwrap());
        assert_eq!(
            budget(&metadata, Duration::from_secs(1)),
            Duration::from_millis(900)
        );
    }
}
