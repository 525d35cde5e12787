//! Minimal HTTP GET over std TCP and a Prometheus text-format parser, enough
//! to read the agent's `/metrics` endpoint with bounded waits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// [`http_get`] from a child process (`xtask bench-get`), so that the
/// connect is not this process's: the benchmark's load runs in this
/// process, and a workload that connected out is one whose file writes
/// the agent's provenance tracks (as it would not track a service's that
/// never talks to the agent; Prometheus scrapes from elsewhere).
pub fn http_get_apart(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let out = std::process::Command::new(exe)
        .args(["bench-get", &addr.to_string(), path])
        .arg(timeout.as_millis().to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .context("running xtask bench-get")?;
    if !out.status.success() {
        bail!(
            "GET http://{addr}{path}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout).context("bench-get printed non-UTF-8")?;
    let (code, body) = text
        .split_once('\n')
        .context("bench-get printed no status line")?;
    Ok((
        code.trim().parse().context("bench-get's status line")?,
        body.to_string(),
    ))
}

/// `xtask bench-get ADDR PATH TIMEOUT_MS`: prints the status code on one
/// line, then the body.
pub fn bench_get(addr: SocketAddr, path: &str, timeout_ms: u64) -> Result<()> {
    let (code, body) = http_get(addr, path, Duration::from_millis(timeout_ms))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{code}")?;
    out.write_all(body.as_bytes())?;
    Ok(())
}

/// `GET path` on `addr`; returns (status code, body). Every step is bounded
/// by `timeout` (connect, each read/write, and the whole exchange).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() > deadline {
            bail!("GET http://{addr}{path}: no complete answer within {timeout:?}");
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("read from http://{addr}{path}")),
        }
        if raw.len() > 64 * 1024 * 1024 {
            bail!("GET http://{addr}{path}: answer larger than 64 MiB");
        }
    }
    parse_response(&raw).with_context(|| format!("GET http://{addr}{path}"))
}

fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP answer (no end of headers)")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("malformed HTTP status line {status_line:?}"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunked body")?;
        let size_field = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_field.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size..];
        data = data.strip_prefix(b"\r\n").unwrap_or(data);
    }
}

/// One sample line of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses Prometheus / OpenMetrics text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed: usize;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => {
                    consumed = i + 1;
                    break;
                }
                None => return None,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => return None,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return None;
            }
            labels.push((key.trim().to_string(), value));
        }
        rest = &after[consumed..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A parsed scrape with lookup helpers.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn from_text(text: &str) -> Self {
        Self {
            samples: parse(text),
        }
    }

    /// Sum of all series named `name` whose labels include every pair in
    /// `matching`; `None` if no such series exists.
    pub fn sum(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let all = matching
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v));
            if all {
                found = true;
                total += s.value;
            }
        }
        found.then_some(total)
    }
}

/// Scrapes `http://addr/metrics`.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<Scrape> {
    let (code, body) = http_get_apart(addr, "/metrics", timeout)?;
    if code != 200 {
        bail!("GET http://{addr}/metrics answered {code}");
    }
    Ok(Scrape::from_text(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let text = "# HELP vigil_events Events decoded.\n\
                    # TYPE vigil_events counter\n\
                    vigil_events_total{kind=\"exec\"} 120\n\
                    vigil_events_total{kind=\"exit\"} 7\n\
                    vigil_kernel_dropped_total{kind=\"exec\",cpu=\"0\"} 2\n\
                    vigil_kernel_dropped_total{cpu=\"1\",kind=\"exec\"} 3\n\
                    vigil_decode_errors_total 0\n\
                    vigil_process_tree_size 345\n\
                    weird{a=\"x\\\"y,}\",kind=\"exec\"} 1.5e3 1700000000\n\
                    # EOF\n";
        let s = Scrape::from_text(text);
        assert_eq!(
            s.sum("vigil_events_total", &[("kind", "exec")]),
            Some(120.0)
        );
        assert_eq!(s.sum("vigil_events_total", &[]), Some(127.0));
        assert_eq!(
            s.sum("vigil_kernel_dropped_total", &[("kind", "exec")]),
            Some(5.0)
        );
        assert_eq!(s.sum("vigil_decode_errors_total", &[]), Some(0.0));
        assert_eq!(s.sum("vigil_process_tree_size", &[]), Some(345.0));
        assert_eq!(s.sum("weird", &[("a", "x\"y,}")]), Some(1500.0));
        assert_eq!(s.sum("missing", &[]), None);
    }

    #[test]
    fn parses_http_answers() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, "hello".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, "hello world".into())
        );
    }
}
