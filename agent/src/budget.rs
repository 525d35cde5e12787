//! Bounds on what a flood of detections can cost the node: how many
//! captures a workload or a user gets per window ([`CaptureBudget`], with a
//! separate reserve for critical detections), how much disk captures may
//! hold ([`disk_usage`]), and how repeats of one detection collapse into one
//! ([`Aggregator`]).

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::model::Repeat;

/// Capture budget settings.
#[derive(Clone, Debug)]
pub struct BudgetOptions {
    /// Length of a budget window.
    pub window: Duration,
    /// Captures per workload per window (non-critical detections).
    pub per_workload: u32,
    /// Captures per uid per window (non-critical detections).
    pub per_uid: u32,
    /// Captures per workload per window for critical detections, counted
    /// apart: a flood of lesser ones never uses it up.
    pub critical_per_workload: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Workload(String),
    Uid(u32),
    Critical(String),
}

struct Window {
    start: Instant,
    used: u32,
}

/// Why a capture was refused (a metric label and a log word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The workload used its captures for this window.
    Workload,
    /// The user used its captures for this window.
    Uid,
    /// Critical captures of this workload used their reserve.
    CriticalReserve,
    /// The capture directory is at its disk budget.
    Disk,
}

impl Refusal {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Workload => "workload_budget",
            Refusal::Uid => "uid_budget",
            Refusal::CriticalReserve => "critical_reserve",
            Refusal::Disk => "disk_budget",
        }
    }
}

/// Per-window capture counts (bounded: at most 4,096 keys tracked; an
/// evicted key starts a fresh window, which only ever allows more).
pub struct CaptureBudget {
    opts: BudgetOptions,
    windows: LruCache<Key, Window>,
}

impl CaptureBudget {
    /// An empty budget.
    pub fn new(opts: BudgetOptions) -> Self {
        CaptureBudget {
            opts,
            windows: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        }
    }

    fn room(&mut self, key: &Key, limit: u32, now: Instant) -> bool {
        let window = self.opts.window;
        match self.windows.get_mut(key) {
            Some(w) if now.duration_since(w.start) < window => w.used < limit,
            _ => limit > 0,
        }
    }

    fn take(&mut self, key: Key, now: Instant) {
        let window = self.opts.window;
        match self.windows.get_mut(&key) {
            Some(w) if now.duration_since(w.start) < window => w.used += 1,
            _ => {
                self.windows.put(
                    key,
                    Window {
                        start: now,
                        used: 1,
                    },
                );
            }
        }
    }

    /// Takes one capture for a detection of `workload` by `uid`, or says
    /// why not. Critical detections draw only on their own reserve.
    pub fn admit(
        &mut self,
        workload: &str,
        uid: u32,
        critical: bool,
        now: Instant,
    ) -> Result<(), Refusal> {
        if critical {
            let k = Key::Critical(workload.to_string());
            if !self.room(&k, self.opts.critical_per_workload, now) {
                return Err(Refusal::CriticalReserve);
            }
            self.take(k, now);
            return Ok(());
        }
        let wk = Key::Workload(workload.to_string());
        let uk = Key::Uid(uid);
        if !self.room(&wk, self.opts.per_workload, now) {
            return Err(Refusal::Workload);
        }
        if !self.room(&uk, self.opts.per_uid, now) {
            return Err(Refusal::Uid);
        }
        self.take(wk, now);
        self.take(uk, now);
        Ok(())
    }
}

/// Bytes of the regular files under `dir` (recursively; symlinks not
/// followed; unreadable entries count 0). Captures are rare, so this walks
/// the directory each time rather than keeping a count that could drift.
pub fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

/// How repeats of one detection collapse: the first `emit_first` of a key
/// in a window are reported one by one, the rest are counted and reported
/// once, as one detection carrying the count and the first and last time,
/// when the window ends.
#[derive(Clone, Debug)]
pub struct AggregateOptions {
    /// Window length.
    pub window: Duration,
    /// Occurrences reported individually per key and window (at least 1:
    /// the first is always reported at once).
    pub emit_first: u32,
    /// The same for high and critical detections.
    pub emit_first_high: u32,
}

