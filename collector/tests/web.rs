//! The web UI of a real collector: authentication, pages, downloads, and a
//! real headless Chromium rendering the incident page (screenshot check).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bundle, sha256_hex, Backend, Collector, Pki};
use vigil_proto::{Detection, DetectionBatch, EvidenceChunk};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Http {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Http {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> Http {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    Http {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn post(addr: SocketAddr, path: &str, extra: &str) -> Http {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n{extra}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    Http {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A detection line; `process` is (pid, exe), `rule` is (id, severity, summary).
fn det(
    sec: u32,
    process: (u32, &str),
    rule: (&str, &str, &str),
    chain: &str,
    evidence: &str,
) -> Detection {
    let ((pid, exe), (rule, sev, summary)) = (process, rule);
    Detection::from_agent_json(&format!(
        r#"{{"time":"2026-11-26T14:09:{sec:02}Z","rule":"{rule}","severity":"{sev}","mitre":["T1059.004","T1190"],"summary":"{summary}","process":{{"pid":{pid},"ppid":0,"exe":"{exe}","comm":"x","argv":["{exe}"],"uid":33,"workload":{{"kind":"container","cgroup":"/docker/x","container_id":"abcdef0123456789abcdef"}}}},"ancestry":{chain},"evidence":{evidence}}}"#
    ))
    .unwrap()
}

/// Pixels of exactly this colour in a PNG.
fn count_colour(png_path: &Path, rgb: [u8; 3]) -> (usize, u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = info.color_type.samples();
    let n = buf[..info.buffer_size()]
        .chunks(bpp)
        .filter(|p| p[..3] == rgb)
        .count();
    (n, info.width, info.height)
}

async fn web_ui(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let ui: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let viewer_file = data.path().join("viewer-token");
    let c = Collector::start(
        backend,
        &pki,
        data.path(),
        &[
            "--ui-addr",
            &ui.to_string(),
            "--ui-viewer-token-file",
            viewer_file.to_str().unwrap(),
        ],
    );
    let token = std::fs::read_to_string(data.path().join("ui-token"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 48);

    let bytes = bundle(300_000, 9);
    let id = sha256_hex(&bytes);
    let node = r#"{"pid":100,"exe":"/usr/bin/node","argv":["node","server.js"]}"#;
    let sh = r#"{"pid":200,"exe":"/bin/sh","argv":["sh","-c","curl | sh"]}"#;
    let dets = vec![
        det(
            1,
            (200, "/bin/sh"),
            ("server_shell", "high", "node spawned a shell"),
            &format!("[{node}]"),
            "null",
        ),
        det(
            2,
            (201, "/usr/bin/curl"),
            ("downloader", "medium", "<script>alert(1)</script>"),
            &format!("[{sh},{node}]"),
            "null",
        ),
        det(
            3,
            (202, "/tmp/xmrig"),
            ("miner", "critical", "miner started"),
            &format!("[{sh},{node}]"),
            &format!(r#""{id}""#),
        ),
    ];
    let mut ingest = c.ingest(&pki, "agent-1").await;
    ingest
        .push_detections(tokio_stream::iter(vec![DetectionBatch {
            batch_id: "d".into(),
            detections: dets,
        }]))
        .await
        .unwrap();
    let chunk = EvidenceChunk {
        bundle_id: id.clone(),
        total_size: bytes.len() as u64,
        offset: 0,
        data: bytes.clone(),
        label: "core".into(),
        signature: Vec::new(),
    };
    assert!(
        ingest
            .upload_evidence(tokio_stream::iter(vec![chunk]))
            .await
            .unwrap()
            .into_inner()
            .complete
    );

    // Authentication.
    let r = get(ui, "/", "");
    assert_eq!(r.status, 303, "{}", r.headers);
    assert_eq!(r.header("location").as_deref(), Some("/login?next=/"));
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));
    assert_eq!(get(ui, "/api/incidents", "").status, 401);
    assert_eq!(
        get(ui, "/api/incidents", "Authorization: Bearer nope\r\n").status,
        401
    );
    assert_eq!(get(ui, "/login?token=nope", "").status, 401);
    let r = get(ui, &format!("/login?token={token}&next=/incidents/1"), "");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location").as_deref(), Some("/incidents/1"));
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(cookie.contains("Max-Age="), "{cookie}");
    // The cookie is a session id, not the token.
    assert!(!cookie.contains(&token), "{cookie}");
    let cookie = format!("Cookie: {}\r\n", cookie.split(';').next().unwrap());
    let token_cookie = format!("Cookie: vigil_ui={token}\r\n");
    assert_eq!(get(ui, "/", &token_cookie).status, 303);
    // An open redirect is not possible.
    let r = get(ui, &format!("/login?token={token}&next=//evil.example"), "");
    assert_eq!(r.header("location").as_deref(), Some("/"));
    // A tab (browsers drop it: `//evil.example`) or a newline in `next`:
    // the login goes home; the handler does not panic and the UI serves on.
    for next in [
        "/%09/evil.example",
        "/%0A/evil.example",
        "/x%0D%0ASet-Cookie:%20a=b",
    ] {
        let r = get(ui, &format!("/login?token={token}&next={next}"), "");
        assert_eq!(r.status, 303, "{next}");
        assert_eq!(r.header("location").as_deref(), Some("/"), "{next}");
        let form = get(ui, &format!("/login?next={next}"), "");
        assert_eq!(form.status, 200, "{next}");
    }

    // Pages and API.
    let list = get(ui, "/", &cookie);
    assert_eq!(list.status, 200);
    // Titled by its most severe detection.
    assert!(list.text().contains("miner started"), "{}", list.text());
    let api = get(
        ui,
        "/api/incidents",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    let json: serde_json::Value = serde_json::from_slice(&api.body).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    let page = get(ui, "/incidents/1", &cookie).text();
    assert!(page.contains("<svg"), "{page}");
    assert_eq!(page.matches("class=\"proc detected\"").count(), 3, "{page}");
    assert!(
        page.contains("https://attack.mitre.org/techniques/T1059/004/"),
        "{page}"
    );
    assert!(page.contains(&format!("/evidence/{id}")), "{page}");
    assert!(!page.contains("<script>"), "agent text must be escaped");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    let svg = get(ui, "/incidents/1/tree.svg", &cookie);
    assert_eq!(svg.header("content-type").as_deref(), Some("image/svg+xml"));
    assert_eq!(get(ui, "/incidents/99", &cookie).status, 404);

    // Evidence download, byte-identical; malformed ids refused.
    let dl = get(ui, &format!("/evidence/{id}"), &cookie);
    assert_eq!(dl.status, 200);
    assert_eq!(dl.body, bytes);
    assert_eq!(
        get(ui, "/evidence/..%2F..%2Fetc%2Fpasswd", &cookie).status,
        400
    );
    assert_eq!(
        get(ui, &format!("/evidence/{}", "0".repeat(64)), &cookie).status,
        404
    );

    // A viewer sees the incident but neither a download link nor the
    // evidence bytes.
    let viewer = std::fs::read_to_string(&viewer_file)
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(viewer, token);
    let v = get(ui, &format!("/login?token={viewer}"), "");
    assert_eq!(v.status, 303);
    let v = format!(
        "Cookie: {}\r\n",
        v.header("set-cookie").unwrap().split(';').next().unwrap()
    );
    let page = get(ui, "/incidents/1", &v).text();
    assert!(
        page.contains(&id) && !page.contains(&format!("/evidence/{id}")),
        "{page}"
    );
    let dl = get(ui, &format!("/evidence/{id}"), &v);
    assert_eq!(dl.status, 403);
    assert!(dl.text().contains("analyst role"), "{}", dl.text());
    let bearer = format!("Authorization: Bearer {viewer}\r\n");
    assert_eq!(get(ui, "/api/incidents", &bearer).status, 200);
    assert_eq!(get(ui, &format!("/evidence/{id}"), &bearer).status, 403);

    // Sign out: the session ends, its cookie no longer opens anything.
    let other = get(ui, &format!("/login?token={token}"), "");
    let other = format!(
        "Cookie: {}\r\n",
        other
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
    );
    let out = post(ui, "/logout", &cookie);
    assert_eq!(out.status, 303);
    assert_eq!(out.header("location").as_deref(), Some("/login"));
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(get(ui, "/", &cookie).status, 303);
    assert_eq!(get(ui, &format!("/evidence/{id}"), &cookie).status, 303);
    // Another session is not affected.
    assert_eq!(get(ui, "/", &other).status, 200);

    // A real browser: log in through the link, render the incident page.
    if backend == Backend::Sqlite {
        let shots = tempfile::tempdir().unwrap();
        let png = shots.path().join("incident.png");
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,900",
            ])
            .arg(format!(
                "--user-data-dir={}",
                shots.path().join("profile").display()
            ))
            .arg(format!("--screenshot={}", png.display()))
            .arg(format!("http://{ui}/login?token={token}&next=/incidents/1"))
            .output()
            .expect("chromium (apt-get install chromium) is needed for the UI test");
        assert!(
            png.exists(),
            "no screenshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(keep) = std::env::var_os("VIGIL_KEEP_SCREENSHOT") {
            std::fs::copy(&png, keep).unwrap();
        }
        let (detected_fill, w, h) = count_colour(&png, [0xfd, 0xe2, 0xe1]);
        assert_eq!((w, h), (1280, 900));
        // Three detected processes drawn as red boxes (the login page has none).
        assert!(
            detected_fill > 3 * 1000,
            "detected-process boxes not rendered: {detected_fill} px"
        );
        let (header, _, _) = count_colour(&png, [0x1d, 0x27, 0x33]);
        assert!(header > 1280 * 20, "page header not rendered: {header} px");
        let (badge, _, _) = count_colour(&png, [0x8e, 0x1b, 0x1b]);
        assert!(
            badge > 100,
            "critical severity badge not rendered: {badge} px"
        );
    }
    drop(c);
}

on_both_stores!(web_ui);

/// `curl` over HTTPS, trusting only the collector's CA: (status, headers).
fn curl_tls(ca: &Path, url: &str) -> Option<(u16, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()
        .expect("curl runs");
    if !out.status.success() {
        return None;
    }
    let headers = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = headers.split(' ').nth(1)?.parse().ok()?;
    Some((status, headers))
}

/// `--ui-tls`: the UI answers HTTPS with the collector's certificate (a
/// client trusting the PKI's CA connects, by name and by address), plain
/// HTTP gets no page, and the session cookie is `Secure`.
async fn web_ui_over_tls(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let ui: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let c = Collector::start(
        backend,
        &pki,
        data.path(),
        &["--ui-addr", &ui.to_string(), "--ui-tls"],
    );
    let token = std::fs::read_to_string(data.path().join("ui-token"))
        .unwrap()
        .trim()
        .to_string();
    let ca = pki.path().join("ca.pem");
    for host in ["localhost", "127.0.0.1"] {
        let (status, _) = curl_tls(&ca, &format!("https://{host}:{}/login", ui.port()))
            .unwrap_or_else(|| panic!("no HTTPS answer from {host}"));
        assert_eq!(status, 200);
    }
    let (status, headers) = curl_tls(
        &ca,
        &format!("https://127.0.0.1:{}/login?token={token}", ui.port()),
    )
    .expect("signing in over HTTPS");
    assert_eq!(status, 303);
    let cookie = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    assert!(cookie.contains("; Secure;"), "{cookie}");
    // A client that does not trust this CA is refused.
    let other = tempfile::tempdir().unwrap();
    vigil_collector::pki::init_pki(&vigil_collector::pki::InitPki {
        dir: other.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    assert!(curl_tls(
        &other.path().join("ca.pem"),
        &format!("https://127.0.0.1:{}/login", ui.port())
    )
    .is_none());
    // Plain HTTP on the same port gets no HTTP page.
    let mut s = TcpStream::connect(ui).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // (The server may close before the request is even written.)
    let _ = write!(s, "GET /login HTTP/1.0\r\nHost: {ui}\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    drop(c);
}

/// The store plays no part in TLS: SQLite only.
#[tokio::test]
async fn web_ui_over_tls_sqlite() {
    web_ui_over_tls(Backend::Sqlite).await
}
