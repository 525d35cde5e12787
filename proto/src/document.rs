//! The JSON document of an event or a detection that arrived in structured
//! form (agents from 0.2 on send no JSON): the object the collector stores
//! and shows, field for field the agent's own JSON line (`--events-json`,
//! `--detections-json`; the README's output contract), so that lines from
//! old and new agents read the same.
//!
//! The agent's `ship::wire` tests check that this document equals the
//! agent's line for every kind of event and detection.

use serde_json::{json, Map, Value};

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
    let mut m = Map::new();
    m.insert("time".into(), rfc3339_nanos(e.time_unix_nanos).into());
    own_fields(e, &mut m)?;
    m.insert("process".into(), process(e.process.as_ref()));
    m.insert("ancestry".into(), ancestry(&e.ancestry, e.ancestry_argv));
    Some(Value::Object(m))
}

/// A detection line; `None` without the structured triggering event.
pub fn detection(d: &Detection) -> Option<Value> {
    let mut ev = Map::new();
    own_fields(d.event.as_ref()?, &mut ev)?;
    let mut m = Map::new();
    m.insert("time".into(), rfc3339_nanos(d.time_unix_nanos).into());
    m.insert("detected_at".into(), d.detected_at.clone().into());
    m.insert("latency_ns".into(), d.latency_ns.into());
    m.insert("rule".into(), d.rule.clone().into());
    m.insert("rule_source".into(), d.rule_source.clone().into());
    m.insert("severity".into(), d.severity().label().into());
    m.insert("mitre".into(), d.mitre.clone().into());
    m.insert("summary".into(), d.summary.clone().into());
    m.insert("process".into(), process(d.process.as_ref()));
    m.insert("ancestry".into(), ancestry(&d.ancestry, true));
    m.insert("event".into(), Value::Object(ev));
    m.insert(
        "evidence".into(),
        if d.capture.is_empty() {
            Value::Null
        } else {
            json!({ "capture": d.capture })
        },
    );
    if let Some(r) = &d.repeat {
        m.insert(
            "repeat".into(),
            json!({
                "count": r.count,
                "suppressed": r.suppressed,
                "first": r.first,
                "last": r.last,
                "window_secs": r.window_secs,
            }),
        );
    }
    Some(Value::Object(m))
}

/// The event's own fields (header, `type`, payload) into `m`; `None`
/// without a payload.
fn own_fields(e: &Event, m: &mut Map<String, Value>) -> Option<()> {
    let payload = e.payload.as_ref()?;
    m.insert("boot_ns".into(), e.boot_ns.into());
    m.insert("tid".into(), e.tid.into());
    m.insert("pid".into(), e.pid.into());
    m.insert("uid".into(), e.uid.into());
    m.insert("gid".into(), e.gid.into());
    m.insert("start_boot_ns".into(), e.start_boot_ns.into());
    m.insert("cgroup_id".into(), e.cgroup_id.into());
    m.insert("comm".into(), e.comm.clone().into());
    let (kind, fields) = payload_fields(payload);
    m.insert("type".into(), kind.into());
    m.extend(fields);
    Some(())
}

