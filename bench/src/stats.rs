//! Small helpers for figures.

use std::time::Duration;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

pub fn line(name: &str, value: f64, unit: &str, ceiling: Option<(f64, &str)>) {
    match ceiling {
        Some((c, what)) => println!(
            "{name:<52} {value:>12.1} {unit:<8} ratio {:.2} of {what} ({c:.1})",
            value / c.max(1e-9)
        ),
        None => println!("{name:<52} {value:>12.1} {unit}"),
    }
}