impl Default for AggregateOptions {
    fn default() -> Self {
        AggregateOptions {
            window: Duration::from_secs(60),
            emit_first: 3,
            emit_first_high: 20,
        }
    }
}

struct Tally<D> {
    start: Instant,
    /// Occurrences reported one by one in this window.
    limit: u32,
    count: u64,
    first: String,
    last: String,
    /// The last occurrence not reported individually.
    sample: Option<D>,
}

/// Collapses repeats. `K` is the repeat key, `D` the detection.
pub struct Aggregator<K: std::hash::Hash + Eq, D> {
    opts: AggregateOptions,
    tallies: LruCache<K, Tally<D>>,
}

impl<K: std::hash::Hash + Eq + Clone, D> Aggregator<K, D> {
    /// An empty aggregator tracking at most `capacity` keys.
    pub fn new(opts: AggregateOptions, capacity: usize) -> Self {
        Aggregator {
            opts,
            tallies: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
        }
    }

    /// Records one occurrence at `time` (`high`: a high or critical
    /// detection): `Some` when it is to be reported now, `None` when it was
    /// folded into the tally. A key whose window ended is returned in
    /// `ended` (with its sample) before the new window starts.
    pub fn observe(
        &mut self,
        key: K,
        time: &str,
        d: D,
        high: bool,
        now: Instant,
        ended: &mut Vec<(D, Repeat)>,
    ) -> Option<D> {
        let window = self.opts.window;
        if let Some(t) = self.tallies.get(&key) {
            if now.duration_since(t.start) >= window {
                if let Some(t) = self.tallies.pop(&key) {
                    if let Some(r) = self.close(t) {
                        ended.push(r);
                    }
                }
            }
        }
        match self.tallies.get_mut(&key) {
            Some(t) => {
                t.count += 1;
                t.last = time.to_string();
                if t.count > t.limit as u64 {
                    t.sample = Some(d);
                    return None;
                }
                Some(d)
            }
            None => {
                let t = Tally {
                    start: now,
                    limit: if high {
                        self.opts.emit_first_high
                    } else {
                        self.opts.emit_first
                    },
                    count: 1,
                    first: time.to_string(),
                    last: time.to_string(),
                    sample: None,
                };
                if let Some((_, old)) = self.tallies.push(key, t) {
                    if let Some(r) = self.close(old) {
                        ended.push(r);
                    }
                }
                Some(d)
            }
        }
    }

