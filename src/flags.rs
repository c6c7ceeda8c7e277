//! The parsers of command-line values (clap `value_parser`s) shared by the option structs of
//! several layers: durations, seconds, sizes and TXIDs. Each refuses a bad value with one
//! line that says what to give; none panics, whatever the input (`inf`, `NaN`, `1e30`).
//!
//! This file owns [`duration`], [`durations`], [`seconds`], [`size`], [`format_size`] (a
//! size as log lines print it) and [`txid`].

use std::time::Duration;

/// The longest duration a flag takes, in seconds (about 31 years): long enough for any
/// setting, short enough that adding it to a clock reading cannot overflow.
pub const MAX_SECONDS: u64 = 1_000_000_000;

/// A number of seconds, fractions allowed, from 0 to [`MAX_SECONDS`] (`--cache-ttl`).
pub fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|n| (0.0..=MAX_SECONDS as f64).contains(n))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds from 0 to {MAX_SECONDS}"))
}

/// `1s`, `500ms`, `2m`, `1h`, or a bare number of seconds; fractions allowed (`1.5s`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let not_a_duration = || format!("{s:?} is not a duration: use e.g. 1s, 500ms or 2m");
    // The first letter starts the unit, so `inf` and `NaN` never reach the number; a
    // huge one (`99999999999999999999s`) does, and is refused below.
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| !n.is_nan())
        .ok_or_else(not_a_duration)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if secs < 0.0 {
        return Err(format!("{s:?} must be zero or more"));
    }
    if secs > MAX_SECONDS as f64 {
        return Err(format!(
            "{s:?} is too long: at most {MAX_SECONDS}s (about 31 years)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Compaction intervals, one per level from 1, comma-separated: `30s,5m,1h`; at most 8,
/// each above zero.
pub fn durations(s: &str) -> Result<Vec<Duration>, String> {
    let v = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(duration)
        .collect::<Result<Vec<_>, _>>()?;
    if v.len() > 8 {
        return Err(format!("{s:?}: at most 8 levels; give e.g. 30s,5m,1h"));
    }
    if v.iter().any(|d| d.is_zero()) {
        return Err(format!(
            "{s:?}: each interval must be above zero; give e.g. 30s,5m,1h"
        ));
    }
    Ok(v)
}

/// The largest size a flag takes: 1 EiB.
pub const MAX_SIZE: u64 = 1 << 60;

/// A size in bytes, above zero: a number (fractions allowed) with an optional unit, `K`,
/// `M`, `G`, `T` or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024), `KB`, `MB`, `GB`, `TB`
/// (powers of 1000) or `B`; case does not matter (`512M`, `1.5GiB`, `4mb`, `1048576`).
pub fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let not_a_size = || format!("{s:?} is not a size: use e.g. 512M, 1G or 4MiB");
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| !n.is_nan())
        .ok_or_else(not_a_size)?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use K, M, G, T (or KiB, MiB, ...; KB, MB, ...)"
            ))
        }
    };
    let bytes = n * scale;
    if bytes < 1.0 {
        return Err(format!("{s:?} must be at least one byte"));
    }
    if bytes > MAX_SIZE as f64 {
        return Err(format!("{s:?} is too large: at most 1 EiB"));
    }
    Ok(bytes.round() as u64)
}

/// `bytes` as log lines print it: `512 B`, `4 MiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let text = format!("{v:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

