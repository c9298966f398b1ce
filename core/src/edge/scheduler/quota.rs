//! Compute quotas per project: what a project's live tasks may hold at once,
//! and the GPU-hours its runs may use in a calendar month (UTC). A task over
//! its project's quota waits, saying which limit holds it; it never fails.

use std::collections::HashMap;

use chrono::{Datelike, TimeZone, Utc};
use ud_schemas::{Millis, ProjectId, Resources, TaskId};

pub use ud_schemas::api::QuotaRecord;

/// One project's limits (each absent: no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub max_tasks: Option<u32>,
    pub max_cpu_millis: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_gpus: Option<u32>,
    pub gpu_hours_per_month: Option<u32>,
}

impl From<&QuotaRecord> for Quota {
    fn from(r: &QuotaRecord) -> Self {
        Self {
            max_tasks: r.max_tasks,
            max_cpu_millis: r.max_cpu_millis,
            max_memory_mb: r.max_memory_mb,
            max_gpus: r.max_gpus,
            gpu_hours_per_month: r.gpu_hours_per_month,
        }
    }
}

/// The quotas set, by project.
#[derive(Clone, Debug, Default)]
pub struct Quotas(HashMap<String, Quota>);

impl Quotas {
    pub fn get(&self, project: &str) -> Option<&Quota> {
        self.0.get(project)
    }

    /// A project's quota (`None`: no quota any more).
    pub fn set(&mut self, project: &str, quota: Option<Quota>) {
        match quota {
            Some(q) => self.0.insert(project.to_owned(), q),
            None => self.0.remove(project),
        };
    }
}

/// What a project's live tasks (and those being placed) hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub tasks: u32,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub gpus: u32,
}

impl Held {
    pub fn add(&mut self, r: &Resources) {
        self.tasks += 1;
        self.cpu_millis += u64::from(r.cpu_millis);
        self.memory_mb += r.memory_mb;
        self.gpus += r.gpus;
    }
}

/// Why a task asking for `req` waits for its project's quota, as (kind,
/// reason): the kind names the limit alone (a task is told again only when
/// it changes), the reason says it for people. `None`: within the quota.
pub fn over(
    project: &str,
    quota: &Quota,
    held: &Held,
    req: &Resources,
    gpu_ms_this_month: u64,
) -> Option<(String, String)> {
    let wait = |what: &str, reason: String| Some((format!("quota {what}"), reason));
    // Asking alone for more than a limit: it waits until the quota is raised.
    let alone = |max: u64, asks: u64| {
        if asks > max {
            "; it asks for more than the quota allows at all"
        } else {
            ""
        }
    };
    if let Some(max) = quota.max_tasks {
        if held.tasks + 1 > max {
            return wait(
                "tasks",
                format!("project {project} is at its quota of {max} tasks at once"),
            );
        }
    }
    if let Some(max) = quota.max_gpus {
        if req.gpus > 0 && held.gpus + req.gpus > max {
            return wait(
                "gpus",
                format!(
                    "project {project} holds {} of its quota of {max} GPUs; this task asks for {}{}",
                    held.gpus,
                    req.gpus,
                    alone(u64::from(max), u64::from(req.gpus))
                ),
            );
        }
    }
    if let Some(max) = quota.max_cpu_millis {
        if held.cpu_millis + u64::from(req.cpu_millis) > max {
            return wait(
                "cpus",
                format!(
                    "project {project} holds {} of its quota of {} CPUs; this task asks for {}{}",
                    cpus(held.cpu_millis),
                    cpus(max),
                    cpus(u64::from(req.cpu_millis)),
                    alone(max, u64::from(req.cpu_millis))
                ),
            );
        }
    }
    if let Some(max) = quota.max_memory_mb {
        if held.memory_mb + req.memory_mb > max {
            return wait(
                "memory",
                format!(
                    "project {project} holds {} MiB of its quota of {max} MiB of memory; this task asks for {} MiB{}",
                    held.memory_mb,
                    req.memory_mb,
                    alone(max, req.memory_mb)
                ),
            );
        }
    }
    if let Some(hours) = quota.gpu_hours_per_month {
        if req.gpus > 0 && gpu_ms_this_month >= u64::from(hours) * HOUR_MS {
            return wait(
                "gpu-hours",
                format!(
                    "project {project} used {:.1} of its {hours} GPU-hours this month",
                    gpu_ms_this_month as f64 / HOUR_MS as f64
                ),
            );
        }
    }
    None
}

