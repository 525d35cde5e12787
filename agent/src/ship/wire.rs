//! The model to the wire: `vigil_proto` messages built directly from the
//! agent's types, on the thread that has them. No JSON is made for the
//! wire: the collector builds the JSON document of a structured message
//! itself (`vigil_proto::document`), and the tests below check that it is
//! the agent's own line for every kind of event and detection.

use vigil_proto as pb;

use crate::model::event::{Event as ModelEvent, Payload, Stdio};
use crate::model::{Ancestor, Detection, EnrichedEvent, ProcessView, Severity, Workload};

/// The wire form of one event; ancestors carry their argv when
/// `ancestry_argv` (as the event lines do).
pub fn event(ev: &EnrichedEvent, ancestry_argv: bool) -> pb::Event {
    let p = &ev.process;
    pb::Event {
        time_unix_nanos: ev.time_unix_nanos,
        kind: ev.event.kind().name().to_string(),
        ppid: p.ppid,
        exe: p.image.exe.clone(),
        argv: p.image.argv.clone(),
        workload_key: p.workload.key(),
        process: Some(process(p)),
        ancestry: ancestry(&ev.ancestry, ancestry_argv),
        ancestry_argv,
        ..own(&ev.event)
    }
}

/// The wire form of one detection.
pub fn detection(d: &Detection) -> pb::Detection {
    let p = &d.process;
    let capture = d
        .evidence
        .as_ref()
        .and_then(|e| e.get("capture"))
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_string();
    pb::Detection {
        time_unix_nanos: crate::model::parse_rfc3339_nanos(&d.time).unwrap_or(0),
        rule: d.rule.clone(),
        severity: severity(d.severity) as i32,
        mitre: d.mitre.clone(),
        summary: d.summary.clone(),
        pid: p.pid,
        ppid: p.ppid,
        exe: p.image.exe.clone(),
        argv: p.image.argv.clone(),
        workload_key: p.workload.key(),
        ancestry: ancestry(&d.ancestry, true),
        evidence_ids: Vec::new(),
        uid: p.uid,
        comm: p.comm.clone(),
        json: String::new(),
        detected_at: d.detected_at.clone(),
        latency_ns: d.latency_ns,
        rule_source: d.rule_source.to_string(),
        process: Some(process(p)),
        event: Some(own(&d.event)),
        capture,
        repeat: d.repeat.as_ref().map(|r| pb::Repeat {
            count: r.count,
            suppressed: r.suppressed,
            first: r.first.clone(),
            last: r.last.clone(),
            window_secs: r.window_secs,
        }),
    }
}

/// The event's own fields: header and payload.
fn own(e: &ModelEvent) -> pb::Event {
    pb::Event {
        kind: e.kind().name().to_string(),
        pid: e.pid,
        uid: e.uid,
        boot_ns: e.boot_ns,
        tid: e.tid,
        gid: e.gid,
        start_boot_ns: e.start_boot_ns,
        cgroup_id: e.cgroup_id,
        comm: e.comm.clone(),
        payload: Some(payload(&e.payload)),
        ..pb::Event::default()
    }
}

