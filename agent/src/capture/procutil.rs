//! Small /proc readers shared by the capture modules (no procfs parsing of
//! whole structures where one field is enough).

use std::fs;
use std::io::{self, Read};
use std::path::Path;

/// The fields of a `/proc/PID[/task/TID]/stat` line after `comm`: index 0 is
/// the state (field 3 in proc(5)), index 19 the start time (field 22).
pub(crate) struct StatLine {
    /// `comm` (between the first '(' and the last ')').
    pub comm: String,
    /// Fields 3.. of proc(5), split on spaces.
    pub rest: Vec<String>,
}

impl StatLine {
    pub fn read(path: &Path) -> io::Result<StatLine> {
        let s = fs::read_to_string(path)?;
        Self::parse(&s).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat line"))
    }

    pub fn parse(s: &str) -> Option<StatLine> {
        let open = s.find('(')?;
        let close = s.rfind(')')?;
        let comm = s.get(open + 1..close)?.to_string();
        let rest = s
            .get(close + 1..)?
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>();
        if rest.len() < 20 {
            return None;
        }
        Some(StatLine { comm, rest })
    }

    /// Field `n` of proc(5) (1-based, n >= 3).
    pub fn field(&self, n: usize) -> &str {
        self.rest.get(n - 3).map(String::as_str).unwrap_or("")
    }

    pub fn num(&self, n: usize) -> i64 {
        self.field(n).parse().unwrap_or(0)
    }

    pub fn state(&self) -> char {
        self.field(3).chars().next().unwrap_or('?')
    }

    /// Start time in clock ticks since boot (field 22).
    pub fn start_time(&self) -> u64 {
        self.field(22).parse().unwrap_or(0)
    }
}

/// Start time (clock ticks since boot) of `pid`.
pub(crate) fn start_time(pid: i32) -> io::Result<u64> {
    Ok(StatLine::read(Path::new(&format!("/proc/{pid}/stat")))?.start_time())
}

/// The thread ids of `pid` (from /proc/PID/task).
pub(crate) fn thread_ids(pid: i32) -> io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// Reads at most `cap` bytes of a file; returns the bytes and whether more
/// was there.
pub(crate) fn read_capped(path: &Path, cap: usize) -> io::Result<(Vec<u8>, bool)> {
    let f = fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(cap as u64 + 1).read_to_end(&mut buf)?;
    let truncated = buf.len() > cap;
    buf.truncate(cap);
    Ok((buf, truncated))
}

/// Clock ticks per second (USER_HZ) for /proc times.
pub(crate) fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Page size of this machine.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// A clock reading in ns (CLOCK_MONOTONIC, CLOCK_BOOTTIME).
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_stat_line_with_odd_comm() {
        let s = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1000 100";
        let st = StatLine::parse(s).unwrap();
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!(st.state(), 'S');
        assert_eq!(st.num(4), 1);
        assert_eq!(st.start_time(), 12345);
        assert!(StatLine::parse("1 (x) S 1").is_none());
    }

    #[test]
    fn capture_self_threads_and_start() {
        let me = std::process::id() as i32;
        assert!(thread_ids(me).unwrap().contains(&me));
        assert!(start_time(me).unwrap() > 0);
    }
}
