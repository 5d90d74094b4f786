//! Sizes and durations as people write them: `64K`, `1G`, `500ms`, `30s`.
//!
//! - A size is a whole number of bytes with an optional binary unit: `K`/`KiB` = 2^10,
//!   `M`/`MiB` = 2^20, `G`/`GiB` = 2^30, `T`/`TiB` = 2^40, or `B` (case does not matter;
//!   `64 M` may hold a space). Fractions (`1.5G`) and decimal units (`MB`) are refused rather
//!   than guessed at: `1536M` says exactly what is meant.
//! - A duration is a whole number with a unit that is always required: `ns`, `us` (or `µs`),
//!   `ms`, `s`, `m`, `h`. A bare `30` could mean seconds or milliseconds, so it is refused.
//!
//! `format_size` and `format_duration` write the largest unit that divides the value exactly,
//! so `parse_*(format_*(x)) == x` for every value.

use std::time::Duration;

const SIZE_HINT: &str = "expected a size like 4096, 64K or 1G";
const DURATION_HINT: &str = "expected a duration like 30s, 500ms or 5m";

/// Binary units from the largest down; `format_size` uses the first that divides exactly.
const SIZE_UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];

const NANOS_PER_SEC: u128 = 1_000_000_000;
/// Duration units from the largest down, in nanoseconds.
const DURATION_UNITS: [(&str, u128); 6] = [
    ("h", 3600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Splits `"64 M"` into `("64", "M")`: leading ASCII digits, then the rest trimmed.
fn split_number(s: &str) -> (&str, &str) {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// Why `s` is not a number with a unit, phrased with `hint` (what a good value looks like).
fn malformed(s: &str, hint: &str, fraction_example: &str) -> String {
    let (digits, rest) = split_number(s);
    if !digits.is_empty() && rest.starts_with('.') {
        format!("{hint}, got {s:?} (use a smaller unit instead of a fraction, e.g. {fraction_example})")
    } else {
        format!("{hint}, got {s:?}")
    }
}

/// Parses a size in bytes: `4096`, `512K`, `64M`, `1G`, `2T`, `16MiB` (binary units).
///
/// The result is not checked against any alignment; callers that need a multiple of 4096
/// check that themselves (see `Config::validate`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = split_number(s);
    if digits.is_empty() {
        return Err(malformed(s, SIZE_HINT, "1536M, not 1.5G"));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(format!("{SIZE_HINT}, got {s:?} (units are binary: write K, M, G or T, or KiB, MiB, GiB, TiB)"))
        }
        _ => return Err(malformed(s, SIZE_HINT, "1536M, not 1.5G")),
    };
    let too_large = || format!("size {s:?} is too large (at most {} bytes)", u64::MAX);
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    n.checked_mul(1u64 << shift).ok_or_else(too_large)
}

/// Writes `bytes` with the largest binary unit that divides it exactly (`"1G"`, `"4097"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in SIZE_UNITS {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a duration: `500ms`, `30s`, `5m`, `1h` (also `ns`, `us`/`µs`). A unit is required.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = split_number(s);
    if digits.is_empty() {
        return Err(malformed(s, DURATION_HINT, "1500ms, not 1.5s"));
    }
    let per_unit = match unit {
        "" => return Err(format!("{DURATION_HINT}, got {s:?} (a unit is required)")),
        "µs" => 1_000,
        _ => match DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
            Some(&(_, nanos)) => nanos,
            None => return Err(malformed(s, DURATION_HINT, "1500ms, not 1.5s")),
        },
    };
    let too_large = || format!("duration {s:?} is too large");
    // u128 nanoseconds hold every `Duration` (at most about 1.8e28 ns), so anything that
    // formats back from a `Duration` parses, and only what no `Duration` holds overflows.
    let n: u128 = digits.parse().map_err(|_| too_large())?;
    let nanos = n.checked_mul(per_unit).ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
}

/// Writes `d` with the largest unit that divides it exactly (`"30s"`, `"1500ms"`, `"0s"`).
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    // `ns` (last, 1) divides every duration, so the fallback is never taken.
    let (unit, per_unit) = DURATION_UNITS.into_iter().find(|(_, n)| nanos.is_multiple_of(*n)).unwrap_or(("ns", 1));
    format!("{}{unit}", nanos / per_unit)
}

/// Serde adapters for the config structs: sizes read from a string or a TOML integer (bytes),
/// durations from a string; both are written as strings.
pub(crate) mod serde_size {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_size(*bytes))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a size like 4096, 64K or 1G")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("{}, got {v} (a size cannot be negative)", super::SIZE_HINT)))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v).map_err(E::custom)
        }
    }
}

pub(crate) mod serde_duration {
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration like 30s, 500ms or 5m")
        }

        // A bare number has no unit: say so rather than "invalid type: integer".
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            Err(E::custom(format!("{}, got {v} (a unit is required; durations are strings)", super::DURATION_HINT)))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Err(E::custom(format!("{}, got {v} (a unit is required; durations are strings)", super::DURATION_HINT)))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }
}