fn payload(p: &Payload) -> pb::event::Payload {
    use pb::event::Payload as W;
    match p {
        Payload::Exec(x) => W::Exec(pb::ExecPayload {
            ppid: x.ppid,
            euid: x.euid,
            egid: x.egid,
            exe: x.exe.clone(),
            argv: x.argv.clone(),
            argv_truncated: x.argv_truncated,
            exe_ino: x.exe_ino,
            exe_dev: x.exe_dev,
            exe_memfd: x.exe_memfd,
            exe_deleted: x.exe_deleted,
            script: x.script.clone(),
            ld_preload: x.ld_preload.clone(),
            copy_of: x.copy_of.clone(),
            history_off: x.history_off,
            stdio: x.stdio.iter().map(|s| stdio(*s).to_string()).collect(),
            frozen: x.frozen,
        }),
        Payload::Fork { ppid } => W::Fork(pb::ForkPayload { ppid: *ppid }),
        Payload::Exit { exit_code, signal } => W::Exit(pb::ExitPayload {
            exit_code: exit_code.map(u32::from),
            signal: signal.map(u32::from),
        }),
        Payload::Connect(c) => W::Connect(pb::ConnectPayload {
            protocol: c.protocol.clone(),
            daddr: c.daddr.to_string(),
            dport: c.dport.into(),
            saddr: c.saddr.to_string(),
            sport: c.sport.into(),
            ret: c.ret,
            send_to: c.send_to,
            rewritten_argv: c.rewritten_argv.clone().unwrap_or_default(),
        }),
        Payload::ProcessAccess(a) => W::ProcessAccess(pb::ProcessAccessPayload {
            op: a.op.to_string(),
            target: a.target,
            target_pid: a.target_pid,
            ret: a.ret,
            addr: a.addr,
        }),
        Payload::ModuleLoad(m) => W::ModuleLoad(pb::ModuleLoadPayload {
            path: m.path.clone(),
            from_memory: m.from_memory,
            flags: m.flags,
            ret: m.ret,
        }),
        Payload::BpfLoad(b) => W::BpfLoad(pb::BpfLoadPayload {
            prog_type: b.prog_type.clone(),
            attach_type: b.attach_type,
            name: b.name.clone(),
            insn_cnt: b.insn_cnt,
            ret: b.ret,
        }),
        Payload::Unlink(u) => W::Unlink(pb::UnlinkPayload {
            path: u.path.clone(),
        }),
        Payload::ExecMem(x) => W::ExecMem(pb::ExecMemPayload {
            op: x.op.to_string(),
            prot: x.prot,
            map_flags: x.map_flags,
            addr: x.addr,
            len: x.len,
            ret: x.ret,
        }),
        Payload::FileOpen(f) => W::FileOpen(pb::FileOpenPayload {
            path: f.path.clone(),
            flags: f.flags,
            mode: f.mode,
            ino: f.ino,
            dev: f.dev,
            io_uring: f.io_uring,
        }),
        Payload::Chmod(c) => W::Chmod(pb::ChmodPayload {
            path: c.path.clone(),
            mode: c.mode,
        }),
        Payload::Utimes(u) => W::Utimes(pb::UtimesPayload {
            path: u.path.clone(),
        }),
        Payload::Comm(c) => W::CommChange(pb::CommPayload {
            new_comm: c.new_comm.clone(),
            argv: c.argv.clone(),
        }),
        Payload::Rename(r) => W::Rename(pb::RenamePayload {
            old_path: r.old_path.clone(),
            new_path: r.new_path.clone(),
        }),
        Payload::Listen(l) => W::Listen(pb::ListenPayload {
            protocol: l.protocol.clone(),
            addr: l.addr.to_string(),
            port: l.port.into(),
            rewritten_argv: l.rewritten_argv.clone().unwrap_or_default(),
        }),
        Payload::ExecDenied(x) => W::ExecDenied(pb::ExecDeniedPayload {
            ppid: x.ppid,
            exe: x.exe.clone(),
            filename: x.filename.clone(),
            policy: x.policy.to_string(),
            exe_ino: x.exe_ino,
            exe_dev: x.exe_dev,
        }),
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

fn process(p: &ProcessView) -> pb::Process {
    pb::Process {
        pid: p.pid,
        ppid: p.ppid,
        exe: p.image.exe.clone(),
        comm: p.comm.clone(),
        argv: p.image.argv.clone(),
        uid: p.uid,
        euid: p.euid,
        workload: Some(workload(&p.workload)),
    }
}

fn workload(w: &Workload) -> pb::Workload {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    pb::Workload {
        kind: w.kind.as_str().to_string(),
        cgroup: w.cgroup.clone(),
        container_id: s(&w.container_id),
        runtime: s(&w.runtime),
        pod_uid: s(&w.pod_uid),
        systemd_unit: s(&w.systemd_unit),
        container_name: s(&w.container_name),
        image: s(&w.image),
        image_digest: s(&w.image_digest),
        pod_name: s(&w.pod_name),
        pod_namespace: s(&w.pod_namespace),
    }
}

fn ancestry(a: &[Ancestor], with_argv: bool) -> Vec<pb::Ancestor> {
    a.iter()
        .map(|a| pb::Ancestor {
            pid: a.pid,
            exe: a.image.exe.clone(),
            argv: if with_argv {
                a.image.argv.clone()
            } else {
                Vec::new()
            },
        })
        .collect()
}

fn severity(s: Severity) -> pb::Severity {
    match s {
        Severity::Low => pb::Severity::Low,
        Severity::Medium => pb::Severity::Medium,
        Severity::High => pb::Severity::High,
        Severity::Critical => pb::Severity::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{enriched, payloads, workloads};
    use crate::model::Repeat;
    use crate::outputs::EventLine;

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
                    let doc = vigil_proto::document::event(&event(&ev, argv)).unwrap();
                    assert_eq!(doc, line, "{}", line["type"]);
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
            let wire = detection(&d);
            assert_eq!(wire.time_unix_nanos, ev.time_unix_nanos);
            assert_eq!(wire.severity(), severity(d.severity));
            let doc = vigil_proto::document::detection(&wire).unwrap();
            assert_eq!(doc, line, "{}", line["event"]["type"]);
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
        let old = vigil_proto::Event::from_agent_json(&line).unwrap();
        let new = event(&ev, false);
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
}
