//! A small in-process stand-in for Google Cloud Storage's XML API, the part that
//! object_store's GCS client speaks (no GCS emulator installable here does: see
//! docs/OPERATIONS.md): PUT, GET (with ranges), HEAD and DELETE of objects with
//! `x-goog-meta-*` metadata and generations, `x-goog-if-generation-match` preconditions
//! (412 when they fail, as GCS), and `list-type=2` listings. Buckets are created on first
//! use. It serves 127.0.0.1 on a free port from a thread per connection until dropped.
//!
//! It is not GCS: it checks walfs's GCS path (URL, client, generation-based lease) end to
//! end, not the service's own behaviour.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

#[derive(Clone)]
struct Object {
    body: Vec<u8>,
    generation: u64,
    meta: Vec<(String, String)>,
    modified: SystemTime,
}

#[derive(Default)]
struct State {
    /// (bucket, name) -> object.
    objects: BTreeMap<(String, String), Object>,
    next_generation: u64,
    /// Every request served, as "METHOD path".
    log: Vec<String>,
}

/// The running server; stops accepting when dropped.
pub struct FakeGcs {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FakeGcs {
    pub fn start() -> FakeGcs {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            next_generation: 1_700_000_000_000_001,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        FakeGcs { port, state, stop }
    }

    /// The base URL to give walfs (`endpoint=`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The names of the objects in `bucket` under `prefix`, sorted.
    pub fn names(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.objects
            .keys()
            .filter(|(b, n)| b == bucket && n.starts_with(prefix))
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The metadata of an object, if it exists.
    pub fn metadata(&self, bucket: &str, name: &str) -> Option<Vec<(String, String)>> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(bucket.to_string(), name.to_string()))
            .map(|o| o.meta.clone())
    }

    /// The body of an object, if it exists.
    pub fn body(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        let st = self.state.lock().unwrap();
        st.objects
            .get(&(bucket.to_string(), name.to_string()))
            .map(|o| o.body.clone())
    }

    /// Writes an object as another client would (a new generation, no metadata).
    pub fn put(&self, bucket: &str, name: &str, body: &[u8]) {
        let mut st = self.state.lock().unwrap();
        st.next_generation += 1;
        let o = Object {
            body: body.to_vec(),
            generation: st.next_generation,
            meta: Vec::new(),
            modified: SystemTime::now(),
        };
        st.objects.insert((bucket.to_string(), name.to_string()), o);
    }

    /// The requests served so far, as "METHOD path".
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[m as usize - 1],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn iso_date(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 as (year, month, day) (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, target) = (method.to_string(), target.to_string());
        let mut headers: Vec<(String, String)> = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, resp_headers, resp_body) =
            handle(state, &method, &target, &headers, body, &header);
        let mut head = format!("HTTP/1.1 {status}\r\n");
        for (k, v) in &resp_headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !resp_headers.iter().any(|(k, _)| k == "Content-Length") {
            head.push_str(&format!("Content-Length: {}\r\n", resp_body.len()));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method != "HEAD" && out.write_all(&resp_body).is_err() {
            return;
        }
    }
}

type Response = (&'static str, Vec<(String, String)>, Vec<u8>);

fn object_headers(o: &Object) -> Vec<(String, String)> {
    let mut h = vec![
        ("ETag".to_string(), format!("\"g{}\"", o.generation)),
        ("x-goog-generation".to_string(), o.generation.to_string()),
        ("Last-Modified".to_string(), http_date(o.modified)),
    ];
    for (k, v) in &o.meta {
        h.push((format!("x-goog-meta-{k}"), v.clone()));
    }
    h
}

fn handle(
    state: &Mutex<State>,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    header: &dyn Fn(&str) -> Option<String>,
) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let path = path.trim_start_matches('/');
    let (bucket, name) = match path.split_once('/') {
        Some((b, n)) => (decode(b), decode(n)),
        None => (decode(path), String::new()),
    };
    let mut st = state.lock().unwrap();
    st.log.push(format!("{method} /{bucket}/{name}"));
    let key = (bucket.clone(), name.clone());
    let not_found = || {
        (
            "404 Not Found",
            vec![],
            b"<Error><Code>NoSuchKey</Code></Error>".to_vec(),
        )
    };
    match method {
        "GET" if name.is_empty() => {
            let prefix = query.get("prefix").cloned().unwrap_or_default();
            let mut xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>{bucket}</Name><Prefix>{prefix}</Prefix>"
            );
            let mut n = 0;
            for ((b, k), o) in &st.objects {
                if b != &bucket || !k.starts_with(&prefix) {
                    continue;
                }
                n += 1;
                xml.push_str(&format!(
                    "<Contents><Key>{k}</Key><LastModified>{}</LastModified><ETag>\"g{}\"</ETag><Size>{}</Size></Contents>",
                    iso_date(o.modified),
                    o.generation,
                    o.body.len()
                ));
            }
            xml.push_str(&format!("<KeyCount>{n}</KeyCount></ListBucketResult>"));
            (
                "200 OK",
                vec![("Content-Type".into(), "application/xml".into())],
                xml.into_bytes(),
            )
        }
        "PUT" => {
            if let Some(want) = header("x-goog-if-generation-match") {
                let have = st.objects.get(&key).map_or(0, |o| o.generation);
                if want.parse::<u64>().ok() != Some(have) {
                    return (
                        "412 Precondition Failed",
                        vec![],
                        b"<Error><Code>PreconditionFailed</Code></Error>".to_vec(),
                    );
                }
            }
            st.next_generation += 1;
            let o = Object {
                body,
                generation: st.next_generation,
                meta: headers
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix("x-goog-meta-")
                            .map(|k| (k.to_string(), v.clone()))
                    })
                    .collect(),
                modified: SystemTime::now(),
            };
            let h = object_headers(&o);
            st.objects.insert(key, o);
            ("200 OK", h, vec![])
        }
        "GET" | "HEAD" => {
            let Some(o) = st.objects.get(&key) else {
                return not_found();
            };
            let mut h = object_headers(o);
            if method == "HEAD" {
                h.push(("Content-Length".into(), o.body.len().to_string()));
                return ("200 OK", h, vec![]);
            }
            if let Some(range) =
                header("range").and_then(|r| r.strip_prefix("bytes=").map(String::from))
            {
                let (a, b) = range.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize = b
                    .parse::<usize>()
                    .map_or(o.body.len() - 1, |b| b.min(o.body.len() - 1));
                h.push((
                    "Content-Range".into(),
                    format!("bytes {a}-{b}/{}", o.body.len()),
                ));
                return ("206 Partial Content", h, o.body[a..=b].to_vec());
            }
            ("200 OK", h, o.body.clone())
        }
        "DELETE" => match st.objects.remove(&key) {
            Some(_) => ("204 No Content", vec![], vec![]),
            None => not_found(),
        },
        _ => ("501 Not Implemented", vec![], vec![]),
    }
}
