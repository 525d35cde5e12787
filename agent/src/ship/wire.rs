//! The model to the wire: protobuf written straight from the agent's
//! types, on the thread that has them, into one buffer (no message structs
//! are built, nothing is cloned). No JSON is made for the wire either: the
//! collector builds the JSON document of a structured message itself
//! (`vigil_proto::document`), and the tests below check that it is the
//! agent's own line for every kind of event and detection, and that what is
//! written here is what prost writes for the decoded message, byte for byte
//! (fields in declaration order, proto3 defaults left out).
//!
//! Field numbers are `vigil.proto`'s; each function names the message it
//! writes.

use std::fmt::{self, Write as _};

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};

use crate::model::event::{Event, Payload, Stdio};
use crate::model::{Ancestor, Detection, EnrichedEvent, ProcessView, Severity, Workload};

/// One `Event`, encoded on its own; ancestors carry their argv when
/// `ancestry_argv` (as the event lines can). The tests' reference form:
/// the agent ships events through [`append_event`].
#[cfg(test)]
pub fn event(ev: &EnrichedEvent, ancestry_argv: bool) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    event_fields(&mut Pb(&mut buf), ev, ancestry_argv);
    buf
}

/// Appends one event to the body of a [`vigil_proto::EncodedEventBatch`] (as an entry
/// of `EventBatch.events`, without argv in the ancestry); returns the
/// bytes added.
pub fn append_event(body: &mut Vec<u8>, ev: &EnrichedEvent) -> usize {
    let start = body.len();
    Pb(body).message(vigil_proto::encoded::EVENTS_FIELD, |m| {
        event_fields(m, ev, false)
    });
    body.len() - start
}

/// One `Detection`, encoded.
pub fn detection(d: &Detection) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1024);
    let w = &mut Pb(&mut buf);
    let p = &d.process;
    w.i64(1, crate::model::parse_rfc3339_nanos(&d.time).unwrap_or(0));
    w.str(2, &d.rule);
    w.i32(3, severity(d.severity) as i32);
    w.strs(4, &d.mitre);
    w.str(5, &d.summary);
    w.u32(6, p.pid);
    w.u32(7, p.ppid);
    w.str(8, &p.image.exe);
    w.strs(9, &p.image.argv);
    w.display(10, p.workload.key_display());
    ancestry(w, 11, &d.ancestry, true);
    // 12 (evidence_ids) and 15 (json) stay empty.
    w.u32(13, p.uid);
    w.str(14, &p.comm);
    w.str(20, &d.detected_at);
    w.u64(21, d.latency_ns);
    w.str(22, d.rule_source);
    w.message(23, |m| process(m, p));
    w.message(24, |m| {
        // The event's own fields (`Event` 2, 3, 8, 20-25, payload).
        let e = &*d.event;
        m.str(2, e.kind().name());
        m.u32(3, e.pid);
        m.u32(8, e.uid);
        header(m, e);
        payload(m, &e.payload);
    });
    let capture = d
        .evidence
        .as_ref()
        .and_then(|e| e.get("capture"))
        .and_then(|c| c.as_str());
    w.str(25, capture.unwrap_or_default());
    if let Some(r) = &d.repeat {
        w.message(26, |m| {
            m.u64(1, r.count);
            m.u64(2, r.suppressed);
            m.str(3, &r.first);
            m.str(4, &r.last);
            m.u64(5, r.window_secs);
        });
    }
    buf
}

/// `Event`: the enriched event's fields, then the event's own.
fn event_fields(w: &mut Pb, ev: &EnrichedEvent, ancestry_argv: bool) {
    let (p, e) = (&ev.process, &*ev.event);
    w.i64(1, ev.time_unix_nanos);
    w.str(2, e.kind().name());
    w.u32(3, e.pid);
    w.u32(4, p.ppid);
    w.str(5, &p.image.exe);
    w.strs(6, &p.image.argv);
    w.display(7, p.workload.key_display());
    w.u32(8, e.uid);
    header(w, e);
    w.message(26, |m| process(m, p));
    ancestry(w, 27, &ev.ancestry, ancestry_argv);
    w.bool(28, ancestry_argv);
    payload(w, &e.payload);
}

