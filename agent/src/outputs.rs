//! Outputs: where enriched events and detections leave the agent as JSON
//! lines. The only stage that serializes for people and files; the wire
//! form for the collector is `ship`'s.
//!
//! Event lines (`--events-json`): the event with its `process` and
//! `ancestry`. Each ancestor is `{pid, exe}`; its arguments are in its own
//! exec event and in `process.argv` of its own events, so a line does not
//! repeat every ancestor's command line (set `events_ancestry_argv = true`
//! for `{pid, exe, argv}` as before). Detection lines keep the full ancestry.

use std::io::Write;
use std::sync::Arc;

use serde::ser::{SerializeSeq, SerializeStruct};
use serde::Serialize;
use tracing::warn;

use crate::metrics::Metrics;
use crate::model::event::{Event, Payload};
use crate::model::{
    rfc3339, Ancestor, Detection, EnrichedEvent, Image, PerImage, ProcessView, Workload,
};

/// Where detections and sealed evidence go beyond this node's files (the
/// collector): `ship::Shipper` implements it, so detection, `reaction` and
/// `respond` hand over without importing `ship`. Implementations never
/// block the caller and count what they cannot take.
pub trait Forward: Send + Sync + std::fmt::Debug {
    /// Queues a detection (high and critical ones have reserved room).
    fn detection(&self, d: &Detection);
    /// Queues a sealed evidence archive (`high`: of a high or critical
    /// detection). Does file I/O: called from the capture worker.
    fn bundle(&self, archive: &std::path::Path, id: &str, high: bool);
}

/// A consumer of enriched events.
pub trait Sink: Send {
    /// Takes one event. Errors are the sink's to count and report.
    fn emit(&mut self, ev: &EnrichedEvent);
    /// Called after each batch (and on the agent's poll tick).
    fn flush(&mut self) {}
    /// Called once at shutdown, after the last batch: everything held goes
    /// out.
    fn finish(&mut self) {
        self.flush();
    }
}

/// Writes values as JSON lines (events, detections).
pub struct JsonLinesSink {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    metrics: Arc<Metrics>,
    warned: bool,
    ancestry_argv: bool,
    lines: LineWriter,
}

impl JsonLinesSink {
    /// Writes one value as a line; failures are counted and logged once.
    pub fn write<T: Serialize>(&mut self, v: &T) {
        let r = serde_json::to_writer(&mut self.out, v)
            .map_err(|e| e.to_string())
            .and_then(|()| self.out.write_all(b"\n").map_err(|e| e.to_string()));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Flushes buffered lines.
    pub fn flush_out(&mut self) {
        if let Err(e) = self.out.flush() {
            self.fail(e);
        }
    }

    /// To stdout for "-", else appending to the file.
    pub fn open(path: &std::path::Path, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let w: Box<dyn Write + Send> =
            if path.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    vigil_bundle::private::create_missing_dirs(dir)?;
                }
                Box::new(vigil_bundle::private::open_append(path).map_err(|e| {
                    anyhow::anyhow!("opening events output {}: {e}", path.display())
                })?)
            };
        Ok(Self {
            out: std::io::BufWriter::with_capacity(256 * 1024, w),
            metrics,
            warned: false,
            ancestry_argv: false,
            lines: LineWriter::default(),
        })
    }

    /// Event lines name each ancestor's arguments too (`{pid, exe, argv}`).
    pub fn with_ancestry_argv(mut self, on: bool) -> Self {
        self.ancestry_argv = on;
        self
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        self.metrics.output_errors.inc();
        if !self.warned {
            warn!(error = %e, "writing events failed (counted in vigil_output_errors_total)");
            self.warned = true;
        }
    }
}

impl Sink for JsonLinesSink {
    fn emit(&mut self, ev: &EnrichedEvent) {
        let r = self.lines.write(&mut self.out, ev, self.ancestry_argv);
        if let Err(e) = r {
            self.fail(e);
        }
    }
    fn flush(&mut self) {
        self.flush_out();
    }
}

/// One event line: the event, its process and its ancestry (see the module
/// documentation for the ancestors' shape).
pub struct EventLine<'a> {
    /// The event.
    pub ev: &'a EnrichedEvent,
    /// Ancestors carry their argv.
    pub ancestry_argv: bool,
}

