//! Times in RFC 3339: written as Go's `time.RFC3339Nano` in UTC, as Litestream writes the
//! `litestream-timestamp` object metadata and as `walfs list` and `walfs restore` print
//! times; read with any offset and precision (that metadata, `walfs restore --timestamp`).

use std::time::SystemTime;

use chrono::{DateTime, Utc};

/// Formats a time as Go's `time.RFC3339Nano` in UTC: fractional seconds with trailing zeros
/// removed (none at all when zero), then `Z`.
pub fn format_rfc3339_nano(t: SystemTime) -> String {
    let dt: DateTime<Utc> = t.into();
    let mut s = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = dt.timestamp_subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Parses an RFC 3339 timestamp (any offset, any fractional precision).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|dt| SystemTime::from(dt.with_timezone(&Utc)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_nano_matches_go() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_rfc3339_nano(t), "2023-11-14T22:13:20.123Z");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_rfc3339_nano(t0), "2023-11-14T22:13:20Z");
        let t1 = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(format_rfc3339_nano(t1), "2023-11-14T22:13:20.12Z");
        let tn = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 1);
        assert_eq!(format_rfc3339_nano(tn), "2023-11-14T22:13:20.000000001Z");
        for t in [t, t0, t1, tn] {
            assert_eq!(parse_rfc3339(&format_rfc3339_nano(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.123+01:00"), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
