//! The incident web UI, served by the collector (axum; server-rendered HTML
//! and SVG, no JavaScript, no build step).
//!
//! Pages: the incident list (`/`), an incident (`/incidents/ID`: summary,
//! ATT&CK ids, the process tree drawn as SVG, the timeline, evidence with
//! download links), and JSON under `/api/`. Every route but `/login` needs
//! a session or the UI token: `/login` (with the token) opens a server-side
//! session whose random id is the `vigil_ui` cookie (never the token),
//! valid for `--ui-session-ttl` and ended by `POST /logout`; API clients
//! send `Authorization: Bearer TOKEN`. Sessions live in memory: a restart
//! signs everyone out.
//!
//! Roles: the UI token (`ui-token`) is the analyst's: everything, evidence
//! downloads included. An optional viewer token (`--ui-viewer-token-file`)
//! shows incidents, trees, timelines and the API, but no evidence bytes
//! (`403`; no download links).
//!
//! Invariants: every value from agents is HTML-escaped; the content
//! security policy allows no script at all; the token is compared in
//! constant time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use serde::Deserialize;
use vigil_proto::{
    IncidentDetail, IncidentSummary, ListDetectionsRequest, ListIncidentsRequest, Severity,
};

use crate::blobs::{BlobState, BlobStore, BundleId};
use crate::incident::{build_tree, TreeNode};
use crate::render;
use crate::store::Store;

const COOKIE: &str = "vigil_ui";
/// Sessions kept at most (the oldest go first past it).
const MAX_SESSIONS: usize = 1024;

/// Shared state of the UI handlers.
#[derive(Clone)]
pub struct Web {
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    token: Arc<str>,
    viewer_token: Option<Arc<str>>,
    sessions: Arc<Sessions>,
    /// `; Secure` on the session cookie (served over HTTPS).
    cookie_attrs: &'static str,
}

/// Who may sign in to the UI, and how its sessions behave.
pub struct UiConfig {
    /// The analyst's token.
    pub token: String,
    /// The viewer's token, if there is a viewer role.
    pub viewer_token: Option<String>,
    /// How long a session lasts after sign-in.
    pub session_ttl: std::time::Duration,
    /// Mark the session cookie `Secure` (the UI is served over HTTPS).
    pub secure_cookies: bool,
}

/// What a UI user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UiRole {
    /// Everything, evidence downloads included (the UI token).
    Analyst,
    /// Incidents and detections, no evidence bytes (the viewer token).
    Viewer,
}

impl Web {
    /// The role a presented token gives, if any (compared in constant time).
    fn role_of(&self, token: &str) -> Option<UiRole> {
        let t = token.trim().as_bytes();
        if constant_time_eq(t, self.token.as_bytes()) {
            Some(UiRole::Analyst)
        } else if self
            .viewer_token
            .as_ref()
            .is_some_and(|v| constant_time_eq(t, v.as_bytes()))
        {
            Some(UiRole::Viewer)
        } else {
            None
        }
    }
}

type SessionMap = std::collections::HashMap<String, (std::time::Instant, UiRole)>;

/// Server-side sessions: SHA-256 of the cookie's random id -> expiry and
/// role.
#[derive(Debug)]
pub struct Sessions {
    ttl: std::time::Duration,
    map: std::sync::Mutex<SessionMap>,
}

impl Sessions {
    /// Sessions that last `ttl` from sign-in.
    pub fn new(ttl: std::time::Duration) -> Sessions {
        Sessions {
            ttl,
            map: Default::default(),
        }
    }