impl Serialize for EventLine<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Line<'a> {
            time: &'a str,
            #[serde(flatten)]
            event: &'a Event,
            process: &'a ProcessView,
            ancestry: Ancestry<'a>,
        }
        Line {
            time: rfc3339(self.ev.time_unix_nanos).as_str(),
            event: &self.ev.event,
            process: &self.ev.process,
            ancestry: Ancestry(&self.ev.ancestry, self.ancestry_argv),
        }
        .serialize(s)
    }
}

/// Writes event lines (argv, workloads and the rarer payloads still
/// through serde_json, the rest by hand): byte for byte what
/// [`EventLine`] serializes to
/// (checked for every kind by the tests), made faster on the hot path:
/// each image's `exe` and `argv` are escaped once for all the lines that
/// name the process or its descendants, the last workload's JSON is kept,
/// numbers are written directly, the storms' kinds (fork, exit, file_open)
/// are written field by field and the others' payloads serialized on their
/// own instead of through serde's flattening.
pub struct LineWriter {
    /// Reused for each event's payload.
    scratch: Vec<u8>,
    /// The last workload written and its JSON (events come in runs of one
    /// workload).
    workload: Option<(Arc<Workload>, Box<[u8]>)>,
    /// Images' `exe` and `argv` as JSON.
    images: PerImage<ImageJson>,
    /// The JSON of an image too long to cache.
    big: ImageJson,
}

impl Default for LineWriter {
    fn default() -> Self {
        Self {
            scratch: Vec::with_capacity(1024),
            workload: None,
            images: PerImage::new(IMAGE_SLOTS),
            big: ImageJson::default(),
        }
    }
}

impl LineWriter {
    /// Writes `ev`'s line, newline included.
    pub fn write(
        &mut self,
        out: &mut impl Write,
        ev: &EnrichedEvent,
        ancestry_argv: bool,
    ) -> std::io::Result<()> {
        let e = &*ev.event;
        let p = &ev.process;
        let mut n = itoa::Buffer::new();
        out.write_all(b"{\"time\":")?;
        out.write_all(b"\"")?;
        out.write_all(rfc3339(ev.time_unix_nanos).as_str().as_bytes())?;
        out.write_all(b"\"")?;
        for (key, v) in [
            (&b",\"boot_ns\":"[..], e.boot_ns),
            (b",\"tid\":", e.tid.into()),
            (b",\"pid\":", e.pid.into()),
            (b",\"uid\":", e.uid.into()),
            (b",\"gid\":", e.gid.into()),
            (b",\"start_boot_ns\":", e.start_boot_ns),
            (b",\"cgroup_id\":", e.cgroup_id),
        ] {
            out.write_all(key)?;
            out.write_all(n.format(v).as_bytes())?;
        }
        out.write_all(b",\"comm\":")?;
        json_str(out, &e.comm)?;
        match &e.payload {
            // The kinds of the storms, written directly.
            Payload::Fork { ppid } => {
                out.write_all(b",\"type\":\"fork\",\"ppid\":")?;
                out.write_all(n.format(*ppid).as_bytes())?;
            }
            Payload::Exit { exit_code, signal } => {
                out.write_all(b",\"type\":\"exit\"")?;
                if let Some(c) = exit_code {
                    out.write_all(b",\"exit_code\":")?;
                    out.write_all(n.format(*c).as_bytes())?;
                }
                if let Some(s) = signal {
                    out.write_all(b",\"signal\":")?;
                    out.write_all(n.format(*s).as_bytes())?;
                }
            }
            Payload::FileOpen(f) => {
                out.write_all(b",\"type\":\"file_open\",\"path\":")?;
                json_str(out, &f.path)?;
                for (key, v) in [
                    (&b",\"flags\":"[..], f.flags.into()),
                    (b",\"mode\":", f.mode.into()),
                    (b",\"ino\":", f.ino),
                    (b",\"dev\":", f.dev.into()),
                ] {
                    out.write_all(key)?;
                    out.write_all(n.format(v).as_bytes())?;
                }
                if f.io_uring {
                    out.write_all(b",\"io_uring\":true")?;
                }
            }
            // The others by serde: an object tagged by "type", never
            // empty, whose members continue the line's.
            payload => {
                self.scratch.clear();
                serde_json::to_writer(&mut self.scratch, payload)?;
                debug_assert!(self.scratch.starts_with(b"{\"type\":"));
                if let [b'{', members @ .., b'}'] = &self.scratch[..] {
                    if !members.is_empty() {
                        out.write_all(b",")?;
                        out.write_all(members)?;
                    }
                }
            }
        }
        out.write_all(b",\"process\":{\"pid\":")?;
        out.write_all(n.format(p.pid).as_bytes())?;
        out.write_all(b",\"ppid\":")?;
        out.write_all(n.format(p.ppid).as_bytes())?;
        let image = self.image_json(&p.image);
        out.write_all(b",\"exe\":")?;
        out.write_all(&image.exe)?;
        out.write_all(b",\"comm\":")?;
        json_str(out, &p.comm)?;
        out.write_all(b",\"argv\":")?;
        out.write_all(&image.argv)?;
        out.write_all(b",\"uid\":")?;
        out.write_all(n.format(p.uid).as_bytes())?;
        out.write_all(b",\"euid\":")?;
        out.write_all(n.format(p.euid).as_bytes())?;
        out.write_all(b",\"workload\":")?;
        out.write_all(self.workload_json(&p.workload)?)?;
        out.write_all(b"},\"ancestry\":[")?;
        for (i, a) in ev.ancestry.iter().enumerate() {
            out.write_all(if i == 0 { b"{\"pid\":" } else { b",{\"pid\":" })?;
            out.write_all(n.format(a.pid).as_bytes())?;
            let image = self.image_json(&a.image);
            out.write_all(b",\"exe\":")?;
            out.write_all(&image.exe)?;
            if ancestry_argv {
                out.write_all(b",\"argv\":")?;
                out.write_all(&image.argv)?;
            }
            out.write_all(b"}")?;
        }
        if self.big.argv.capacity() > IMAGE_JSON_MAX * 8 {
            self.big = ImageJson::default();
        }
        out.write_all(b"]}\n")
    }