/// `type` and the payload's fields (optional ones only when set, flags
/// only when true, as the agent writes them).
fn payload_fields(p: &Payload) -> (&'static str, Map<String, Value>) {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    let kind = match p {
        Payload::Exec(x) => {
            put("ppid", x.ppid.into());
            put("euid", x.euid.into());
            put("egid", x.egid.into());
            put("exe", x.exe.clone().into());
            put("argv", x.argv.clone().into());
            if x.argv_truncated {
                put("argv_truncated", true.into());
            }
            put("exe_ino", x.exe_ino.into());
            put("exe_dev", x.exe_dev.into());
            if x.exe_memfd {
                put("exe_memfd", true.into());
            }
            if x.exe_deleted {
                put("exe_deleted", true.into());
            }
            if let Some(s) = &x.script {
                put("script", s.clone().into());
            }
            if let Some(s) = &x.ld_preload {
                put("ld_preload", s.clone().into());
            }
            if let Some(c) = &x.copy_of {
                put("copy_of", c.clone().into());
            }
            if x.history_off {
                put("history_off", true.into());
            }
            put("stdio", x.stdio.clone().into());
            if x.frozen {
                put("frozen", true.into());
            }
            "exec"
        }
        Payload::Fork(f) => {
            put("ppid", f.ppid.into());
            "fork"
        }
        Payload::Exit(x) => {
            if let Some(c) = x.exit_code {
                put("exit_code", c.into());
            }
            if let Some(s) = x.signal {
                put("signal", s.into());
            }
            "exit"
        }
        Payload::Connect(c) => {
            put("protocol", c.protocol.clone().into());
            put("daddr", c.daddr.clone().into());
            put("dport", c.dport.into());
            put("saddr", c.saddr.clone().into());
            put("sport", c.sport.into());
            if let Some(r) = c.ret {
                put("ret", r.into());
            }
            if c.send_to {
                put("send_to", true.into());
            }
            if !c.rewritten_argv.is_empty() {
                put("rewritten_argv", c.rewritten_argv.clone().into());
            }
            "connect"
        }
        Payload::ProcessAccess(a) => {
            put("op", a.op.clone().into());
            put("target", a.target.into());
            if let Some(t) = a.target_pid {
                put("target_pid", t.into());
            }
            put("ret", a.ret.into());
            put("addr", a.addr.into());
            "process_access"
        }
        Payload::ModuleLoad(m) => {
            put("path", m.path.clone().into());
            put("from_memory", m.from_memory.into());
            put("flags", m.flags.into());
            put("ret", m.ret.into());
            "module_load"
        }
        Payload::BpfLoad(b) => {
            put("prog_type", b.prog_type.clone().into());
            put("attach_type", b.attach_type.into());
            put("name", b.name.clone().into());
            put("insn_cnt", b.insn_cnt.into());
            put("ret", b.ret.into());
            "bpf_load"
        }
        Payload::Unlink(u) => {
            put("path", u.path.clone().into());
            "unlink"
        }
        Payload::ExecMem(x) => {
            put("op", x.op.clone().into());
            put("prot", x.prot.into());
            put("map_flags", x.map_flags.into());
            put("addr", x.addr.into());
            put("len", x.len.into());
            put("ret", x.ret.into());
            "exec_mem"
        }
        Payload::FileOpen(f) => {
            put("path", f.path.clone().into());
            put("flags", f.flags.into());
            put("mode", f.mode.into());
            put("ino", f.ino.into());
            put("dev", f.dev.into());
            if f.io_uring {
                put("io_uring", true.into());
            }
            "file_open"
        }
        Payload::Chmod(c) => {
            put("path", c.path.clone().into());
            put("mode", c.mode.into());
            "chmod"
        }
        Payload::CommChange(c) => {
            put("new_comm", c.new_comm.clone().into());
            put("argv", c.argv.clone().into());
            "comm"
        }
        Payload::Utimes(u) => {
            put("path", u.path.clone().into());
            "utimes"
        }
        Payload::Rename(r) => {
            put("old_path", r.old_path.clone().into());
            put("new_path", r.new_path.clone().into());
            "rename"
        }
        Payload::Listen(l) => {
            put("protocol", l.protocol.clone().into());
            put("addr", l.addr.clone().into());
            put("port", l.port.into());
            if !l.rewritten_argv.is_empty() {
                put("rewritten_argv", l.rewritten_argv.clone().into());
            }
            "listen"
        }
        Payload::ExecDenied(x) => {
            put("ppid", x.ppid.into());
            put("exe", x.exe.clone().into());
            put("filename", x.filename.clone().into());
            put("policy", x.policy.clone().into());
            put("exe_ino", x.exe_ino.into());
            put("exe_dev", x.exe_dev.into());
            "exec_denied"
        }
    };
    (kind, m)
}

fn process(p: Option<&Process>) -> Value {
    let d = Process::default();
    let p = p.unwrap_or(&d);
    json!({
        "pid": p.pid,
        "ppid": p.ppid,
        "exe": p.exe,
        "comm": p.comm,
        "argv": p.argv,
        "uid": p.uid,
        "euid": p.euid,
        "workload": workload(p.workload.as_ref()),
    })
}

fn workload(w: Option<&Workload>) -> Value {
    let d = Workload::default();
    let w = w.unwrap_or(&d);
    let mut m = Map::new();
    m.insert(
        "kind".into(),
        if w.kind.is_empty() { "host" } else { &w.kind }.into(),
    );
    m.insert(
        "cgroup".into(),
        if w.cgroup.is_empty() { "/" } else { &w.cgroup }.into(),
    );
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
            m.insert(k.into(), v.clone().into());
        }
    }
    Value::Object(m)
}

fn ancestry(a: &[Ancestor], with_argv: bool) -> Value {
    a.iter()
        .map(|a| {
            if with_argv {
                json!({ "pid": a.pid, "exe": a.exe, "argv": a.argv })
            } else {
                json!({ "pid": a.pid, "exe": a.exe })
            }
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