fn cpus(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{:.1}", millis as f64 / 1000.0)
    }
}

const HOUR_MS: u64 = 3_600_000;

/// Months since January 1970 (UTC) of a time, and where that month begins.
fn month_of(at: Millis) -> (u32, Millis) {
    let t = Utc.timestamp_millis_opt(at).single().unwrap_or_default();
    let index = (t.year() - 1970).max(0) as u32 * 12 + t.month0();
    let start = Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .map_or(0, |s| s.timestamp_millis());
    (index, start)
}

/// GPU time of runs per project and month, folded from task events: a run
/// holds its GPUs from its start until its task leaves the live states.
#[derive(Clone, Debug, Default)]
pub struct GpuTime {
    /// Runs holding GPUs: their project, GPU count and start.
    open: HashMap<TaskId, (ProjectId, u32, Millis)>,
    /// GPU-milliseconds of ended runs, by project and month.
    closed: HashMap<(ProjectId, u32), u64>,
}

impl GpuTime {
    /// A run of `task` started at `at` with `gpus` GPUs.
    pub fn start(&mut self, task: TaskId, project: &ProjectId, gpus: u32, at: Millis) {
        self.stop(task, at);
        if gpus > 0 {
            self.open.insert(task, (project.clone(), gpus, at));
        }
    }

    /// The run of `task`, if any, ended at `at`.
    pub fn stop(&mut self, task: TaskId, at: Millis) {
        let Some((project, gpus, from)) = self.open.remove(&task) else {
            return;
        };
        for (month, ms) in split(from, at) {
            *self.closed.entry((project.clone(), month)).or_default() += ms * u64::from(gpus);
        }
    }

    /// GPU-milliseconds `project` used in the month of `now`, runs still
    /// going included.
    pub fn used(&self, project: &str, now: Millis) -> u64 {
        let (month, start) = month_of(now);
        let closed = self
            .closed
            .iter()
            .filter(|((p, m), _)| p.as_str() == project && *m == month)
            .map(|(_, ms)| *ms)
            .sum::<u64>();
        let open = self
            .open
            .values()
            .filter(|(p, _, _)| p.as_str() == project)
            .map(|(_, gpus, from)| span((*from).max(start), now) * u64::from(*gpus))
            .sum::<u64>();
        closed + open
    }

    /// Drops months before the one of `now`.
    pub fn prune(&mut self, now: Millis) {
        let (month, _) = month_of(now);
        self.closed.retain(|(_, m), _| *m >= month);
    }
}

/// The milliseconds from `from` to `until` in each month they span, as
/// (month, milliseconds), months counted from January 1970 (UTC).
pub fn split(mut from: Millis, until: Millis) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    while from < until {
        let (month, _) = month_of(from);
        let end = until.min(month_start(month + 1));
        out.push((month, span(from, end)));
        from = end;
    }
    out
}

/// A month as `YYYY-MM`.
pub fn month_name(month: u32) -> String {
    format!("{:04}-{:02}", 1970 + month / 12, month % 12 + 1)
}

/// The month of a time (see [`split`]) and where it begins.
pub fn month_at(at: Millis) -> (u32, Millis) {
    month_of(at)
}

/// Milliseconds from `from` to `until` (none when it is not after it).
fn span(from: Millis, until: Millis) -> u64 {
    u64::try_from(until.saturating_sub(from)).unwrap_or(0)
}

