//! The agent's shared data model: the types every stage passes on, and
//! nothing else. Stages import from here; this module imports no stage
//! (checked by `tests::model_is_a_leaf`).
//!
//! - [`event`]: what the decoder makes of a kernel record ([`Event`]);
//! - [`workload`]: which container, pod, unit or session a process is in;
//! - [`Image`], [`ProcessView`], [`Ancestor`], [`EnrichedEvent`]: an event
//!   with its process and ancestry, as the process tree knows them;
//! - [`Severity`], [`Finding`], [`Detection`], [`Repeat`]: what detection
//!   says about an event;
//! - [`boot_ns_now`]: the clock kernel timestamps are in.

pub mod event;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod workload;

use std::sync::{Arc, Weak};

use serde::Serialize;

pub use event::{Event, Payload};
pub use workload::Workload;

/// What a process runs: its executable and arguments. The tree keeps one
/// per exec (shared by a forked child until it execs itself) behind an
/// `Arc`, and every event, ancestry and detection that names the process
/// shares it: nothing on the event path copies a command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// Executable path ("" if unknown, e.g. kernel threads).
    pub exe: String,
    /// Arguments.
    pub argv: Vec<String>,
    /// The system program the executable is a copy of (see
    /// [`event::Exec::copy_of`]).
    pub copy_of: Option<String>,
}

impl Image {
    /// A shared image.
    pub fn new(exe: String, argv: Vec<String>) -> Arc<Image> {
        Arc::new(Image {
            exe,
            argv,
            copy_of: None,
        })
    }

    /// What the program is, for classification: the system program it is
    /// a copy of, else its own path.
    pub fn identity(&self) -> &str {
        self.copy_of.as_deref().unwrap_or(&self.exe)
    }
}

/// Something a stage derives from an image (its JSON, its shape), kept
/// for the images seen last: a direct-mapped cache of `slots` entries
/// keyed by the shared image itself (the same `Arc`, not an equal image).
/// An entry holds a `Weak` of its image: the image's strings are freed
/// when the tree lets it go, while its allocation stays, so no other image
/// can take its address while it is cached. Memory is bounded by `slots`
/// (and what each value holds), not by the process tree. A slot's value
/// is handed back to `fill` when another image takes the slot, so a value
/// with buffers can reuse them.
pub struct PerImage<T> {
    slots: Vec<Option<(Weak<Image>, T)>>,
}

impl<T: Default> PerImage<T> {
    /// A cache of `slots` entries (at least one).
    pub fn new(slots: usize) -> Self {
        Self {
            slots: std::iter::repeat_with(|| None).take(slots.max(1)).collect(),
        }
    }

    /// What `fill` derives from `image`, made at most once while cached.
    /// `fill` overwrites the value it is given (a previous image's, or a
    /// default one).
    pub fn get(&mut self, image: &Arc<Image>, fill: impl FnOnce(&Image, &mut T)) -> &T {
        // An image's data sits 16 bytes into a 16-aligned allocation: the
        // bits above the low four spread.
        let ptr = Arc::as_ptr(image);
        let i = (ptr as usize >> 4) % self.slots.len();
        let slot = &mut self.slots[i];
        let fresh = !matches!(slot, Some((cached, _)) if std::ptr::eq(cached.as_ptr(), ptr));
        let (cached, value) = slot.get_or_insert_with(|| (Arc::downgrade(image), T::default()));
        if fresh {
            *cached = Arc::downgrade(image);
            fill(image, value);
        }
        value
    }
}

/// The process an event is about, as the tree knows it. Serialized as
/// `{pid, ppid, exe, comm, argv, uid, euid, workload}`.
#[derive(Clone, Debug)]
pub struct ProcessView {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Executable and arguments (shared with the tree).
    pub image: Arc<Image>,
    /// comm.
    pub comm: String,
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Workload identity.
    pub workload: Arc<Workload>,
}