/// `Event` 20-25: the kernel header.
fn header(w: &mut Pb, e: &Event) {
    w.u64(20, e.boot_ns);
    w.u32(21, e.tid);
    w.u32(22, e.gid);
    w.u64(23, e.start_boot_ns);
    w.u64(24, e.cgroup_id);
    w.str(25, &e.comm);
}

/// `Event`'s `payload` oneof (30-45).
fn payload(w: &mut Pb, p: &Payload) {
    match p {
        Payload::Exec(x) => w.message(30, |m| {
            m.u32(1, x.ppid);
            m.u32(2, x.euid);
            m.u32(3, x.egid);
            m.str(4, &x.exe);
            m.strs(5, &x.argv);
            m.bool(6, x.argv_truncated);
            m.u64(7, x.exe_ino);
            m.u32(8, x.exe_dev);
            m.bool(9, x.exe_memfd);
            m.bool(10, x.exe_deleted);
            m.opt_str(11, x.script.as_deref());
            m.opt_str(12, x.ld_preload.as_deref());
            for s in x.stdio {
                m.str_always(13, stdio(s));
            }
            m.bool(14, x.frozen);
            m.opt_str(15, x.copy_of.as_deref());
            m.bool(16, x.history_off);
        }),
        Payload::Fork { ppid } => w.message(31, |m| m.u32(1, *ppid)),
        Payload::Exit { exit_code, signal } => w.message(32, |m| {
            m.opt_u64(1, exit_code.map(u64::from));
            m.opt_u64(2, signal.map(u64::from));
        }),
        Payload::Connect(c) => w.message(33, |m| {
            m.str(1, &c.protocol);
            m.display(2, c.daddr);
            m.u32(3, c.dport.into());
            m.display(4, c.saddr);
            m.u32(5, c.sport.into());
            m.opt_u64(6, c.ret.map(|r| r as i64 as u64));
            m.bool(7, c.send_to);
            m.strs(8, c.rewritten_argv.as_deref().unwrap_or_default());
        }),
        Payload::FileOpen(f) => w.message(34, |m| {
            m.str(1, &f.path);
            m.u32(2, f.flags);
            m.u32(3, f.mode);
            m.u64(4, f.ino);
            m.u32(5, f.dev);
            m.bool(6, f.io_uring);
        }),
        Payload::Chmod(c) => w.message(35, |m| {
            m.str(1, &c.path);
            m.u32(2, c.mode);
        }),
        Payload::Rename(r) => w.message(36, |m| {
            m.str(1, &r.old_path);
            m.str(2, &r.new_path);
        }),
        Payload::Listen(l) => w.message(37, |m| {
            m.str(1, &l.protocol);
            m.display(2, l.addr);
            m.u32(3, l.port.into());
            m.strs(4, l.rewritten_argv.as_deref().unwrap_or_default());
        }),
        Payload::ExecDenied(x) => w.message(38, |m| {
            m.u32(1, x.ppid);
            m.str(2, &x.exe);
            m.str(3, &x.filename);
            m.str(4, x.policy);
            m.u64(5, x.exe_ino);
            m.u32(6, x.exe_dev);
        }),
        Payload::Utimes(u) => w.message(39, |m| m.str(1, &u.path)),
        Payload::Comm(c) => w.message(40, |m| {
            m.str(1, &c.new_comm);
            m.strs(2, &c.argv);
        }),
        Payload::ProcessAccess(a) => w.message(41, |m| {
            m.str(1, a.op);
            m.u32(2, a.target);
            m.opt_u64(3, a.target_pid.map(u64::from));
            m.i64(4, a.ret);
            m.u64(5, a.addr);
        }),
        Payload::ModuleLoad(x) => w.message(42, |m| {
            m.str(1, &x.path);
            m.bool(2, x.from_memory);
            m.u32(3, x.flags);
            m.i32(4, x.ret);
        }),
        Payload::BpfLoad(b) => w.message(43, |m| {
            m.str(1, &b.prog_type);
            m.u32(2, b.attach_type);
            m.str(3, &b.name);
            m.u32(4, b.insn_cnt);
            m.i32(5, b.ret);
        }),
        Payload::ExecMem(x) => w.message(44, |m| {
            m.str(1, x.op);
            m.u32(2, x.prot);
            m.u32(3, x.map_flags);
            m.u64(4, x.addr);
            m.u64(5, x.len);
            m.i32(6, x.ret);
        }),
        Payload::Unlink(u) => w.message(45, |m| m.str(1, &u.path)),
    }
}

