//! The agent's JSON lines (`--events-json`, `--detections-json`) to wire
//! messages: the typed fields the collector indexes are read from the
//! document, and the document itself travels unchanged in `json`. Agents
//! from 0.2 on send structured messages instead (`document` is the other
//! direction); this reading stays for agents before 0.2, a spool they left
//! (converted once at the agent's start) and tests.
//!
//! Shapes (see the README's "What it reports" and issue 3's output contract):
//! an event has `time`, `type`, `pid`, `uid`, the subject `process`
//! {pid, ppid, exe, argv, uid, workload} and `ancestry`; a detection has
//! `time`, `rule`, `severity`, `mitre`, `summary`, `process`
//! {pid, ppid, exe, comm, argv, uid, workload}, `ancestry` and `evidence`.

use serde_json::{Map, Value};

use crate::{is_valid_bundle_id, Ancestor, Detection, Event, Severity};

/// Why a JSON line could not become a message.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// Not JSON, or not an object.
    #[error("not a JSON object: {0}")]
    NotAnObject(String),
    /// A required field is missing or has the wrong type.
    #[error("field `{0}` missing or of the wrong type")]
    Field(&'static str),
    /// `time` is neither RFC 3339 (UTC, `Z`) nor an integer of nanoseconds.
    #[error("field `time` is not an RFC 3339 UTC time: {0}")]
    Time(String),
}

fn parse_object(line: &str) -> Result<Map<String, Value>, JsonError> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(JsonError::NotAnObject(format!(
            "found {}",
            type_name(&other)
        ))),
        Err(e) => Err(JsonError::NotAnObject(e.to_string())),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses the `time` field: RFC 3339 in UTC (what the agent writes) or an
/// integer of nanoseconds since the Unix epoch.
pub fn parse_time(v: &Value) -> Result<i64, JsonError> {
    match v {
        Value::String(s) => {
            let t = humantime::parse_rfc3339_weak(s)
                .map_err(|e| JsonError::Time(format!("{s}: {e}")))?;
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| JsonError::Time(format!("{s}: before 1970")))?;
            i64::try_from(d.as_nanos()).map_err(|_| JsonError::Time(format!("{s}: out of range")))
        }
        Value::Number(n) => n.as_i64().ok_or_else(|| JsonError::Time(n.to_string())),
        _ => Err(JsonError::Field("time")),
    }
}

fn str_of(m: &Map<String, Value>, key: &str) -> Option<String> {
    m.get(key).and_then(Value::as_str).map(str::to_string)
}