impl Serialize for ProcessView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("ProcessView", 8)?;
        m.serialize_field("pid", &self.pid)?;
        m.serialize_field("ppid", &self.ppid)?;
        m.serialize_field("exe", &self.image.exe)?;
        m.serialize_field("comm", &self.comm)?;
        m.serialize_field("argv", &self.image.argv)?;
        m.serialize_field("uid", &self.uid)?;
        m.serialize_field("euid", &self.euid)?;
        m.serialize_field("workload", &*self.workload)?;
        m.end()
    }
}

/// An event with its process and ancestry: what sinks receive.
#[derive(Clone, Debug, Serialize)]
pub struct EnrichedEvent {
    /// Wall-clock time of the event, ns since the Unix epoch; written as
    /// `time`, RFC 3339 (see [`EnrichedEvent::time`]).
    #[serde(rename = "time", serialize_with = "serialize_wall_time")]
    pub time_unix_nanos: i64,
    /// The decoded event (shared with the timeline and the detections
    /// that name it).
    #[serde(flatten)]
    pub event: Arc<Event>,
    /// The subject process.
    pub process: ProcessView,
    /// Its ancestors, parent first, up to init.
    pub ancestry: Vec<Ancestor>,
}

impl EnrichedEvent {
    /// RFC 3339 wall-clock time of the event (see [`wall_time`]).
    pub fn time(&self) -> String {
        wall_time(self.time_unix_nanos)
    }
}

fn serialize_wall_time<S: serde::Serializer>(ns: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(rfc3339(*ns).as_str())
}

/// One ancestor in an event's ancestry. Serialized as `{pid, exe, argv}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ancestor {
    /// Process id.
    pub pid: u32,
    /// Executable and arguments (shared with the tree).
    pub image: Arc<Image>,
}

impl Serialize for Ancestor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("Ancestor", 3)?;
        m.serialize_field("pid", &self.pid)?;
        m.serialize_field("exe", &self.image.exe)?;
        m.serialize_field("argv", &self.image.argv)?;
        m.end()
    }
}

/// How bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Unusual, worth a look.
    Low,
    /// Suspicious.
    Medium,
    /// Likely malicious.
    High,
    /// Malicious.
    Critical,
}

/// What a rule found about one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// Stable rule id.
    pub rule: String,
    /// "builtin" or "sigma".
    pub source: &'static str,
    /// Severity.
    pub severity: Severity,
    /// MITRE ATT&CK technique ids.
    pub mitre: Vec<String>,
    /// One sentence for a human.
    pub summary: String,
    /// Never suppressed by the baseline (masquerade, fileless, reverse shell,
    /// miner, and everything critical).
    pub never_suppress: bool,
    /// What the baseline learns/matches for this finding when the event is
    /// not an exec (exec findings use the exec edge).
    pub object: String,
}

/// One detection: the output contract of `--detections-json`.
#[derive(Clone, Debug, Serialize)]
pub struct Detection {
    /// Event time (RFC 3339).
    pub time: String,
    /// When the agent decided (RFC 3339).
    pub detected_at: String,
    /// From the kernel event to the decision, in ns.
    pub latency_ns: u64,
    /// Stable rule id.
    pub rule: String,
    /// "builtin" or "sigma".
    pub rule_source: &'static str,
    /// Severity.
    pub severity: Severity,
    /// MITRE ATT&CK technique ids.
    pub mitre: Vec<String>,
    /// One sentence for a human.
    pub summary: String,
    /// The process that triggered it.
    pub process: ProcessView,
    /// Its ancestors, parent first.
    pub ancestry: Vec<Ancestor>,
    /// The triggering event (shared with the enriched event).
    pub event: Arc<Event>,
    /// Evidence captured for this detection (filled by the capture stage).
    pub evidence: Option<serde_json::Value>,
    /// Set on the one detection that stands for repeats of the same
    /// (rule, workload, executable, argv shape) within a window: how many,
    /// and the first and last time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeat: Option<Repeat>,
}

