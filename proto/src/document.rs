//! The JSON document of an event or a detection that arrived in structured
//! form (agents from 0.2 on send no JSON): the object the collector stores
//! and shows, field for field the agent's own JSON line (`--events-json`,
//! `--detections-json`; the README's output contract), so that lines from
//! old and new agents read the same.
//!
//! The text is written field by field from the message ([`event_json`],
//! [`detection_json`]): no `serde_json::Value` is built on the collector's
//! ingest path. [`event`] and [`detection`] parse that text back, for
//! readers that want a value.
//!
//! The agent's `ship::wire` tests check that this document equals the
//! agent's line for every kind of event and detection.

use std::io::Write as _;

use serde_json::Value;

use crate::event::Payload;
use crate::{Ancestor, Detection, Event, Process, Workload};

/// RFC 3339 with nanoseconds, as the agent writes times.
pub fn rfc3339_nanos(unix_nanos: i64) -> String {
    humantime::format_rfc3339_nanos(
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_nanos.max(0) as u64),
    )
    .to_string()
}

/// An event line; `None` when `e` has no structured payload (an agent
/// before 0.2 sent it, and its `json` is the line).
pub fn event(e: &Event) -> Option<Value> {
    serde_json::from_str(&event_json(e)?).ok()
}

/// A detection line; `None` without the structured triggering event.
pub fn detection(d: &Detection) -> Option<Value> {
    serde_json::from_str(&detection_json(d)?).ok()
}

/// [`event`] as JSON text (a single line).
pub fn event_json(e: &Event) -> Option<String> {
    let payload = e.payload.as_ref()?;
    let mut o = Obj::new();
    o.str("time", &rfc3339_nanos(e.time_unix_nanos));
    own_fields(&mut o, e, payload);
    o.obj("process", |o| process(o, e.process.as_ref()));
    ancestry(&mut o, &e.ancestry, e.ancestry_argv);
    Some(o.finish())
}

/// [`detection`] as JSON text (a single line).
pub fn detection_json(d: &Detection) -> Option<String> {
    let ev = d.event.as_ref()?;
    let payload = ev.payload.as_ref()?;
    let mut o = Obj::new();
    o.str("time", &rfc3339_nanos(d.time_unix_nanos));
    o.str("detected_at", &d.detected_at);
    o.num("latency_ns", d.latency_ns);
    o.str("rule", &d.rule);
    o.str("rule_source", &d.rule_source);
    o.str("severity", d.severity().label());
    o.strs("mitre", &d.mitre);
    o.str("summary", &d.summary);
    o.obj("process", |o| process(o, d.process.as_ref()));
    ancestry(&mut o, &d.ancestry, true);
    o.obj("event", |o| own_fields(o, ev, payload));
    if d.capture.is_empty() {
        o.null("evidence");
    } else {
        o.obj("evidence", |o| o.str("capture", &d.capture));
    }
    if let Some(r) = &d.repeat {
        o.obj("repeat", |o| {
            o.num("count", r.count);
            o.num("suppressed", r.suppressed);
            o.str("first", &r.first);
            o.str("last", &r.last);
            o.num("window_secs", r.window_secs);
        });
    }
    Some(o.finish())
}

/// The event's own fields: header, `type`, payload.
fn own_fields(o: &mut Obj, e: &Event, payload: &Payload) {
    o.num("boot_ns", e.boot_ns);
    o.num("tid", e.tid);
    o.num("pid", e.pid);
    o.num("uid", e.uid);
    o.num("gid", e.gid);
    o.num("start_boot_ns", e.start_boot_ns);
    o.num("cgroup_id", e.cgroup_id);
    o.str("comm", &e.comm);
    payload_fields(o, payload);
}

