//! Human formatting shared by the CLI's commands: sizes, durations, ages.

use std::time::{Duration, SystemTime};

/// Bytes as `df -h` shows them (1024-based, one decimal).
pub fn bytes(n: u64) -> String {
    crate::units::bytes(n)
}

/// A duration as `3d 4h`, `5m 12s` or `800ms`: the two largest units.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let parts = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = Vec::new();
    let mut rest = secs;
    for (size, unit) in parts {
        if rest >= size || !out.is_empty() {
            out.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
        if out.len() == 2 {
            break;
        }
    }
    out.join(" ")
}

/// How long ago a protobuf timestamp was, e.g. `5m 2s ago`.
pub fn age(ts: Option<&pbjson_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let then = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(ts.seconds).unwrap_or(0),
            u32::try_from(ts.nanos).unwrap_or(0),
        );
    match SystemTime::now().duration_since(then) {
        Ok(d) => format!("{} ago", duration(d)),
        Err(_) => "just now".into(),
    }
}

/// Parses a size such as `512M`, `2G`, `1.5Gi` or `1048576` (1024-based).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let shift = match unit
        .trim()
        .trim_end_matches(['i', 'B', 'b'])
        .to_ascii_uppercase()
        .as_str()
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    let bytes = number * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A protobuf timestamp as `2024-05-01 12:34:56Z` (UTC, no time zone database needed).
pub fn utc(ts: Option<&pbjson_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "-".into() };
    let days = ts.seconds.div_euclid(86_400);
    let secs = ts.seconds.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2Gi"), Some(2 << 30));
        assert_eq!(parse_size("1.5K"), Some(1536));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("10X"), None);
    }

    #[test]
    fn utc_times() {
        let ts = |seconds| pbjson_types::Timestamp { seconds, nanos: 0 };
        assert_eq!(utc(Some(&ts(0))), "1970-01-01 00:00:00Z");
        assert_eq!(utc(Some(&ts(1_714_566_896))), "2024-05-01 12:34:56Z");
        assert_eq!(utc(Some(&ts(951_782_400))), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_millis(800)), "800ms");
        assert_eq!(duration(Duration::from_secs(312)), "5m 12s");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)),
            "3d 4h"
        );
        assert_eq!(duration(Duration::from_secs(3600)), "1h 0m");
    }
}