/// An absolute path with `.` and `..` resolved lexically (`/a/./b/../c`
/// -> `/a/c`); a relative path is returned as is.
pub fn normalize_path(p: &str) -> String {
    if !p.starts_with('/') {
        return p.to_string();
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// CLOCK_REALTIME minus CLOCK_BOOTTIME, in ns: added to a kernel stamp,
/// the wall-clock time of the event.
pub fn wall_offset_ns() -> i128 {
    let boot = boot_ns_now() as i128;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - boot
}

/// RFC 3339 of `ns` since the Unix epoch (before it: the epoch), with
/// nanoseconds: `2026-12-02T10:00:00.000000123Z`, as
/// `humantime::format_rfc3339_nanos` writes it (checked by a test).
pub fn wall_time(ns: i64) -> String {
    rfc3339(ns).as_str().to_owned()
}

/// [`wall_time`] without an allocation: every event line carries one.
pub fn rfc3339(ns: i64) -> Rfc3339 {
    let ns = ns.max(0) as u64;
    let (secs, nanos) = (ns / 1_000_000_000, ns % 1_000_000_000);
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm, for days >= 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, day_secs / 3_600);
    put(14, 2, day_secs / 60 % 60);
    put(17, 2, day_secs % 60);
    put(20, 9, nanos);
    Rfc3339(b)
}

/// A time as RFC 3339 with nanoseconds, in place (see [`rfc3339`]).
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; 30]);