/// The name the event lines give a stdio kind.
fn stdio(s: Stdio) -> &'static str {
    match s {
        Stdio::Closed => "closed",
        Stdio::File => "file",
        Stdio::Pipe => "pipe",
        Stdio::CharDevice => "char_device",
        Stdio::InetSocket => "inet_socket",
        Stdio::UnixSocket => "unix_socket",
        Stdio::OtherSocket => "other_socket",
        Stdio::Other => "other",
    }
}

/// `Process`.
fn process(w: &mut Pb, p: &ProcessView) {
    w.u32(1, p.pid);
    w.u32(2, p.ppid);
    w.str(3, &p.image.exe);
    w.str(4, &p.comm);
    w.strs(5, &p.image.argv);
    w.u32(6, p.uid);
    w.u32(7, p.euid);
    w.message(8, |m| workload(m, &p.workload));
}

/// `Workload` (a missing value is the empty string).
fn workload(w: &mut Pb, wl: &Workload) {
    w.str(1, wl.kind.as_str());
    w.str(2, &wl.cgroup);
    let fields = [
        &wl.container_id,
        &wl.runtime,
        &wl.pod_uid,
        &wl.systemd_unit,
        &wl.container_name,
        &wl.image,
        &wl.image_digest,
        &wl.pod_name,
        &wl.pod_namespace,
    ];
    for (tag, v) in (3..).zip(fields) {
        w.str(tag, v.as_deref().unwrap_or_default());
    }
}

/// Repeated `Ancestor` in field `tag`.
fn ancestry(w: &mut Pb, tag: u32, a: &[Ancestor], with_argv: bool) {
    for a in a {
        w.message(tag, |m| {
            m.u32(1, a.pid);
            m.str(2, &a.image.exe);
            if with_argv {
                m.strs(3, &a.image.argv);
            }
        });
    }
}

fn severity(s: Severity) -> vigil_proto::Severity {
    use vigil_proto::Severity as W;
    match s {
        Severity::Low => W::Low,
        Severity::Medium => W::Medium,
        Severity::High => W::High,
        Severity::Critical => W::Critical,
    }
}

/// A protobuf writer over a buffer, field by field from borrowed values.
/// Scalar and string fields equal to their proto3 default (0, false, "")
/// are left out, as prost leaves them out; `opt_*` fields (proto3
/// `optional`) and repeated elements are written whenever present.
struct Pb<'a>(&'a mut Vec<u8>);