/// `type` and the payload's fields (optional ones only when set, flags
/// only when true, as the agent writes them).
fn payload_fields(o: &mut Obj, p: &Payload) {
    match p {
        Payload::Exec(x) => {
            o.str("type", "exec");
            o.num("ppid", x.ppid);
            o.num("euid", x.euid);
            o.num("egid", x.egid);
            o.str("exe", &x.exe);
            o.strs("argv", &x.argv);
            o.flag("argv_truncated", x.argv_truncated);
            o.num("exe_ino", x.exe_ino);
            o.num("exe_dev", x.exe_dev);
            o.flag("exe_memfd", x.exe_memfd);
            o.flag("exe_deleted", x.exe_deleted);
            if let Some(s) = &x.script {
                o.str("script", s);
            }
            if let Some(s) = &x.ld_preload {
                o.str("ld_preload", s);
            }
            if let Some(c) = &x.copy_of {
                o.str("copy_of", c);
            }
            o.flag("history_off", x.history_off);
            o.strs("stdio", &x.stdio);
            o.flag("frozen", x.frozen);
        }
        Payload::Fork(f) => {
            o.str("type", "fork");
            o.num("ppid", f.ppid);
        }
        Payload::Exit(x) => {
            o.str("type", "exit");
            if let Some(c) = x.exit_code {
                o.num("exit_code", c);
            }
            if let Some(s) = x.signal {
                o.num("signal", s);
            }
        }
        Payload::Connect(c) => {
            o.str("type", "connect");
            o.str("protocol", &c.protocol);
            o.str("daddr", &c.daddr);
            o.num("dport", c.dport);
            o.str("saddr", &c.saddr);
            o.num("sport", c.sport);
            if let Some(r) = c.ret {
                o.num("ret", r);
            }
            o.flag("send_to", c.send_to);
            if !c.rewritten_argv.is_empty() {
                o.strs("rewritten_argv", &c.rewritten_argv);
            }
        }
        Payload::ProcessAccess(a) => {
            o.str("type", "process_access");
            o.str("op", &a.op);
            o.num("target", a.target);
            if let Some(t) = a.target_pid {
                o.num("target_pid", t);
            }
            o.num("ret", a.ret);
            o.num("addr", a.addr);
        }
        Payload::ModuleLoad(m) => {
            o.str("type", "module_load");
            o.str("path", &m.path);
            o.bool("from_memory", m.from_memory);
            o.num("flags", m.flags);
            o.num("ret", m.ret);
        }
        Payload::BpfLoad(b) => {
            o.str("type", "bpf_load");
            o.str("prog_type", &b.prog_type);
            o.num("attach_type", b.attach_type);
            o.str("name", &b.name);
            o.num("insn_cnt", b.insn_cnt);
            o.num("ret", b.ret);
        }
        Payload::Unlink(u) => {
            o.str("type", "unlink");
            o.str("path", &u.path);
        }
        Payload::ExecMem(x) => {
            o.str("type", "exec_mem");
            o.str("op", &x.op);
            o.num("prot", x.prot);
            o.num("map_flags", x.map_flags);
            o.num("addr", x.addr);
            o.num("len", x.len);
            o.num("ret", x.ret);
        }
        Payload::FileOpen(f) => {
            o.str("type", "file_open");
            o.str("path", &f.path);
            o.num("flags", f.flags);
            o.num("mode", f.mode);
            o.num("ino", f.ino);
            o.num("dev", f.dev);
            o.flag("io_uring", f.io_uring);
        }
        Payload::Chmod(c) => {
            o.str("type", "chmod");
            o.str("path", &c.path);
            o.num("mode", c.mode);
        }
        Payload::CommChange(c) => {
            o.str("type", "comm");
            o.str("new_comm", &c.new_comm);
            o.strs("argv", &c.argv);
        }
        Payload::Utimes(u) => {
            o.str("type", "utimes");
            o.str("path", &u.path);
        }
        Payload::Rename(r) => {
            o.str("type", "rename");
            o.str("old_path", &r.old_path);
            o.str("new_path", &r.new_path);
        }
        Payload::Listen(l) => {
            o.str("type", "listen");
            o.str("protocol", &l.protocol);
            o.str("addr", &l.addr);
            o.num("port", l.port);
            if !l.rewritten_argv.is_empty() {
                o.strs("rewritten_argv", &l.rewritten_argv);
            }
        }
        Payload::ExecDenied(x) => {
            o.str("type", "exec_denied");
            o.num("ppid", x.ppid);
            o.str("exe", &x.exe);
            o.str("filename", &x.filename);
            o.str("policy", &x.policy);
            o.num("exe_ino", x.exe_ino);
            o.num("exe_dev", x.exe_dev);
        }
    }
}

fn process(o: &mut Obj, p: Option<&Process>) {
    let d = Process::default();
    let p = p.unwrap_or(&d);
    o.num("pid", p.pid);
    o.num("ppid", p.ppid);
    o.str("exe", &p.exe);
    o.str("comm", &p.comm);
    o.strs("argv", &p.argv);
    o.num("uid", p.uid);
    o.num("euid", p.euid);
    o.obj("workload", |o| workload(o, p.workload.as_ref()));
}

fn workload(o: &mut Obj, w: Option<&Workload>) {
    let d = Workload::default();
    let w = w.unwrap_or(&d);
    o.str("kind", if w.kind.is_empty() { "host" } else { &w.kind });
    o.str("cgroup", if w.cgroup.is_empty() { "/" } else { &w.cgroup });
    for (k, v) in [
        ("container_id", &w.container_id),
        ("runtime", &w.runtime),
        ("pod_uid", &w.pod_uid),
        ("systemd_unit", &w.systemd_unit),
        ("container_name", &w.container_name),
        ("image", &w.image),
        ("image_digest", &w.image_digest),
        ("pod_name", &w.pod_name),
        ("pod_namespace", &w.pod_namespace),
    ] {
        if !v.is_empty() {
            o.str(k, v);
        }
    }
}