fn u32_of(m: &Map<String, Value>, key: &str) -> Option<u32> {
    m.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

fn strings_of(m: &Map<String, Value>, key: &str) -> Vec<String> {
    m.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The workload key of a `process.workload` object, the same key the agent
/// computes (`Workload::key`): `container:<12 hex>`, `pod:<uid>/<12 hex>`,
/// `pod:<uid>`, `systemd:<unit>`, `session:<scope>` or `host`. A missing
/// workload is `host`.
pub fn workload_key(workload: Option<&Value>) -> String {
    let Some(Value::Object(w)) = workload else {
        return "host".to_string();
    };
    let cgroup = str_of(w, "cgroup").unwrap_or_else(|| "/".to_string());
    let short = |id: &str| id.chars().take(12).collect::<String>();
    let container_id = str_of(w, "container_id");
    let pod_uid = str_of(w, "pod_uid");
    let unit = str_of(w, "systemd_unit");
    match w.get("kind").and_then(Value::as_str).unwrap_or("host") {
        "container" => match container_id {
            Some(id) => format!("container:{}", short(&id)),
            None => format!("container:{cgroup}"),
        },
        "pod" => match (pod_uid, container_id) {
            (Some(uid), Some(id)) => format!("pod:{uid}/{}", short(&id)),
            (Some(uid), None) => format!("pod:{uid}"),
            (None, Some(id)) => format!("container:{}", short(&id)),
            (None, None) => format!("pod:{cgroup}"),
        },
        "systemd" => format!("systemd:{}", unit.unwrap_or(cgroup)),
        "session" => format!("session:{}", unit.unwrap_or(cgroup)),
        _ => "host".to_string(),
    }
}

fn ancestry_of(m: &Map<String, Value>) -> Vec<Ancestor> {
    m.get("ancestry")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_object)
                .map(|p| Ancestor {
                    pid: u32_of(p, "pid").unwrap_or(0),
                    exe: str_of(p, "exe").unwrap_or_default(),
                    argv: strings_of(p, "argv"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Bundle ids named by a detection's `evidence` field, whatever its shape:
/// a bundle id string, an object with `bundle_id`, `id` or `sha256`, or an
/// array of those. Only well-formed ids are kept.
pub fn evidence_ids(evidence: Option<&Value>) -> Vec<String> {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if is_valid_bundle_id(s) => out.push(s.clone()),
            Value::Object(o) => {
                for key in ["bundle_id", "id", "sha256"] {
                    if let Some(Value::String(s)) = o.get(key) {
                        if is_valid_bundle_id(s) {
                            out.push(s.clone());
                            break;
                        }
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(v) = evidence {
        collect(v, &mut out);
    }
    out.dedup();
    out
}

impl Event {
    /// Builds an event from one line of the agent's `--events-json` output.
    /// `time` and `type` are required; the rest defaults when absent.
    pub fn from_agent_json(line: &str) -> Result<Event, JsonError> {
        let m = parse_object(line)?;
        let time = parse_time(m.get("time").ok_or(JsonError::Field("time"))?)?;
        let kind = str_of(&m, "type").ok_or(JsonError::Field("type"))?;
        let process = m.get("process").and_then(Value::as_object);
        let from_process = |key: &str| process.and_then(|p| p.get(key));
        let pid = u32_of(&m, "pid")
            .or_else(|| {
                from_process("pid")
                    .and_then(Value::as_u64)
                    .map(|v| v as u32)
            })
            .unwrap_or(0);
        let ppid = u32_of(&m, "ppid")
            .or_else(|| process.and_then(|p| u32_of(p, "ppid")))
            .unwrap_or(0);
        let exe = str_of(&m, "exe")
            .or_else(|| process.and_then(|p| str_of(p, "exe")))
            .unwrap_or_default();
        let argv = if m.contains_key("argv") {
            strings_of(&m, "argv")
        } else {
            process.map(|p| strings_of(p, "argv")).unwrap_or_default()
        };
        let uid = u32_of(&m, "uid")
            .or_else(|| process.and_then(|p| u32_of(p, "uid")))
            .unwrap_or(0);
        Ok(Event {
            time_unix_nanos: time,
            kind,
            pid,
            ppid,
            exe,
            argv,
            workload_key: workload_key(from_process("workload")),
            uid,
            json: line.trim_end().to_string(),
            ..Event::default()
        })
    }
}

impl Detection {
    /// Builds a detection from one line of the agent's
    /// `--detections-json` output. `time` and `rule` are required.
    /// An unknown severity label is kept in `json` and maps to
    /// `Unspecified`.
    pub fn from_agent_json(line: &str) -> Result<Detection, JsonError> {
        let m = parse_object(line)?;
        let time = parse_time(m.get("time").ok_or(JsonError::Field("time"))?)?;
        let rule = str_of(&m, "rule").ok_or(JsonError::Field("rule"))?;
        let severity = str_of(&m, "severity")
            .and_then(|s| Severity::from_label(&s))
            .unwrap_or(Severity::Unspecified);
        let empty = Map::new();
        let process = m
            .get("process")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        Ok(Detection {
            time_unix_nanos: time,
            rule,
            severity: severity as i32,
            mitre: strings_of(&m, "mitre"),
            summary: str_of(&m, "summary").unwrap_or_default(),
            pid: u32_of(process, "pid").unwrap_or(0),
            ppid: u32_of(process, "ppid").unwrap_or(0),
            exe: str_of(process, "exe").unwrap_or_default(),
            argv: strings_of(process, "argv"),
            workload_key: workload_key(process.get("workload")),
            ancestry: ancestry_of(&m),
            evidence_ids: evidence_ids(m.get("evidence")),
            uid: u32_of(process, "uid").unwrap_or(0),
            comm: str_of(process, "comm").unwrap_or_default(),
            json: line.trim_end().to_string(),
            ..Detection::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXEC: &str = r#"{"time":"2026-11-26T14:08:28.972144046Z","type":"exec","pid":30020,"ppid":30018,"comm":"echo","exe":"/usr/bin/echo","argv":["/bin/echo","hello"],"uid":1000,"process":{"pid":30020,"ppid":30018,"exe":"/usr/bin/echo","workload":{"kind":"host","cgroup":"/"}},"ancestry":[{"pid":30018,"exe":"/usr/bin/bash","argv":["bash"]},{"pid":1,"exe":"/sbin/init","argv":["/sbin/init"]}]}"#;

    #[test]
    fn event_from_readme_example() {
        let e = Event::from_agent_json(EXEC).unwrap();
        assert_eq!(e.kind, "exec");
        assert_eq!(e.pid, 30020);
        assert_eq!(e.ppid, 30018);
        assert_eq!(e.exe, "/usr/bin/echo");
        assert_eq!(e.argv, vec!["/bin/echo", "hello"]);
        assert_eq!(e.uid, 1000);
        assert_eq!(e.workload_key, "host");
        assert_eq!(e.time_unix_nanos, 1_795_702_108_972_144_046);
        assert_eq!(e.json, EXEC);
    }

    #[test]
    fn event_connect_takes_process_fields() {
        let line = r#"{"time":"2026-11-26T14:08:28Z","type":"connect","pid":7,"process":{"pid":7,"ppid":3,"exe":"/usr/bin/curl","argv":["curl","x"],"workload":{"kind":"container","cgroup":"/x","container_id":"0123456789abcdef0123"}}}"#;
        let e = Event::from_agent_json(line).unwrap();
        assert_eq!((e.pid, e.ppid), (7, 3));
        assert_eq!(e.exe, "/usr/bin/curl");
        assert_eq!(e.argv, vec!["curl", "x"]);
        assert_eq!(e.workload_key, "container:0123456789ab");
    }

    #[test]
    fn detection_contract() {
        let id = "ab".repeat(32);
        let line = format!(
            r#"{{"time":"2026-11-26T14:08:28Z","rule":"web_shell_spawn","severity":"high","mitre":["T1059","T1190"],"summary":"node spawned sh","process":{{"pid":10,"ppid":9,"exe":"/bin/sh","comm":"sh","argv":["sh","-c","id"],"uid":33,"workload":{{"kind":"systemd","cgroup":"/system.slice/app.service","systemd_unit":"app.service"}}}},"ancestry":[{{"pid":9,"exe":"/usr/bin/node","argv":["node","app.js"]}},{{"pid":1,"exe":"/sbin/init","argv":[]}}],"evidence":{{"bundle_id":"{id}"}}}}"#
        );
        let d = Detection::from_agent_json(&line).unwrap();
        assert_eq!(d.rule, "web_shell_spawn");
        assert_eq!(d.severity(), Severity::High);
        assert_eq!(d.mitre, vec!["T1059", "T1190"]);
        assert_eq!(d.comm, "sh");
        assert_eq!(d.uid, 33);
        assert_eq!(d.workload_key, "systemd:app.service");
        assert_eq!(d.ancestry.len(), 2);
        assert_eq!(d.ancestry[0].exe, "/usr/bin/node");
        assert_eq!(d.evidence_ids, vec![id]);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            Event::from_agent_json("[1]"),
            Err(JsonError::NotAnObject(_))
        ));
        assert!(matches!(
            Event::from_agent_json("{"),
            Err(JsonError::NotAnObject(_))
        ));
        assert!(matches!(
            Event::from_agent_json(r#"{"type":"exec"}"#),
            Err(JsonError::Field("time"))
        ));
        assert!(matches!(
            Event::from_agent_json(r#"{"time":"yesterday","type":"exec"}"#),
            Err(JsonError::Time(_))
        ));
        assert!(matches!(
            Detection::from_agent_json(r#"{"time":1}"#),
            Err(JsonError::Field("rule"))
        ));
    }

    #[test]
    fn evidence_shapes() {
        let id = "0f".repeat(32);
        let v: Value = serde_json::json!([id, {"id": id}, {"sha256": "../etc"}, "nope"]);
        assert_eq!(evidence_ids(Some(&v)), vec![id]);
        assert!(evidence_ids(None).is_empty());
    }
}