impl Pb<'_> {
    fn varint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.opt_u64(tag, Some(v));
        }
    }

    /// An `optional` varint field (written when present, even if 0).
    fn opt_u64(&mut self, tag: u32, v: Option<u64>) {
        if let Some(v) = v {
            encode_key(tag, WireType::Varint, self.0);
            encode_varint(v, self.0);
        }
    }

    fn u32(&mut self, tag: u32, v: u32) {
        self.varint(tag, v.into());
    }

    fn u64(&mut self, tag: u32, v: u64) {
        self.varint(tag, v);
    }

    /// `int32`: a negative value is sign-extended to ten bytes.
    fn i32(&mut self, tag: u32, v: i32) {
        self.varint(tag, i64::from(v) as u64);
    }

    fn i64(&mut self, tag: u32, v: i64) {
        self.varint(tag, v as u64);
    }

    fn bool(&mut self, tag: u32, v: bool) {
        self.varint(tag, v.into());
    }

    fn str(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.str_always(tag, s);
        }
    }

    fn str_always(&mut self, tag: u32, s: &str) {
        encode_key(tag, WireType::LengthDelimited, self.0);
        encode_varint(s.len() as u64, self.0);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn opt_str(&mut self, tag: u32, s: Option<&str>) {
        if let Some(s) = s {
            self.str_always(tag, s);
        }
    }

    fn strs(&mut self, tag: u32, v: &[String]) {
        for s in v {
            self.str_always(tag, s);
        }
    }

    /// A string field formatted in place; left out when it formats empty.
    fn display(&mut self, tag: u32, v: impl fmt::Display) {
        let start = self.0.len();
        self.message(tag, |m| {
            let _ = write!(m, "{v}");
        });
        // Only the key and a zero length: the empty string.
        if self.0.len() - start == prost::encoding::key_len(tag) + 1 {
            self.0.truncate(start);
        }
    }

    /// A length-delimited field written by `f`: the length goes in front
    /// once known (one byte reserved; moved up if it needs more).
    fn message(&mut self, tag: u32, f: impl FnOnce(&mut Pb)) {
        encode_key(tag, WireType::LengthDelimited, self.0);
        let at = self.0.len();
        self.0.push(0);
        f(&mut Pb(self.0));
        let len = self.0.len() - at - 1;
        let n = encoded_len_varint(len as u64);
        if n > 1 {
            let end = self.0.len();
            self.0.resize(end + n - 1, 0);
            self.0.copy_within(at + 1..end, at + n);
        }
        encode_varint(len as u64, &mut &mut self.0[at..at + n]);
    }
}