impl Rfc3339 {
    /// The text.
    pub fn as_str(&self) -> &str {
        // ASCII digits and separators only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Nanoseconds since the Unix epoch of an RFC 3339 time as [`wall_time`]
/// writes it.
pub fn parse_rfc3339_nanos(s: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

/// CLOCK_BOOTTIME now, ns.
pub fn boot_ns_now() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The instant, on this process's monotonic clock, at which something
/// stamped `boot_ns` (CLOCK_BOOTTIME, the kernel's event clock) happened.
/// `now` for a stamp of 0 (unknown) or one in the future.
pub fn event_instant(boot_ns: u64) -> std::time::Instant {
    let now = std::time::Instant::now();
    if boot_ns == 0 {
        return now;
    }
    let age = boot_ns_now().saturating_sub(boot_ns);
    now.checked_sub(std::time::Duration::from_nanos(age))
        .unwrap_or(now)
}

/// A repeated detection's tally, as reported at the end of its window.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct Repeat {
    /// Occurrences in the window, the individually reported ones included.
    pub count: u64,
    /// Occurrences not reported one by one.
    pub suppressed: u64,
    /// Event time of the first occurrence (RFC 3339).
    pub first: String,
    /// Event time of the last occurrence (RFC 3339).
    pub last: String,
    /// Window length in seconds.
    pub window_secs: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_are_resolved_lexically() {
        // A script run as `./x` from /srv/app must name the file the
        // provenance of /srv/app/x knows.
        assert_eq!(super::normalize_path("/srv/app/./x"), "/srv/app/x");
        assert_eq!(super::normalize_path("/srv/app/../b//c/"), "/srv/b/c");
        assert_eq!(super::normalize_path("/.."), "/");
        assert_eq!(super::normalize_path("rel/./x"), "rel/./x");
    }

    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::{Duration, Instant};

    #[test]
    fn per_image_derives_once_per_shared_image() {
        use super::{Image, PerImage};
        use std::cell::Cell;
        use std::sync::Arc;
        let made = Cell::new(0);
        let get = |c: &mut PerImage<String>, i: &Arc<Image>| {
            c.get(i, |i, v| {
                made.set(made.get() + 1);
                v.clear();
                v.push_str(&i.exe);
            })
            .clone()
        };
        let mut cache = PerImage::new(4);
        let a = Image::new("/a".into(), vec![]);
        assert_eq!(get(&mut cache, &a), "/a");
        assert_eq!(get(&mut cache, &a), "/a");
        assert_eq!(made.get(), 1, "derived once while cached");
        // An equal image is another process's: derived anew.
        let equal = Image::new("/a".into(), vec![]);
        assert_eq!(get(&mut cache, &equal), "/a");
        assert_eq!(made.get(), 2);
        // The cache holds no image alive.
        assert_eq!(Arc::strong_count(&a), 1);
        // Many images through 4 slots, some dropped on the way: each gets
        // its own value, whatever it evicts or whoever held its slot.
        let mut many: Vec<_> = (0..64)
            .map(|n| Image::new(format!("/{n}"), vec![]))
            .collect();
        for (n, i) in many.iter().enumerate() {
            assert_eq!(get(&mut cache, i), format!("/{n}"));
        }
        many.truncate(8);
        let later: Vec<_> = (64..128)
            .map(|n| Image::new(format!("/{n}"), vec![]))
            .collect();
        for (n, i) in many.iter().enumerate().chain((64..).zip(later.iter())) {
            assert_eq!(get(&mut cache, i), format!("/{n}"));
        }
    }

    #[test]
    fn wall_time_is_humantimes_rfc3339() {
        let humantime = |ns: i64| {
            humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64),
            )
            .to_string()
        };
        let day = 86_400_000_000_000i64;
        let mut cases = vec![
            -5,
            0,
            1,
            999_999_999,
            1_796_205_600_000_000_123,
            951_782_400 * 1_000_000_000,         // 2000-02-29
            4_107_542_400 * 1_000_000_000 - 1,   // 2100-02-28T23:59:59.999999999
            4_107_542_400 * 1_000_000_000 + day, // 2100-03-02 (no 29th)
            i64::MAX,
        ];
        // Every day of 1969-2100 at a varying time of day.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for d in 0..48_000i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(d * day + (x % day as u64) as i64);
        }
        for ns in cases {
            assert_eq!(super::wall_time(ns), humantime(ns), "{ns}");
        }
    }

    #[test]
    fn event_instant_places_a_stamp_in_the_past() {
        let before = Instant::now();
        // An event stamped 2 s ago happened about 2 s before now, however
        // late it is looked at.
        let two_s_ago = super::boot_ns_now() - 2_000_000_000;
        let t = super::event_instant(two_s_ago);
        let age = before.saturating_duration_since(t);
        assert!(
            age > Duration::from_millis(1900) && age < Duration::from_millis(2500),
            "{age:?}"
        );
        // Unknown (0) and future stamps are "now".
        assert!(super::event_instant(0) >= before);
        assert!(super::event_instant(super::boot_ns_now() + 10_000_000_000) >= before);
    }

    /// The agent modules (`crate::NAME`) named by code (not comments) in
    /// the Rust files at `rel` (a file or a directory, walked).
    fn crate_modules_named(rel: &str) -> BTreeSet<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root.join(rel)];
        let mut out = BTreeSet::new();
        while let Some(p) = files.pop() {
            if p.is_dir() {
                files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for line in text.lines().map(str::trim_start) {
                if line.starts_with("//") {
                    continue;
                }
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            }
        }
        out
    }

    fn assert_only(rel: &str, allowed: &[&str]) {
        let named = crate_modules_named(rel);
        let extra: Vec<_> = named
            .iter()
            .filter(|m| !allowed.contains(&m.as_str()))
            .collect();
        assert!(
            extra.is_empty(),
            "src/{rel} names {extra:?}: it may only use {allowed:?} (ARCHITECTURE.md, invariants)"
        );
    }

    #[test]
    fn model_is_a_leaf() {
        assert_only("model", &["model"]);
    }

    #[test]
    fn state_and_detect_import_no_later_stage() {
        assert_only("tree.rs", &["model"]);
        assert_only(
            "state.rs",
            &[
                "model",
                "tree",
                "procscan",
                "identity",
                "workload_cache",
                "metrics",
            ],
        );
        assert_only("detect", &["model", "tree", "detect"]);
    }

    #[test]
    fn stages_before_ship_hand_over_without_naming_it() {
        for rel in ["pipeline.rs", "reaction.rs", "respond.rs", "detect"] {
            assert!(
                !crate_modules_named(rel).contains("ship"),
                "src/{rel} names ship: detections and bundles go through outputs::Forward"
            );
        }
    }

    #[test]
    fn outputs_and_the_wire_mapping_import_only_the_model() {
        assert_only("outputs.rs", &["model", "metrics"]);
        assert_only("ship/wire.rs", &["model", "outputs"]);
    }
}
