//! A fault-injecting TCP proxy for the tests' S3 (moto_server): it listens on a free port
//! of 127.0.0.1 and forwards each HTTP/1.1 connection to the upstream port, applying the
//! [`Fault`] in force when each request's head arrives. The fault is switched at run time
//! through [`FaultProxy::set`] (the proxy is shared by reference, or its [`FaultHandle`]
//! by clone). Std threads only: one accept thread, and two threads per connection.
//!
//! - `Pass`: forward unchanged.
//! - `Delay(d)`: sleep `d` before forwarding each request (head and body), e.g. +10 ms per
//!   request to measure commit latency against a slower store.
//! - `Status503`: read the request, answer `HTTP/1.1 503 Slow Down` with an S3 XML error
//!   body and `Connection: close`, and close.
//! - `Hang`: read the request and never answer, until the fault changes (then the
//!   connection is closed, so the client retries on a fresh one).
//! - `Reset`: close the connection with a TCP RST (SO_LINGER 0) instead of answering.
//! - `Down`: an outage: new connections are accepted and reset at once, and a request on
//!   an existing connection is reset.
//!
//! Every change of fault also closes hung connections, so `set(Fault::Pass)` lets the
//! clients recover at once. [`FaultProxy::requests`] counts the request heads seen (under
//! any fault). A request with a chunked body switches its connection to a plain byte
//! copy (no more faults or counting on that connection): walfs's S3 client sends
//! `Content-Length` bodies, so this does not happen in practice.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does to each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Delay(Duration),
    Status503,
    Hang,
    Reset,
    Down,
}

struct Shared {
    fault: Mutex<Fault>,
    /// Bumped at each change of fault: a hung connection watches it.
    generation: AtomicU64,
    requests: AtomicU64,
    stop: AtomicBool,
}

/// A clonable handle on a proxy's fault and counters.
#[derive(Clone)]
pub struct FaultHandle(Arc<Shared>);

impl FaultHandle {
    /// Switches the fault for every request from now on; closes hung connections.
    pub fn set(&self, fault: Fault) {
        *self.0.fault.lock().unwrap() = fault;
        self.0.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn fault(&self) -> Fault {
        *self.0.fault.lock().unwrap()
    }

    /// Request heads seen so far, under any fault.
    pub fn requests(&self) -> u64 {
        self.0.requests.load(Ordering::SeqCst)
    }
}

/// A running proxy; stops accepting on drop (open connections end with their peers).
pub struct FaultProxy {
    pub port: u16,
    handle: FaultHandle,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().unwrap().port();
        let handle = FaultHandle(Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            generation: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }));
        let h = handle.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if h.0.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if h.fault() == Fault::Down {
                    reset(client);
                    continue;
                }
                let h = h.clone();
                std::thread::spawn(move || serve(client, upstream, h));
            }
        });
        FaultProxy {
            port,
            handle,
            accept: Some(accept),
        }
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }

    pub fn set(&self, fault: Fault) {
        self.handle.set(fault)
    }

    pub fn fault(&self) -> Fault {
        self.handle.fault()
    }

    pub fn requests(&self) -> u64 {
        self.handle.requests()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.handle.0.stop.store(true, Ordering::SeqCst);
        self.handle.set(Fault::Pass);
        // Wake the accept thread.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            t.join().ok();
        }
    }
}

/// Closes `s` with a TCP RST instead of a FIN.
fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Reads one request head (up to the blank line); `None` at EOF or on an error.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Some(head);
        }
    }
}

/// (Content-Length, chunked) of a request head.
fn body_framing(head: &[u8]) -> (u64, bool) {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut len = 0;
    let mut chunked = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        }
    }
    (len, chunked)
}

/// Reads `len` body bytes from `r`, writing them to `w` if given.
fn copy_body(r: &mut BufReader<TcpStream>, len: u64, w: Option<&mut TcpStream>) -> bool {
    let mut body = r.by_ref().take(len);
    match w {
        Some(w) => std::io::copy(&mut body, w)
            .map(|n| n == len)
            .unwrap_or(false),
        None => std::io::copy(&mut body, &mut std::io::sink())
            .map(|n| n == len)
            .unwrap_or(false),
    }
}

const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>";

fn serve(client: TcpStream, upstream: u16, h: FaultHandle) {
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    // Responses: a plain copy from upstream to the client.
    let (Ok(mut up_r), Ok(mut client_w)) = (up.try_clone(), client.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut up_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
    });
    let Ok(client_ctl) = client.try_clone() else {
        return;
    };
    let mut r = BufReader::new(client);
    while let Some(head) = read_head(&mut r) {
        h.0.requests.fetch_add(1, Ordering::SeqCst);
        let (len, chunked) = body_framing(&head);
        let fault = h.fault();
        match fault {
            Fault::Pass | Fault::Delay(_) => {
                if let Fault::Delay(d) = fault {
                    std::thread::sleep(d);
                }
                if up.write_all(&head).is_err() {
                    break;
                }
                if chunked {
                    // Plain copy from here on (see the header comment).
                    let _ = up.write_all(r.buffer());
                    let mut rest = r.into_inner();
                    let _ = std::io::copy(&mut rest, &mut up);
                    let _ = up.shutdown(Shutdown::Write);
                    let _ = back.join();
                    return;
                }
                if !copy_body(&mut r, len, Some(&mut up)) {
                    break;
                }
            }
            Fault::Status503 => {
                if !chunked {
                    copy_body(&mut r, len, None);
                }
                let mut w = &client_ctl;
                let _ = write!(
                    w,
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN}",
                    SLOW_DOWN.len()
                );
                let _ = w.flush();
                break;
            }
            Fault::Hang => {
                if !chunked {
                    copy_body(&mut r, len, None);
                }
                let generation = h.0.generation.load(Ordering::SeqCst);
                while h.0.generation.load(Ordering::SeqCst) == generation
                    && !h.0.stop.load(Ordering::SeqCst)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                break;
            }
            Fault::Reset | Fault::Down => {
                let _ = up.shutdown(Shutdown::Both);
                drop(r);
                reset(client_ctl);
                let _ = back.join();
                return;
            }
        }
    }
    let _ = up.shutdown(Shutdown::Both);
    let _ = client_ctl.shutdown(Shutdown::Both);
    let _ = back.join();
}