    /// `image`'s JSON: cached, unless its strings are long (those are made
    /// for each line in a buffer that is not kept large).
    fn image_json(&mut self, image: &Arc<Image>) -> &ImageJson {
        let mut n = image.exe.len();
        for a in &image.argv {
            n += a.len() + 3;
            if n > IMAGE_JSON_MAX {
                break;
            }
        }
        if n <= IMAGE_JSON_MAX {
            self.images.get(image, ImageJson::fill)
        } else {
            ImageJson::fill(image, &mut self.big);
            &self.big
        }
    }

    fn workload_json(&mut self, w: &Arc<Workload>) -> std::io::Result<&[u8]> {
        match &self.workload {
            Some((last, _)) if Arc::ptr_eq(last, w) => {}
            _ => {
                let json = serde_json::to_vec(&**w)?.into_boxed_slice();
                self.workload = Some((w.clone(), json));
            }
        }
        Ok(self.workload.as_ref().map_or(&[][..], |(_, j)| &j[..]))
    }
}

/// Images whose JSON a [`LineWriter`] keeps: a process, its ancestors and
/// its siblings' parents, many times over.
const IMAGE_SLOTS: usize = 256;

/// Images are cached when their strings total at most this many bytes: an
/// argv may hold 32 KiB, and its JSON up to six times that (`\u00XX`), so
/// the slots hold at most about 256 x 24 KiB, usually a few KiB in all.
const IMAGE_JSON_MAX: usize = 4096;

/// An image's `exe` (a JSON string) and `argv` (a JSON array).
#[derive(Default)]
struct ImageJson {
    exe: Vec<u8>,
    argv: Vec<u8>,
}

impl ImageJson {
    /// Refills with `image`'s forms (strings and lists of strings always
    /// serialize).
    fn fill(image: &Image, json: &mut ImageJson) {
        json.exe.clear();
        let _ = json_str(&mut json.exe, &image.exe);
        json.argv.clear();
        let _ = serde_json::to_writer(&mut json.argv, &image.argv);
    }
}

