//! The model to the wire: `vigil_proto` messages built directly from the
//! agent's types, on the thread that has them (no JSON parsed back on the
//! agent). The `json` field carries the event line as the outputs write it,
//! for the collector's timelines.

use vigil_proto::Event;

use crate::model::EnrichedEvent;

/// The wire form of one event; `json` is its event line.
pub fn event(ev: &EnrichedEvent, json: String) -> Event {
    let p = &ev.process;
    Event {
        time_unix_nanos: ev.time_unix_nanos,
        kind: ev.event.kind().name().to_string(),
        pid: ev.event.pid,
        ppid: p.ppid,
        exe: p.image.exe.clone(),
        argv: p.image.argv.clone(),
        workload_key: p.workload.key(),
        uid: ev.event.uid,
        json,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{event::Event as ModelEvent, Image, Payload, ProcessView, Workload};
    use crate::outputs::EventLine;

    /// The direct mapping gives what the collector's reading of the same
    /// event line gives (the path it replaces).
    #[test]
    fn direct_mapping_matches_the_json_reading() {
        let image = Image::new("/usr/bin/curl".into(), vec!["curl".into(), "x".into()]);
        let ev = EnrichedEvent {
            time: "2026-12-02T10:00:00.000000123Z".into(),
            time_unix_nanos: 1_796_205_600_000_000_123,
            event: Arc::new(ModelEvent {
                boot_ns: 5,
                tid: 41,
                pid: 41,
                uid: 1000,
                gid: 1000,
                start_boot_ns: 4,
                cgroup_id: 9,
                comm: "curl".into(),
                payload: Payload::Exit {
                    exit_code: Some(0),
                    signal: None,
                },
            }),
            process: ProcessView {
                pid: 41,
                ppid: 40,
                image,
                comm: "curl".into(),
                uid: 1000,
                euid: 1000,
                workload: Arc::new(Workload::from_cgroup_path("/system.slice/app.service")),
            },
            ancestry: Vec::new(),
        };
        let json = serde_json::to_string(&EventLine {
            ev: &ev,
            ancestry_argv: false,
        })
        .unwrap();
        let direct = event(&ev, json.clone());
        let parsed = Event::from_agent_json(&json).unwrap();
        assert_eq!(direct, parsed);
    }
}
