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
use crate::model::event::Event;
use crate::model::{Ancestor, Detection, EnrichedEvent, ProcessView};

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
    /// Called after each batch.
    fn flush(&mut self) {}
}

/// Writes values as JSON lines (events, detections).
pub struct JsonLinesSink {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    metrics: Arc<Metrics>,
    warned: bool,
    ancestry_argv: bool,
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
        let line = EventLine {
            ev,
            ancestry_argv: self.ancestry_argv,
        };
        self.write(&line);
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
            time: &self.ev.time,
            event: &self.ev.event,
            process: &self.ev.process,
            ancestry: Ancestry(&self.ev.ancestry, self.ancestry_argv),
        }
        .serialize(s)
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
            time: "2026-12-02T00:00:00Z".into(),
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
}