    /// The tallies whose window ended by `now` (those with suppressed
    /// occurrences become reports; the rest are forgotten).
    pub fn expire(&mut self, now: Instant) -> Vec<(D, Repeat)> {
        let window = self.opts.window;
        let done: Vec<K> = self
            .tallies
            .iter()
            .filter(|(_, t)| now.duration_since(t.start) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for k in done {
            if let Some(t) = self.tallies.pop(&k) {
                if let Some(r) = self.close(t) {
                    out.push(r);
                }
            }
        }
        out
    }

    /// Everything still tallied (at shutdown).
    pub fn drain(&mut self) -> Vec<(D, Repeat)> {
        let mut out = Vec::new();
        while let Some((_, t)) = self.tallies.pop_lru() {
            if let Some(r) = self.close(t) {
                out.push(r);
            }
        }
        out
    }

    fn close(&self, t: Tally<D>) -> Option<(D, Repeat)> {
        let suppressed = t.count.saturating_sub(t.limit as u64);
        let sample = t.sample?;
        Some((
            sample,
            Repeat {
                count: t.count,
                suppressed,
                first: t.first,
                last: t.last,
                window_secs: self.opts.window.as_secs(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> CaptureBudget {
        CaptureBudget::new(BudgetOptions {
            window: Duration::from_secs(60),
            per_workload: 3,
            per_uid: 5,
            critical_per_workload: 2,
        })
    }

    #[test]
    fn workload_budget_refuses_past_its_count_and_refills_next_window() {
        let mut b = budget();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.admit("pod-a", 1000, false, t0), Ok(()));
        }
        assert_eq!(b.admit("pod-a", 1000, false, t0), Err(Refusal::Workload));
        // Another workload of the same user still has room, up to the
        // user's own limit (5 in all).
        assert_eq!(b.admit("pod-b", 1000, false, t0), Ok(()));
        assert_eq!(b.admit("pod-b", 1000, false, t0), Ok(()));
        assert_eq!(b.admit("pod-c", 1000, false, t0), Err(Refusal::Uid));
        // Next window.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(b.admit("pod-a", 1000, false, t1), Ok(()));
    }

    #[test]
    fn critical_detections_draw_on_their_own_reserve() {
        let mut b = budget();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.admit("web", 33, false, t0).unwrap();
        }
        assert_eq!(b.admit("web", 33, false, t0), Err(Refusal::Workload));
        // The flood used the ordinary budget up; criticals still go.
        assert_eq!(b.admit("web", 33, true, t0), Ok(()));
        assert_eq!(b.admit("web", 33, true, t0), Ok(()));
        assert_eq!(b.admit("web", 33, true, t0), Err(Refusal::CriticalReserve));
    }

    #[test]
    fn repeats_collapse_into_one_report_with_count_and_times() {
        let mut a: Aggregator<&str, u32> = Aggregator::new(
            AggregateOptions {
                window: Duration::from_secs(60),
                emit_first: 2,
                emit_first_high: 5,
            },
            16,
        );
        let t0 = Instant::now();
        let mut ended = Vec::new();
        let mut emitted = 0;
        for i in 0..10u32 {
            if a.observe("k", &format!("t{i}"), i, false, t0, &mut ended)
                .is_some()
            {
                emitted += 1;
            }
        }
        // A different key is not affected.
        assert_eq!(a.observe("other", "x", 99, false, t0, &mut ended), Some(99));
        // High ones are reported one by one for longer.
        let high = (0..10u32)
            .filter(|&i| a.observe("h", "t", i, true, t0, &mut ended).is_some())
            .count();
        assert_eq!(high, 5);
        assert_eq!(emitted, 2);
        assert!(ended.is_empty());
        assert!(a.expire(t0 + Duration::from_secs(30)).is_empty());
        let out = a.expire(t0 + Duration::from_secs(60));
        assert_eq!(out.len(), 2, "only the keys with suppressed repeats report");
        assert!(out.iter().any(|(_, r)| r.count == 10 && r.suppressed == 5));
        let (sample, r) = out.iter().find(|(_, r)| r.suppressed == 8).unwrap();
        assert_eq!(*sample, 9);
        assert_eq!(r.count, 10);
        assert_eq!(r.suppressed, 8);
        assert_eq!((r.first.as_str(), r.last.as_str()), ("t0", "t9"));
        // A new window starts fresh.
        assert_eq!(
            a.observe(
                "k",
                "t10",
                10,
                false,
                t0 + Duration::from_secs(61),
                &mut ended
            ),
            Some(10)
        );
    }

    #[test]
    fn an_occurrence_after_the_window_closes_the_old_tally_first() {
        let mut a: Aggregator<&str, u32> = Aggregator::new(
            AggregateOptions {
                window: Duration::from_secs(10),
                emit_first: 1,
                emit_first_high: 1,
            },
            16,
        );
        let t0 = Instant::now();
        let mut ended = Vec::new();
        assert!(a.observe("k", "a", 1, false, t0, &mut ended).is_some());
        assert!(a.observe("k", "b", 2, false, t0, &mut ended).is_none());
        assert!(a
            .observe("k", "c", 3, false, t0 + Duration::from_secs(11), &mut ended)
            .is_some());
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1.count, 2);
    }

    #[test]
    fn disk_usage_counts_files_recursively() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/b"), vec![0u8; 24]).unwrap();
        assert_eq!(disk_usage(d.path()), 1024);
        assert_eq!(disk_usage(&d.path().join("missing")), 0);
    }
}