impl fmt::Write for Pb<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{enriched, payloads, workloads};
    use crate::model::Repeat;
    use crate::outputs::EventLine;
    use prost::Message;
    use vigil_proto as pb;

    /// Decodes `bytes` as `M` and checks that prost writes the decoded
    /// message back as the same bytes: every field in its place, none
    /// twice, defaults left out.
    fn decode<M: Message + Default>(bytes: &[u8]) -> M {
        let m = M::decode(bytes).unwrap();
        assert_eq!(
            m.encode_to_vec(),
            bytes,
            "not prost's encoding of {}",
            std::any::type_name::<M>()
        );
        m
    }

    /// The document's text holds what the line holds and nothing more: a
    /// key written twice would be lost in the parsed value but not here
    /// (same escaping and number forms; only the key order differs).
    fn same_text(text: &str, line: &serde_json::Value) {
        assert_eq!(text.len(), line.to_string().len(), "{text}");
    }

    /// The collector's document of the wire form is the agent's event line,
    /// for every kind, workload and ancestry form.
    #[test]
    fn the_collectors_document_of_an_event_is_the_agents_line() {
        for w in workloads() {
            for p in payloads() {
                let ev = enriched(p, w.clone());
                for argv in [false, true] {
                    let line = serde_json::to_value(EventLine {
                        ev: &ev,
                        ancestry_argv: argv,
                    })
                    .unwrap();
                    let wire: pb::Event = decode(&event(&ev, argv));
                    let doc = pb::document::event(&wire).unwrap();
                    assert_eq!(doc, line, "{}", line["type"]);
                    same_text(&pb::document::event_json(&wire).unwrap(), &line);
                }
            }
        }
    }

    /// The same for detections: with and without a capture asked, with
    /// and without repeats.
    #[test]
    fn the_collectors_document_of_a_detection_is_the_agents_line() {
        for (i, p) in payloads().into_iter().enumerate() {
            let ev = enriched(p, workloads()[i % 3].clone());
            let mut d = Detection {
                time: ev.time(),
                detected_at: "2026-12-02T10:00:00.004000000Z".into(),
                latency_ns: 4_000_000,
                rule: "web_server_spawns_shell".into(),
                rule_source: "builtin",
                severity: [
                    Severity::Low,
                    Severity::Medium,
                    Severity::High,
                    Severity::Critical,
                ][i % 4],
                mitre: vec!["T1059.004".into(), "T1190".into()],
                summary: "a web server started a shell".into(),
                process: ev.process.clone(),
                ancestry: ev.ancestry.clone(),
                event: ev.event.clone(),
                evidence: None,
                repeat: None,
            };
            if i % 2 == 1 {
                d.evidence = Some(serde_json::json!({ "capture": "queued" }));
                d.repeat = Some(Repeat {
                    count: 20,
                    suppressed: 17,
                    first: ev.time(),
                    last: "2026-12-02T10:00:05.000000000Z".into(),
                    window_secs: 60,
                });
            }
            let line = serde_json::to_value(&d).unwrap();
            let wire: pb::Detection = decode(&detection(&d));
            assert_eq!(wire.time_unix_nanos, ev.time_unix_nanos);
            assert_eq!(wire.severity(), severity(d.severity));
            let doc = pb::document::detection(&wire).unwrap();
            assert_eq!(doc, line, "{}", line["event"]["type"]);
            same_text(&pb::document::detection_json(&wire).unwrap(), &line);
        }
    }

    /// The summary fields the collector indexes agree with what its
    /// reading of an old agent's JSON line gives.
    #[test]
    fn indexed_fields_match_the_reading_of_a_json_line() {
        let ev = enriched(payloads().remove(0), workloads().remove(2));
        let line = serde_json::to_string(&EventLine {
            ev: &ev,
            ancestry_argv: false,
        })
        .unwrap();
        let old = pb::Event::from_agent_json(&line).unwrap();
        let new: pb::Event = decode(&event(&ev, false));
        assert_eq!(
            (new.time_unix_nanos, &new.kind, new.pid, new.ppid, &new.exe),
            (old.time_unix_nanos, &old.kind, old.pid, old.ppid, &old.exe)
        );
        assert_eq!(
            (&new.argv, &new.workload_key, new.uid),
            (&old.argv, &old.workload_key, old.uid)
        );
        assert!(new.json.is_empty(), "no JSON inside the protobuf");
    }

    /// Events appended to a body are a batch of those events on the wire,
    /// whatever their size (lengths of one, two and three bytes).
    #[test]
    fn appended_events_are_an_event_batch() {
        let mut evs = Vec::new();
        for (i, big) in [0, 200, 20_000].into_iter().enumerate() {
            let mut ev = enriched(payloads().remove(0), workloads().remove(i));
            let mut image = (*ev.process.image).clone();
            image.argv.push("a".repeat(big));
            ev.process.image = std::sync::Arc::new(image);
            evs.push(ev);
        }
        let mut body = Vec::new();
        let mut sizes = 0;
        for ev in &evs {
            sizes += append_event(&mut body, ev);
        }
        assert_eq!(sizes, body.len());
        let batch = pb::EncodedEventBatch {
            batch_id: "ev-1-0".into(),
            events: body.into(),
        };
        let plain: pb::EventBatch = decode(&batch.encode_to_vec());
        assert_eq!(plain.batch_id, "ev-1-0");
        let want: Vec<pb::Event> = evs.iter().map(|ev| decode(&event(ev, false))).collect();
        assert_eq!(plain.events, want);
        assert_eq!(plain.events[2].argv.last().unwrap().len(), 20_000);
    }
}
