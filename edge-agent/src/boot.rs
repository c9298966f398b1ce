//! The machine's boot clock: time since the machine started, which steps of
//! the wall clock (an NTP correction, a clock set by hand) do not move, and
//! which goes on across an agent's restart. A run's time limit counts on it.

use std::time::Duration;

use ud_schemas::Millis;

/// This boot and a time on its clock: `<boot id> <ms since boot>`.
pub fn stamp() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    Some(format!("{} {}", id.trim(), uptime_ms(&uptime)?))
}

/// Milliseconds since boot from `/proc/uptime` ("12345.67 54321.00").
fn uptime_ms(text: &str) -> Option<u64> {
    let secs = text.split_whitespace().next()?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
    Some(whole.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?)
}

/// How long a run has been going: on the boot clock when it started in
/// this boot (`then` and `now` are [`stamp`]s), otherwise on the wall clock
/// (`started_at` and `wall_now`, ms since the epoch).
pub fn elapsed(
    then: Option<&str>,
    now: Option<&str>,
    started_at: Millis,
    wall_now: Millis,
) -> Duration {
    let parse = |s: &str| {
        let (id, ms) = s.split_once(' ')?;
        Some((id.to_owned(), ms.parse::<u64>().ok()?))
    };
    match (then.and_then(parse), now.and_then(parse)) {
        (Some((boot, a)), Some((same, b))) if boot == same => {
            Duration::from_millis(b.saturating_sub(a))
        }
        _ => Duration::from_millis(u64::try_from(wall_now - started_at).unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_as_milliseconds() {
        assert_eq!(uptime_ms("12345.67 54321.00\n"), Some(12_345_670));
        assert_eq!(uptime_ms("7.5 1.0"), Some(7_500));
        assert_eq!(uptime_ms("3 1"), Some(3_000));
        assert_eq!(uptime_ms(""), None);
    }

    #[test]
    fn this_boot_counts_on_the_boot_clock_whatever_the_wall_clock_says() {
        // Started at 100 s after boot; now 106 s: 6 s, though the wall
        // clock, set 9 minutes ahead when the run started, says otherwise.
        let then = Some("b1 100000");
        let now = Some("b1 106000");
        assert_eq!(
            elapsed(then, now, 540_000 + 1_000, 7_000),
            Duration::from_secs(6)
        );
        // Another boot (or no stamp): the wall clock is all there is.
        assert_eq!(
            elapsed(Some("b0 100000"), now, 1_000, 7_000),
            Duration::from_secs(6)
        );
        assert_eq!(elapsed(None, now, 1_000, 4_000), Duration::from_secs(3));
        // A wall clock gone back never makes a run younger than new.
        assert_eq!(elapsed(None, None, 9_000, 4_000), Duration::ZERO);
    }

    #[test]
    fn this_machine_has_a_boot_clock() {
        let a = stamp().expect("a Linux boot clock");
        assert!(elapsed(Some(&a), stamp().as_deref(), 0, 0) < Duration::from_secs(5));
    }
}