fn month_start(index: u32) -> Millis {
    let (year, month0) = (1970 + i32::try_from(index / 12).unwrap_or(0), index % 12);
    Utc.with_ymd_and_hms(year, month0 + 1, 1, 0, 0, 0)
        .single()
        .map_or(Millis::MAX, |s| s.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cpu_millis: u32, memory_mb: u64, gpus: u32) -> Resources {
        let mut r = crate::task::tests::spec().resources;
        (r.cpu_millis, r.memory_mb, r.gpus) = (cpu_millis, memory_mb, gpus);
        r
    }

    fn at(y: i32, m: u32, d: u32, h: u32) -> Millis {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
            .single()
            .map_or(0, |t| t.timestamp_millis())
    }

    #[test]
    fn each_limit_holds_a_task_that_would_pass_it_and_names_it() {
        let q = Quota {
            max_tasks: Some(3),
            max_cpu_millis: Some(4000),
            max_memory_mb: Some(8192),
            max_gpus: Some(2),
            gpu_hours_per_month: Some(10),
        };
        let mut held = Held::default();
        assert_eq!(over("lab", &q, &held, &req(1000, 1024, 1), 0), None);
        held.add(&req(1000, 1024, 1));
        held.add(&req(1000, 1024, 1));
        let (kind, reason) = over("lab", &q, &held, &req(1000, 1024, 1), 0).unwrap();
        assert_eq!(kind, "quota gpus");
        assert!(
            reason.contains("holds 2 of its quota of 2 GPUs"),
            "{reason}"
        );
        // A CPU-only task still fits next to them.
        assert_eq!(over("lab", &q, &held, &req(1000, 1024, 0), 0), None);
        let (kind, reason) = over("lab", &q, &held, &req(2500, 1024, 0), 0).unwrap();
        assert_eq!(kind, "quota cpus");
        assert!(
            reason.contains("holds 2 of its quota of 4 CPUs; this task asks for 2.5"),
            "{reason}"
        );
        let (kind, _) = over("lab", &q, &held, &req(500, 7000, 0), 0).unwrap();
        assert_eq!(kind, "quota memory");
        let (_, reason) = over("lab", &q, &Held::default(), &req(0, 0, 3), 0).unwrap();
        assert!(
            reason.ends_with("it asks for more than the quota allows at all"),
            "{reason}"
        );
        held.add(&req(0, 0, 0));
        let (kind, reason) = over("lab", &q, &held, &req(0, 0, 0), 0).unwrap();
        assert_eq!(kind, "quota tasks");
        assert!(reason.contains("quota of 3 tasks"), "{reason}");
    }

    #[test]
    fn gpu_hours_hold_gpu_tasks_only() {
        let q = Quota {
            gpu_hours_per_month: Some(10),
            ..Default::default()
        };
        let held = Held::default();
        let spent = 10 * HOUR_MS;
        let (kind, reason) = over("lab", &q, &held, &req(0, 0, 1), spent).unwrap();
        assert_eq!(kind, "quota gpu-hours");
        assert!(reason.contains("used 10.0 of its 10 GPU-hours"), "{reason}");
        assert_eq!(over("lab", &q, &held, &req(0, 0, 1), spent - 1), None);
        assert_eq!(over("lab", &q, &held, &req(1000, 0, 0), spent), None);
    }

    #[test]
    fn gpu_time_counts_per_month_and_splits_a_run_across_months() {
        let mut t = GpuTime::default();
        let (lab, other): (ProjectId, ProjectId) =
            ("lab".parse().unwrap(), "other".parse().unwrap());
        let (a, b, c) = (TaskId::new(), TaskId::new(), TaskId::new());
        // Two GPUs from 22:00 on 30 November to 02:00 on 1 December.
        t.start(a, &lab, 2, at(2026, 11, 30, 22));
        t.stop(a, at(2026, 12, 1, 2));
        assert_eq!(t.used("lab", at(2026, 12, 1, 3)), 2 * 2 * HOUR_MS);
        assert_eq!(t.used("lab", at(2026, 11, 30, 23)), 2 * 2 * HOUR_MS);
        // A run still going counts up to now; another project's does not.
        t.start(b, &lab, 1, at(2026, 12, 2, 0));
        t.start(c, &other, 4, at(2026, 12, 2, 0));
        assert_eq!(t.used("lab", at(2026, 12, 2, 5)), (4 + 5) * HOUR_MS);
        // A task without GPUs holds none; starting again ends the run before.
        t.start(b, &lab, 0, at(2026, 12, 2, 6));
        assert_eq!(t.used("lab", at(2026, 12, 3, 0)), (4 + 6) * HOUR_MS);
        assert_eq!(
            split(at(2026, 11, 30, 22), at(2026, 12, 1, 2))
                .into_iter()
                .map(|(m, ms)| (month_name(m), ms))
                .collect::<Vec<_>>(),
            [
                ("2026-11".to_owned(), 2 * HOUR_MS),
                ("2026-12".to_owned(), 2 * HOUR_MS)
            ]
        );
        t.prune(at(2027, 1, 1, 0));
        assert_eq!(t.used("lab", at(2027, 1, 1, 0)), 0);
        assert_eq!(t.used("other", at(2027, 1, 1, 1)), 4 * HOUR_MS);
    }
}