/// A TXID, in one of three spellings that cannot be mistaken for each other:
/// - decimal: `42`, `1234567890123456`;
/// - Litestream's: exactly 16 hex digits, zero-padded, so starting with `0`:
///   `000000000000002a`;
/// - hex after `0x`: `0x2a`.
///
/// A 16-digit number that does not start with `0` is decimal.
pub fn txid(s: &str) -> Result<u64, String> {
    let hex = |h: &str| {
        (!h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(h, 16).ok())
            .flatten()
    };
    let parsed = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        hex(h)
    } else if s.len() == 16 && s.starts_with('0') {
        // Litestream's spelling, even when every digit is a decimal one.
        hex(s)
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    };
    parsed.ok_or_else(|| {
        format!(
            "{s:?} is not a TXID: give a decimal number, Litestream's 16 hex digits \
             (zero-padded, e.g. 000000000000002a) or hex after 0x (e.g. 0x2a)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txid_spellings() {
        // Decimal, including a 16-digit number that does not start with 0.
        assert_eq!(txid("0"), Ok(0));
        assert_eq!(txid("42"), Ok(42));
        assert_eq!(txid("1234567890123456"), Ok(1_234_567_890_123_456));
        assert_eq!(txid("9999999999999999"), Ok(9_999_999_999_999_999));
        assert_eq!(txid("18446744073709551615"), Ok(u64::MAX));
        // Litestream's 16 hex digits, zero-padded, with or without letters.
        assert_eq!(txid("000000000000002a"), Ok(42));
        assert_eq!(txid("000000000000002A"), Ok(42));
        assert_eq!(txid("0000000000000010"), Ok(16));
        assert_eq!(txid("0fffffffffffffff"), Ok(u64::MAX >> 4));
        // Hex after 0x, any length up to 16 digits.
        assert_eq!(txid("0x2a"), Ok(42));
        assert_eq!(txid("0X2A"), Ok(42));
        assert_eq!(txid("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(txid("0x000000000000002a"), Ok(42));
    }

    #[test]
    fn txid_rejections() {
        for bad in [
            "",
            "2a",
            "-1",
            "+42",
            " 42",
            "4.2",
            "0x",
            "0x-1",
            "0x+2a",
            "0xg",
            "0x10000000000000000",
            "18446744073709551616",
            // 16 hex digits that do not start with 0 are not Litestream's spelling.
            "a00000000000002a",
            "100000000000002a",
            // 15 or 17 characters with a hex letter.
            "00000000000002a",
            "0000000000000002a",
        ] {
            let e = txid(bad).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?} is not a TXID")), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn seconds_in_range() {
        assert_eq!(seconds("0"), Ok(Duration::ZERO));
        assert_eq!(seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(seconds("1"), Ok(Duration::from_secs(1)));
        assert_eq!(seconds("1e9"), Ok(Duration::from_secs(MAX_SECONDS)));
        for bad in [
            "inf", "-inf", "infinity", "NaN", "nan", "-1", "-0.5", "1e10", "1e300", "", "1s", "x",
        ] {
            assert_eq!(
                seconds(bad),
                Err(format!(
                    "{bad:?} is not a number of seconds from 0 to 1000000000"
                ))
            );
        }
    }

    #[test]
    fn durations_in_range() {
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            duration("1000000000s"),
            Ok(Duration::from_secs(MAX_SECONDS))
        );
        for bad in [
            "inf", "infinity", "NaN", "nan", "infs", "nanms", "x", "", "ms",
        ] {
            let e = duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
        assert_eq!(duration("-1s"), Err("\"-1s\" must be zero or more".into()));
        assert_eq!(
            duration("-inf"),
            Err("\"-inf\" is not a duration: use e.g. 1s, 500ms or 2m".into())
        );
        for big in ["1000000001", "99999999999999999999999s", "300000h"] {
            assert_eq!(
                duration(big),
                Err(format!(
                    "{big:?} is too long: at most 1000000000s (about 31 years)"
                ))
            );
        }
        assert_eq!(
            duration("2d"),
            Err("\"2d\": unknown unit \"d\"; use ms, s, m or h".into())
        );
        assert_eq!(
            durations("30s, 5m,1h"),
            Ok(vec![
                Duration::from_secs(30),
                Duration::from_secs(300),
                Duration::from_secs(3600)
            ])
        );
        assert!(durations("1s,0").unwrap_err().contains("above zero"));
        assert!(durations("1,2,3,4,5,6,7,8,9")
            .unwrap_err()
            .contains("at most 8"));
        assert!(durations("1s,9999999999").unwrap_err().contains("too long"));
    }

    #[test]
    fn sizes() {
        assert_eq!(size("1048576"), Ok(1 << 20));
        assert_eq!(size("1G"), Ok(1 << 30));
        assert_eq!(size("1g"), Ok(1 << 30));
        assert_eq!(size("4MiB"), Ok(4 << 20));
        assert_eq!(size("512K"), Ok(512 << 10));
        assert_eq!(size("1.5G"), Ok(3 << 29));
        assert_eq!(size("2T"), Ok(2 << 40));
        assert_eq!(size("1MB"), Ok(1_000_000));
        assert_eq!(size("3 kb"), Ok(3000));
        assert_eq!(size("100B"), Ok(100));
        for bad in ["", "x", "G", "inf", "nan", "-", "1..5M"] {
            let e = size(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
        assert!(size("0").unwrap_err().contains("at least one byte"));
        assert!(size("-1G").unwrap_err().contains("at least one byte"));
        assert!(size("2d").unwrap_err().contains("unknown unit"));
        assert!(size("2000000T").unwrap_err().contains("too large"));
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4 << 20), "4 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((4 << 20) + (1 << 19) + 12345), "4.5 MiB");
    }
}