/// `s` as a JSON string: as is between quotes when nothing in it needs
/// escaping (the common case), else escaped by serde_json.
fn json_str(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.write_all(b"\"")?;
        out.write_all(s.as_bytes())?;
        out.write_all(b"\"")
    } else {
        Ok(serde_json::to_writer(out, s)?)
    }
}

struct Ancestry<'a>(&'a [Ancestor], bool);

impl Serialize for Ancestry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.1 {
            return self.0.serialize(s);
        }
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for a in self.0 {
            seq.serialize_element(&Lean(a))?;
        }
        seq.end()
    }
}

/// `{pid, exe}`.
struct Lean<'a>(&'a Ancestor);

impl Serialize for Lean<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("Ancestor", 2)?;
        m.serialize_field("pid", &self.0.pid)?;
        m.serialize_field("exe", &self.0.image.exe)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Image, Workload};

    fn enriched() -> EnrichedEvent {
        let image = Image::new("/bin/sh".into(), vec!["sh".into(), "-c".into(), "x".into()]);
        EnrichedEvent {
            time_unix_nanos: 0,
            event: Arc::new(Event {
                boot_ns: 1,
                tid: 7,
                pid: 7,
                uid: 0,
                gid: 0,
                start_boot_ns: 1,
                cgroup_id: 1,
                comm: "true".into(),
                payload: crate::model::Payload::Fork { ppid: 3 },
            }),
            process: ProcessView {
                pid: 7,
                ppid: 3,
                image: image.clone(),
                comm: "true".into(),
                uid: 0,
                euid: 0,
                workload: Arc::new(Workload::default()),
            },
            ancestry: vec![Ancestor { pid: 3, image }],
        }
    }

    #[test]
    fn event_lines_name_ancestors_without_argv_unless_asked() {
        let ev = enriched();
        let lean = serde_json::to_value(EventLine {
            ev: &ev,
            ancestry_argv: false,
        })
        .unwrap();
        assert_eq!(
            lean["ancestry"],
            serde_json::json!([{"pid": 3, "exe": "/bin/sh"}])
        );
        assert_eq!(
            lean["process"]["argv"],
            serde_json::json!(["sh", "-c", "x"])
        );
        assert_eq!(lean["type"], "fork");
        assert_eq!(lean["ppid"], 3);
        let full = serde_json::to_value(EventLine {
            ev: &ev,
            ancestry_argv: true,
        })
        .unwrap();
        assert_eq!(
            full["ancestry"][0]["argv"],
            serde_json::json!(["sh", "-c", "x"])
        );
        // The full form is the enriched event's own serialization.
        assert_eq!(full, serde_json::to_value(&ev).unwrap());
    }

    /// The sink's fast line is the serde form, byte for byte, for every
    /// kind, workload and ancestry form, strings needing escapes included.
    #[test]
    fn the_written_line_is_the_serde_line() {
        use crate::model::fixtures::{enriched, payloads, workloads};
        let mut lines = LineWriter::default();
        // A process whose command line is too long to cache.
        let long = Image::new(
            "/usr/bin/long".into(),
            vec!["x".repeat(IMAGE_JSON_MAX), "\u{1}\"".into()],
        );
        for w in workloads() {
            for (i, p) in payloads().into_iter().enumerate() {
                let mut ev = enriched(p, w.clone());
                if i % 3 == 0 {
                    ev.process.image = long.clone();
                }
                Arc::make_mut(&mut ev.event).comm = "a\"b\\c\u{1}".into();
                for argv in [false, true] {
                    let mut want = serde_json::to_vec(&EventLine {
                        ev: &ev,
                        ancestry_argv: argv,
                    })
                    .unwrap();
                    want.push(b'\n');
                    // Twice: the second line reuses the cached forms.
                    for _ in 0..2 {
                        let mut got = Vec::new();
                        lines.write(&mut got, &ev, argv).unwrap();
                        assert_eq!(
                            String::from_utf8_lossy(&got),
                            String::from_utf8_lossy(&want)
                        );
                    }
                }
            }
        }
    }
}