    fn key(id: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session with `role`; its id (the cookie value).
    pub fn open(&self, role: UiRole) -> anyhow::Result<String> {
        use std::io::Read;
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .context("reading /dev/urandom")?;
        let id = hex::encode(raw);
        let now = std::time::Instant::now();
        let mut map = self.lock();
        map.retain(|_, (exp, _)| *exp > now);
        while map.len() >= MAX_SESSIONS {
            let oldest = map
                .iter()
                .min_by_key(|(_, (exp, _))| *exp)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            map.remove(&oldest);
        }
        map.insert(Self::key(&id), (now + self.ttl, role));
        Ok(id)
    }

    /// The role of session `id` when it has not expired (an expired one
    /// is dropped).
    pub fn valid(&self, id: &str) -> Option<UiRole> {
        let key = Self::key(id);
        let mut map = self.lock();
        match map.get(&key) {
            Some((exp, role)) if *exp > std::time::Instant::now() => Some(*role),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        self.lock().remove(&Self::key(id));
    }
}

/// Reads the UI token from `path`, creating a random one (0600) when the
/// file does not exist.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let token = hex::encode(raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}").and_then(|()| f.sync_all())?;
    Ok(token)
}

/// The UI's routes; `ui.token` gives the analyst role, `ui.viewer_token`
/// (if any) the viewer role; a session lasts `ui.session_ttl`.
pub fn router(store: Arc<dyn Store>, blobs: Arc<BlobStore>, ui: UiConfig) -> Router {
    let web = Web {
        store,
        blobs,
        token: ui.token.into(),
        viewer_token: ui.viewer_token.map(Into::into),
        sessions: Arc::new(Sessions::new(ui.session_ttl)),
        cookie_attrs: if ui.secure_cookies {
            "HttpOnly; Secure; SameSite=Strict; Path=/"
        } else {
            "HttpOnly; SameSite=Strict; Path=/"
        },
    };
    let protected = Router::new()
        .route("/", get(incidents_page))
        .route("/incidents/{id}", get(incident_page))
        .route("/incidents/{id}/tree.svg", get(tree_svg_route))
        .route("/evidence/{id}", get(evidence_download))
        .route("/api/incidents", get(api_incidents))
        .route("/api/incidents/{id}", get(api_incident))
        .route("/api/detections", get(api_detections))
        .route_layer(middleware::from_fn_with_state(web.clone(), require_token));
    Router::new()
        .route("/login", get(login_get).post(login_post))
        .route("/logout", axum::routing::post(logout))
        .merge(protected)
        .layer(middleware::from_fn(security_headers))
        .with_state(web)
}

/// Serves the UI on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("web UI server")
}

/// Connections the HTTPS UI serves at once; more wait in the backlog.
const TLS_CONNECTIONS: usize = 256;
/// Time a client has to finish its TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the UI over TLS on `listener` until `shutdown`: each connection
/// gets [`TLS_HANDSHAKE`] to complete its handshake, at most
/// [`TLS_CONNECTIONS`] are served at once (HTTP/1.1 and HTTP/2).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(TLS_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.context("connection slots closed")?,
            () = &mut shutdown => return Ok(()),
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off, do not spin.
                    tracing::warn!(error = %e, "web UI accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "web UI TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "web UI TLS handshake timed out");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "web UI connection ended");
            }
        });
    }
}

/// Whether `addr` is loopback (where a UI without TLS may be served).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

/// The session cookie's value, if any.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

async fn require_token(State(web): State<Web>, mut req: Request, next: Next) -> Response {
    let role = match bearer(req.headers()) {
        Some(t) => web.role_of(&t),
        None => session_cookie(req.headers()).and_then(|id| web.sessions.valid(&id)),
    };
    if let Some(role) = role {
        req.extensions_mut().insert(role);
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/api/") {
        return (StatusCode::UNAUTHORIZED, "token required").into_response();
    }
    let next = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    Redirect::to(&format!("/login?next={}", url_encode(next))).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Only same-site paths are followed after login: a path that starts
/// with one `/` and holds only visible ASCII. Browsers drop tabs and
/// newlines from a URL (`/\t/evil.example` is `//evil.example` to them: an
/// open redirect), and a control character cannot go in a `Location`
/// header at all.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
    next: Option<String>,
}

fn login_ok(web: &Web, token: &str, next: Option<&str>) -> Option<Response> {
    let role = web.role_of(token)?;
    let id = match web.sessions.open(role) {
        Ok(id) => id,
        Err(e) => return Some(server_error(format!("{e:#}"))),
    };
    let cookie = format!(
        "{COOKIE}={id}; {}; Max-Age={}",
        web.cookie_attrs,
        web.sessions.ttl.as_secs().max(1)
    );
    let mut res = Redirect::to(&safe_next(next)).into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("a hex id is a valid header"),
    );
    Some(res)
}