fn ancestry(o: &mut Obj, a: &[Ancestor], with_argv: bool) {
    o.objs("ancestry", a, |o, a| {
        o.num("pid", a.pid);
        o.str("exe", &a.exe);
        if with_argv {
            o.strs("argv", &a.argv);
        }
    });
}

/// A JSON object written as it goes. Keys are the fixed ASCII names
/// above (written as they are); every value goes through `serde_json`'s
/// escaping or is a number.
struct Obj {
    out: Vec<u8>,
    /// No field written yet in the innermost open object.
    first: bool,
}

impl Obj {
    fn new() -> Obj {
        let mut out = Vec::with_capacity(1024);
        out.push(b'{');
        Obj { out, first: true }
    }

    fn finish(mut self) -> String {
        self.out.push(b'}');
        // Keys are ASCII and serde_json writes valid UTF-8.
        String::from_utf8(self.out).unwrap_or_default()
    }

    fn key(&mut self, k: &str) {
        if !std::mem::replace(&mut self.first, false) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn num(&mut self, k: &str, v: impl std::fmt::Display) {
        self.key(k);
        let _ = write!(self.out, "{v}");
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.out
            .extend_from_slice(if v { b"true".as_slice() } else { b"false" });
    }

    /// A flag: written only when true.
    fn flag(&mut self, k: &str, v: bool) {
        if v {
            self.bool(k, true);
        }
    }

    fn null(&mut self, k: &str) {
        self.key(k);
        self.out.extend_from_slice(b"null");
    }

    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        let _ = serde_json::to_writer(&mut self.out, v);
    }

    fn strs(&mut self, k: &str, v: &[String]) {
        self.key(k);
        let _ = serde_json::to_writer(&mut self.out, v);
    }

    fn obj(&mut self, k: &str, f: impl FnOnce(&mut Obj)) {
        self.key(k);
        self.open(f);
    }

    fn objs<T>(&mut self, k: &str, items: &[T], mut f: impl FnMut(&mut Obj, &T)) {
        self.key(k);
        self.out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.open(|o| f(o, item));
        }
        self.out.push(b']');
    }

    /// `{`, the fields `f` writes, `}`.
    fn open(&mut self, f: impl FnOnce(&mut Obj)) {
        self.out.push(b'{');
        self.first = true;
        f(self);
        self.out.push(b'}');
        self.first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_without_payload_has_no_document() {
        assert_eq!(event(&Event::default()), None);
        assert_eq!(detection(&Detection::default()), None);
    }

    #[test]
    fn a_fork_event_reads_as_the_agent_writes_it() {
        let e = Event {
            time_unix_nanos: 1_796_205_600_000_000_123,
            kind: "fork".into(),
            pid: 7,
            comm: "sh".into(),
            payload: Some(Payload::Fork(crate::ForkPayload { ppid: 3 })),
            ancestry: vec![Ancestor {
                pid: 3,
                exe: "/bin/sh".into(),
                argv: vec!["sh".into()],
            }],
            ..Event::default()
        };
        let v = event(&e).unwrap();
        assert_eq!(v["time"], "2026-12-02T10:00:00.000000123Z");
        assert_eq!(v["type"], "fork");
        assert_eq!(v["ppid"], 3);
        assert_eq!(v["process"]["workload"]["kind"], "host");
        assert_eq!(v["ancestry"], json!([{ "pid": 3, "exe": "/bin/sh" }]));
    }

    /// Strings are escaped (quotes, control characters) and stay UTF-8;
    /// the text is one line.
    #[test]
    fn strings_are_escaped() {
        let odd = "a\"b\\c\nd\u{1}e \u{1F600} \u{fffd}";
        let e = Event {
            time_unix_nanos: 1,
            comm: odd.into(),
            payload: Some(Payload::Unlink(crate::UnlinkPayload { path: odd.into() })),
            ancestry: vec![Ancestor {
                pid: 1,
                exe: odd.into(),
                argv: vec![odd.into(), String::new()],
            }],
            ancestry_argv: true,
            ..Event::default()
        };
        let text = event_json(&e).unwrap();
        assert!(!text.contains('\n'), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["comm"], odd);
        assert_eq!(v["path"], odd);
        assert_eq!(
            v["ancestry"],
            json!([{ "pid": 1, "exe": odd, "argv": [odd, ""] }])
        );
        assert_eq!(v["process"]["argv"], json!([]));
        assert_eq!(event(&e), Some(v));
    }
}
