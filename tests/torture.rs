//! The torture suite (issue 20): seeded, reproducible rounds of random SQLite workloads
//! on a real mount replicating to moto (through a fault-injecting proxy) or to a
//! `file://` directory, with faults, then the oracle on the restore.

mod common;

use std::time::Duration;

use common::fault_proxy::{Fault, FaultProxy};
use common::{http, Moto};

/// The proxy forwards, delays, answers 503, hangs until switched back, resets, and refuses
/// during an outage, counting every request.
#[test]
fn fault_proxy_injects_each_fault() {
    let moto = Moto::start();
    let p = FaultProxy::start(moto.port);
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    p.set(Fault::Delay(Duration::from_millis(200)));
    let t = std::time::Instant::now();
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));
    p.set(Fault::Status503);
    let (status, head, body) = http(p.port, "GET", "/").unwrap();
    assert_eq!(status, 503, "{head}");
    assert!(String::from_utf8_lossy(&body).contains("<Code>SlowDown</Code>"));
    p.set(Fault::Reset);
    assert!(
        http(p.port, "GET", "/").is_err(),
        "a reset request must fail"
    );
    p.set(Fault::Down);
    assert!(
        http(p.port, "GET", "/").is_err(),
        "a request during an outage must fail"
    );
    p.set(Fault::Hang);
    let port = p.port;
    let hung = std::thread::spawn(move || http(port, "GET", "/"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!hung.is_finished(), "a hung request must not be answered");
    p.set(Fault::Pass);
    assert!(
        hung.join().unwrap().is_err(),
        "switching to Pass breaks a hung request"
    );
    assert_eq!(http(p.port, "GET", "/").unwrap().0, 200);
    // Seven requests; the one during the outage was refused before its head was read.
    assert_eq!(p.requests(), 6);
}