/// `POST /logout`: ends the session and clears the cookie.
async fn logout(State(web): State<Web>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        web.sessions.close(&id);
    }
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!("{COOKIE}=; {}; Max-Age=0", web.cookie_attrs))
            .expect("a valid header"),
    );
    res
}

fn login_form(next: &str, failed: bool) -> Response {
    let msg = if failed {
        r#"<p class="err">Wrong token.</p>"#
    } else {
        ""
    };
    let body = format!(
        r#"<h1>vigil</h1>{msg}<form method="post" action="/login">
<input type="hidden" name="next" value="{}">
<label>UI token <input type="password" name="token" autofocus></label>
<button type="submit">Sign in</button></form>
<p class="muted">The token is in the collector's data directory (<code>ui-token</code>).</p>"#,
        esc(next)
    );
    let status = if failed {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    (status, html_page("Sign in", &body)).into_response()
}

/// `GET /login?token=...&next=...` signs in directly (the link the
/// collector prints); without a token it shows the form.
async fn login_get(State(web): State<Web>, Query(q): Query<LoginQuery>) -> Response {
    let next = safe_next(q.next.as_deref());
    match q.token {
        Some(t) => login_ok(&web, &t, Some(&next)).unwrap_or_else(|| login_form(&next, true)),
        None => login_form(&next, false),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login_post(State(web): State<Web>, Form(f): Form<LoginForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    login_ok(&web, &f.token, Some(&next)).unwrap_or_else(|| login_form(&next, true))
}

/// HTML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2733;background:#f6f8fa}
header{background:#1d2733;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:16px 24px;max-width:1400px}
h1{font-size:20px;margin:8px 0 12px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0001}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e6e9ee;vertical-align:top}
th{background:#eef1f5;font-weight:600;font-size:12px;text-transform:uppercase;color:#4a5868}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.sev{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.sev-critical{background:#8e1b1b}.sev-high{background:#c0392b}.sev-medium{background:#d68910}
.sev-low{background:#2874a6}.sev-info,.sev-unspecified{background:#7f8c8d}
.muted{color:#6b7785}.err{color:#c0392b;font-weight:600}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;padding:12px 16px;margin:0}
dt{color:#6b7785}dd{margin:0}
.tree{background:#fff;padding:8px;overflow-x:auto;box-shadow:0 1px 2px #0001}
form.filters{display:flex;gap:8px;margin-bottom:12px;flex-wrap:wrap}
input,select,button{font:inherit;padding:4px 8px}
.tag{display:inline-block;background:#eef1f5;border-radius:4px;padding:0 6px;margin:0 4px 2px 0}
tr.det td{background:#fff6f5}
"#;

fn html_page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} - vigil</title><style>{CSS}</style></head><body>\
         <header><a href=\"/\">vigil</a><span class=\"muted\">incidents</span>\
         <form method=\"post\" action=\"/logout\" style=\"display:inline;float:right;margin:0\">\
         <button type=\"submit\">Sign out</button></form></header>\
         <main>{body}</main></body></html>",
        esc(title)
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

fn sev_badge(v: i32) -> String {
    let s = render::severity(v);
    format!(r#"<span class="sev sev-{s}">{s}</span>"#)
}

fn mitre_links(ids: &[String]) -> String {
    ids.iter()
        .map(|t| {
            let path = t.replace('.', "/");
            if t.starts_with('T') && t[1..].chars().all(|c| c.is_ascii_digit() || c == '.') {
                format!(
                    r#"<a class="tag mono" href="https://attack.mitre.org/techniques/{}/">{}</a>"#,
                    esc(&path),
                    esc(t)
                )
            } else {
                format!(r#"<span class="tag mono">{}</span>"#, esc(t))
            }
        })
        .collect()
}

fn server_error(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "web UI query failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        html_page(
            "Error",
            "<p class=\"err\">The collector could not read its store; see its log.</p>",
        ),
    )
        .into_response()
}

#[derive(Deserialize, Default)]
struct ListQuery {
    search: Option<String>,
    min_severity: Option<String>,
    agent: Option<String>,
}

impl ListQuery {
    fn request(&self) -> ListIncidentsRequest {
        ListIncidentsRequest {
            search: self.search.clone().unwrap_or_default(),
            agent: self.agent.clone().unwrap_or_default(),
            min_severity: self
                .min_severity
                .as_deref()
                .and_then(Severity::from_label)
                .map(|s| s as i32)
                .unwrap_or(0),
            limit: 200,
            ..Default::default()
        }
    }
}

fn incidents_html(list: &[IncidentSummary], q: &ListQuery) -> String {
    let mut b = String::new();
    let sel = |v: &str| {
        if q.min_severity.as_deref() == Some(v) {
            " selected"
        } else {
            ""
        }
    };
    let _ = write!(
        b,
        r#"<h1>Incidents</h1><form class="filters" method="get" action="/">
<input name="search" placeholder="search rules, executables, workloads" size="36" value="{}">
<input name="agent" placeholder="agent" value="{}">
<select name="min_severity"><option value="">any severity</option>"#,
        esc(q.search.as_deref().unwrap_or("")),
        esc(q.agent.as_deref().unwrap_or(""))
    );
    for s in ["low", "medium", "high", "critical"] {
        let _ = write!(b, r#"<option value="{s}"{}>{s} and above</option>"#, sel(s));
    }
    b.push_str(r#"</select><button type="submit">Filter</button></form>"#);
    if list.is_empty() {
        b.push_str(r#"<p class="muted">No incidents.</p>"#);
        return b;
    }
    b.push_str("<table><tr><th>ID</th><th>Last seen</th><th>Severity</th><th>Detections</th><th>Agent</th><th>Workload</th><th>Incident</th><th>ATT&amp;CK</th></tr>");
    for i in list {
        let _ = write!(
            b,
            r#"<tr><td><a href="/incidents/{id}">{id}</a></td><td class="mono">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="mono">{}</td><td><a href="/incidents/{id}">{}</a><div class="muted mono">root {} [pid {}]</div></td><td>{}</td></tr>"#,
            esc(&render::time_secs(i.last_seen_unix_nanos)),
            sev_badge(i.max_severity),
            i.detection_count,
            esc(&i.agent),
            esc(&i.workload_key),
            esc(&i.title),
            esc(&i.root_exe),
            i.root_pid,
            mitre_links(&i.mitre),
            id = i.id,
        );
    }
    b.push_str("</table>");
    b
}

async fn incidents_page(State(web): State<Web>, Query(q): Query<ListQuery>) -> Response {
    match web.store.list_incidents(&q.request()).await {
        Ok(list) => html_page("Incidents", &incidents_html(&list, &q)),
        Err(e) => server_error(e),
    }
}

const ROW_H: usize = 34;
const BOX_H: usize = 24;
const INDENT: usize = 28;
const CHAR_W: f64 = 7.3;

/// The process tree as an SVG picture: one row per process, indented by
/// depth, elbow connectors from parent to child, detected processes in red
/// with their rules beside them.
pub fn tree_svg(roots: &[TreeNode]) -> String {
    struct Row<'a> {
        depth: usize,
        node: &'a TreeNode,
        parent: Option<usize>,
    }
    fn walk<'a>(n: &'a TreeNode, depth: usize, parent: Option<usize>, rows: &mut Vec<Row<'a>>) {
        let me = rows.len();
        rows.push(Row {
            depth,
            node: n,
            parent,
        });
        for c in &n.children {
            walk(c, depth + 1, Some(me), rows);
        }
    }
    let mut rows = Vec::new();
    for r in roots {
        walk(r, 0, None, &mut rows);
    }
    let mut body = String::new();
    let mut width = 200.0f64;
    for (i, r) in rows.iter().enumerate() {
        let x = 10 + r.depth * INDENT;
        let y = 10 + i * ROW_H;
        if let Some(p) = r.parent {
            let px = 10 + rows[p].depth * INDENT + 12;
            let py = 10 + p * ROW_H + BOX_H;
            let _ = write!(
                body,
                r##"<path d="M{px} {py} V{} H{x}" fill="none" stroke="#8795a8" stroke-width="1.5"/>"##,
                y + BOX_H / 2
            );
        }
        let n = r.node;
        let cmd = if n.argv.is_empty() {
            n.exe.clone()
        } else {
            render::command_line(&n.argv, 90)
        };
        let label = format!("{cmd}  [pid {}]", n.pid);
        let w = label.chars().count() as f64 * CHAR_W + 16.0;
        let detected = !n.rules.is_empty();
        let (fill, stroke) = if detected {
            ("#fde2e1", "#c0392b")
        } else {
            ("#eef2f7", "#8795a8")
        };
        let _ = write!(
            body,
            r##"<g class="proc{}"><title>{}</title><rect x="{x}" y="{y}" width="{w:.0}" height="{BOX_H}" rx="5" fill="{fill}" stroke="{stroke}" stroke-width="{}"/><text x="{}" y="{}" font-family="ui-monospace,Menlo,monospace" font-size="12" fill="#1d2733">{}</text>"##,
            if detected { " detected" } else { "" },
            esc(&format!("{} (pid {})", n.exe, n.pid)),
            if detected { 2 } else { 1 },
            x + 8,
            y + 16,
            esc(&label)
        );
        let mut right = x as f64 + w;
        if detected {
            let rules = n.rules.join(", ");
            let _ = write!(
                body,
                r##"<text x="{:.0}" y="{}" font-family="system-ui,sans-serif" font-size="12" font-weight="600" fill="#c0392b">{}</text>"##,
                right + 10.0,
                y + 16,
                esc(&rules)
            );
            right += 10.0 + rules.chars().count() as f64 * 7.0;
        }
        body.push_str("</g>");
        width = width.max(right + 20.0);
    }
    let height = 20 + rows.len().max(1) * ROW_H;
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height}" viewBox="0 0 {width:.0} {height}" role="img" aria-label="process tree">{body}</svg>"#
    )
}

fn incident_html(d: &IncidentDetail, role: UiRole) -> String {
    let mut b = String::new();
    let Some(i) = &d.incident else {
        return b;
    };
    let _ = write!(
        b,
        r#"<h1>Incident {} {} <span>{}</span></h1><dl>
<dt>Agent</dt><dd>{}</dd><dt>Workload</dt><dd class="mono">{}{}</dd>
<dt>Root</dt><dd class="mono">{} [pid {}]</dd>
<dt>Seen</dt><dd class="mono">{} .. {}</dd><dt>Detections</dt><dd>{}</dd>
<dt>Rules</dt><dd>{}</dd><dt>ATT&amp;CK</dt><dd>{}</dd></dl>"#,
        i.id,
        sev_badge(i.max_severity),
        esc(&i.title),
        esc(&i.agent),
        esc(&i.workload_key),
        render::incident_container(d)
            .map(|c| format!("<br>{}", esc(&c)))
            .unwrap_or_default(),
        esc(&i.root_exe),
        i.root_pid,
        esc(&render::time_nanos(i.first_seen_unix_nanos)),
        esc(&render::time_nanos(i.last_seen_unix_nanos)),
        i.detection_count,
        i.rules
            .iter()
            .map(|r| format!(r#"<span class="tag mono">{}</span>"#, esc(r)))
            .collect::<String>(),
        mitre_links(&i.mitre),
    );
    let _ = write!(
        b,
        r#"<h2>Process tree</h2><div class="tree">{}</div>"#,
        tree_svg(&build_tree(&d.detections, &d.events))
    );

    // Timeline: detections and events, oldest first.
    let mut rows: Vec<(i64, bool, String)> = Vec::new();
    for s in &d.detections {
        if let Some(det) = &s.detection {
            rows.push((
                det.time_unix_nanos,
                true,
                format!(
                    r#"<td>{}</td><td class="mono">{}</td><td class="mono">{}</td><td>{} {}</td>"#,
                    sev_badge(det.severity),
                    esc(&det.rule),
                    det.pid,
                    esc(&det.summary),
                    mitre_links(&det.mitre)
                ),
            ));
        }
    }
    for e in d.events.iter().filter_map(|s| s.event.as_ref()) {
        let what = if e.argv.is_empty() {
            e.exe.clone()
        } else {
            render::command_line(&e.argv, 160)
        };
        rows.push((
            e.time_unix_nanos,
            false,
            format!(
                r#"<td class="muted">event</td><td class="mono">{}</td><td class="mono">{}</td><td class="mono">{}</td>"#,
                esc(&e.kind),
                e.pid,
                esc(&what)
            ),
        ));
    }
    rows.sort_by_key(|r| r.0);
    b.push_str("<h2>Timeline</h2><table><tr><th>Time</th><th></th><th>Rule / kind</th><th>PID</th><th>What</th></tr>");
    for (t, det, cells) in rows {
        let _ = write!(
            b,
            r#"<tr{}><td class="mono">{}</td>{cells}</tr>"#,
            if det { r#" class="det""# } else { "" },
            esc(&render::time_nanos(t))
        );
    }
    b.push_str("</table><h2>Evidence</h2>");
    if d.evidence.is_empty() {
        b.push_str(r#"<p class="muted">None.</p>"#);
    } else {
        b.push_str("<table><tr><th>Bundle</th><th>Size</th><th>From</th><th>Stored</th><th>Captured</th></tr>");
        for e in &d.evidence {
            if e.stored_unix_nanos == 0 {
                let _ = write!(
                    b,
                    r#"<tr><td class="mono">{}</td><td colspan="4" class="muted">not uploaded yet</td></tr>"#,
                    esc(&e.bundle_id)
                );
            } else if role == UiRole::Viewer {
                let _ = write!(
                    b,
                    r#"<tr><td class="mono" title="downloading evidence needs the analyst role">{id}</td><td>{}</td><td>{}</td><td class="mono">{}</td><td>{}</td></tr>"#,
                    esc(&render::bytes(e.size)),
                    esc(&e.agent),
                    esc(&render::time_secs(e.stored_unix_nanos)),
                    esc(render::provenance(e).trim()),
                    id = esc(&e.bundle_id),
                );
            } else {
                let _ = write!(
                    b,
                    r#"<tr><td class="mono"><a href="/evidence/{id}" download="{id}.zst">{id}</a></td><td>{}</td><td>{}</td><td class="mono">{}</td><td>{}</td></tr>"#,
                    esc(&render::bytes(e.size)),
                    esc(&e.agent),
                    esc(&render::time_secs(e.stored_unix_nanos)),
                    esc(render::provenance(e).trim()),
                    id = esc(&e.bundle_id),
                );
            }
        }
        b.push_str("</table>");
    }
    let _ = write!(
        b,
        r#"<p class="muted">JSON: <a href="/api/incidents/{0}">/api/incidents/{0}</a> · CLI: <code>vigil incidents show {0}</code></p>"#,
        i.id
    );
    b
}

async fn load_incident(web: &Web, id: i64) -> Result<IncidentDetail, Response> {
    match web.store.incident(id).await {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err((
            StatusCode::NOT_FOUND,
            html_page("Not found", &format!("<p>No incident {id}.</p>")),
        )
            .into_response()),
        Err(e) => Err(server_error(e)),
    }
}

async fn incident_page(
    State(web): State<Web>,
    axum::Extension(role): axum::Extension<UiRole>,
    UrlPath(id): UrlPath<i64>,
) -> Response {
    match load_incident(&web, id).await {
        Ok(d) => html_page(&format!("Incident {id}"), &incident_html(&d, role)),
        Err(r) => r,
    }
}

async fn tree_svg_route(State(web): State<Web>, UrlPath(id): UrlPath<i64>) -> Response {
    match load_incident(&web, id).await {
        Ok(d) => (
            [(header::CONTENT_TYPE, "image/svg+xml")],
            tree_svg(&build_tree(&d.detections, &d.events)),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn evidence_download(
    State(web): State<Web>,
    axum::Extension(role): axum::Extension<UiRole>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if role != UiRole::Analyst {
        return (
            StatusCode::FORBIDDEN,
            "downloading evidence needs the analyst role (the UI token, not the viewer token)",
        )
            .into_response();
    }
    let Ok(id) = BundleId::parse(&id) else {
        return (StatusCode::BAD_REQUEST, "invalid bundle id").into_response();
    };
    let blobs = Arc::clone(&web.blobs);
    let id2 = id.clone();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        match blobs.state(&id2)? {
            BlobState::Complete { size } => Ok(Some((blobs.open_blob(&id2)?, size))),
            _ => Ok(None),
        }
    })
    .await;
    let (file, size) = match opened {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return (StatusCode::NOT_FOUND, "no such bundle").into_response(),
        Ok(Err(e)) => return server_error(e),
        Err(e) => return server_error(e),
    };
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.zst\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn api_incidents(State(web): State<Web>, Query(q): Query<ListQuery>) -> Response {
    match web.store.list_incidents(&q.request()).await {
        Ok(list) => Json(
            list.iter()
                .map(render::incident_summary_json)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => server_error(e),
    }
}

async fn api_incident(State(web): State<Web>, UrlPath(id): UrlPath<i64>) -> Response {
    match load_incident(&web, id).await {
        Ok(d) => Json(render::incident_json(&d)).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize, Default)]
struct DetectionQuery {
    rule: Option<String>,
    incident: Option<i64>,
    search: Option<String>,
}

async fn api_detections(State(web): State<Web>, Query(q): Query<DetectionQuery>) -> Response {
    let req = ListDetectionsRequest {
        rule: q.rule.unwrap_or_default(),
        incident_id: q.incident.unwrap_or(0),
        search: q.search.unwrap_or_default(),
        limit: 200,
        ..Default::default()
    };
    match web.store.list_detections(&req).await {
        Ok(list) => {
            Json(list.iter().map(render::detection_json).collect::<Vec<_>>()).into_response()
        }
        Err(e) => server_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc(r#"<script>"a"&'b'</script>"#),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn next_is_same_site_only() {
        assert_eq!(safe_next(Some("/incidents/3")), "/incidents/3");
        for bad in [
            "https://evil",
            "//evil",
            "/\\evil",
            "evil",
            "/\t/evil.example",
            "/\n/evil.example",
            "/ /evil.example",
            "/x\r\nSet-Cookie: a=b",
            "/\u{7f}/evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad:?}");
        }
        assert_eq!(safe_next(Some("/?q=a%20b&x=1")), "/?q=a%20b&x=1");
    }

    #[test]
    fn token_from_cookie_or_bearer() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; vigil_ui=abc; c=d"),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
        assert_eq!(bearer(&h), None);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert_eq!(bearer(&h).as_deref(), Some("xyz"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn sessions_expire_close_and_are_bounded() {
        let s = Sessions::new(std::time::Duration::from_millis(50));
        let a = s.open(UiRole::Analyst).unwrap();
        assert_eq!(s.valid(&a), Some(UiRole::Analyst));
        assert_eq!(s.valid("not-a-session"), None);
        let v = s.open(UiRole::Viewer).unwrap();
        assert_eq!(s.valid(&v), Some(UiRole::Viewer));
        s.close(&a);
        assert_eq!(s.valid(&a), None, "closed");
        let b = s.open(UiRole::Analyst).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.valid(&b), None, "expired");
        let long = Sessions::new(std::time::Duration::from_secs(3600));
        let first = long.open(UiRole::Analyst).unwrap();
        for _ in 0..MAX_SESSIONS {
            long.open(UiRole::Viewer).unwrap();
        }
        assert_eq!(long.valid(&first), None, "the oldest went first");
        assert_eq!(long.lock().len(), MAX_SESSIONS);
    }

    #[test]
    fn svg_tree_marks_detected_processes() {
        let tree = TreeNode {
            pid: 1,
            exe: "/usr/bin/node".into(),
            argv: vec!["node".into(), "<app>.js".into()],
            rules: vec![],
            children: vec![TreeNode {
                pid: 2,
                exe: "/bin/sh".into(),
                argv: vec!["sh".into()],
                rules: vec!["web_shell".into()],
                children: vec![],
            }],
        };
        let svg = tree_svg(&[tree]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect").count(), 2);
        assert_eq!(svg.matches("class=\"proc detected\"").count(), 1);
        assert!(svg.contains("&lt;app&gt;.js"), "{svg}");
        assert!(!svg.contains("<app>"));
        assert_eq!(svg.matches("<path").count(), 1);
    }
}
