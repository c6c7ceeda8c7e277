//! Metrics (`--metrics-addr`) and `walfs status` against a real mount: `sqlite3` processes
//! write through a real FUSE mount that replicates to a real `moto_server` behind the
//! fault proxy; `/metrics` is scraped over plain HTTP and `walfs status` runs as its own
//! process. The values must move: TXIDs rise and meet, uploads and bytes grow, the lag
//! returns to 0, the FUSE histogram counts grow; with the replica down the lag and the
//! upload errors rise and `walfs status --max-lag` fails; after recovery it passes again.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy};
use common::scrape::{json, status, wait_for};
use common::{as_strs, free_port, sqlite3, Mount, S3Fixture, S3_ENV, WALFS};

fn insert(m: &Mount, n: usize) {
    let sql: String = (0..n)
        .map(|i| format!("INSERT INTO t(v) VALUES (randomblob(3000) || '{i}');\n"))
        .collect();
    sqlite3(&m.path("app.db"), &sql);
}

/// The values move with the workload, an outage shows as lag and upload errors (and as a
/// failing `walfs status`), and recovery brings both back.
#[test]
fn metrics_and_status_follow_replication_and_an_outage() {
    let r = S3Fixture::new("metrics");
    let proxy = FaultProxy::start(r.moto.port);
    let url = r.moto.s3_url_via(proxy.port, &r.prefix);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = r.args_to(
        &url,
        &[
            "--metrics-addr",
            &addr,
            "--sync-interval",
            "200ms",
            "--lease-ttl",
            "300s",
        ],
    );
    let mut m = Mount::with_env(&as_strs(&args), S3_ENV);
    let replica = format!("replica=\"s3://walfs-test/{}\"", r.prefix);
    let db = "db=\"app.db\"";

    sqlite3(
        &m.path("app.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
    );
    insert(&m, 5);
    let first = wait_for(
        port,
        Duration::from_secs(30),
        "the replica catches up",
        |s| {
            let txid = s.get("walfs_database_txid", &[db]).unwrap_or(0.0);
            txid > 0.0 && s.get("walfs_replica_txid", &[db, &replica]) == Some(txid)
        },
    );
    // The label is the credential-free name: no endpoint, no keys.
    assert!(
        first
            .0
            .iter()
            .all(|(_, l, _)| !l.contains("endpoint") && !l.contains("testing")),
        "a label carries the URL's query"
    );
    let txid1 = first.must("walfs_database_txid", &[db]);
    let uploads1 = first.must("walfs_uploads_total", &[&replica]);
    let bytes1 = first.must("walfs_upload_bytes_total", &[&replica]);
    let opens1 = first.must(
        "walfs_fuse_request_duration_seconds_count",
        &["op=\"open\""],
    );
    assert!(uploads1 > 0.0 && bytes1 > 0.0);
    assert!(first.must("walfs_process_resident_memory_bytes", &[]) > 1e6);
    assert!(first.must("walfs_staging_bytes", &[]) > 0.0);

    insert(&m, 20);
    let caught_up = wait_for(
        port,
        Duration::from_secs(30),
        "the new commits go up",
        |s| {
            let txid = s.must("walfs_database_txid", &[db]);
            txid > txid1
                && s.get("walfs_replica_txid", &[db, &replica]) == Some(txid)
                && s.get("walfs_replication_lag_seconds", &[db, &replica]) == Some(0.0)
                // (Staging drops what was uploaded a moment after the replica holds it.)
                && s.get("walfs_pending_bytes", &[db]) == Some(0.0)
        },
    );
    assert!(caught_up.must("walfs_uploads_total", &[&replica]) > uploads1);
    assert!(caught_up.must("walfs_upload_bytes_total", &[&replica]) > bytes1 + 20.0 * 3000.0);
    assert!(
        caught_up.must(
            "walfs_fuse_request_duration_seconds_count",
            &["op=\"open\""]
        ) > opens1
    );
    assert_eq!(
        caught_up.must(
            "walfs_fuse_request_duration_seconds_bucket",
            &["op=\"open\"", "le=\"+Inf\""]
        ),
        caught_up.must(
            "walfs_fuse_request_duration_seconds_count",
            &["op=\"open\""]
        ),
        "the +Inf bucket counts every open"
    );
    assert_eq!(
        caught_up.must("walfs_upload_errors_total", &[&replica]),
        0.0
    );
    let healthy = status(&m.mountpoint, &["--json", "--max-lag", "5s"]);
    assert_eq!(healthy.status.code(), Some(0), "{healthy:?}");
    let j = json(&healthy);
    let app = &j["databases"].as_array().unwrap()[0];
    assert_eq!(app["path"], "app.db");
    assert_eq!(app["replicas"][0]["txid"], app["txid"]);
    assert_eq!(app["replicas"][0]["lag_seconds"], 0.0);
    assert!(app["replicas"][0]["last_upload"].is_string());

    // The replica goes down: what is committed now waits, and the lag grows.
    proxy.set(Fault::Down);
    let before = Instant::now();
    insert(&m, 5);
    let behind = wait_for(
        port,
        Duration::from_secs(60),
        "lag and errors under an outage",
        |s| {
            s.must("walfs_replication_lag_seconds", &[db, &replica]) >= 1.0
                && s.must("walfs_upload_errors_total", &[&replica]) > 0.0
        },
    );
    let lag = behind.must("walfs_replication_lag_seconds", &[db, &replica]);
    assert!(
        lag <= before.elapsed().as_secs_f64() + 1.0,
        "lag {lag}s is older than the outage"
    );
    assert!(
        behind.must("walfs_replica_txid", &[db, &replica])
            < behind.must("walfs_database_txid", &[db])
    );
    assert!(behind.must("walfs_pending_bytes", &[db]) > 0.0);
    let failing = status(&m.mountpoint, &["--json", "--max-lag", "500ms"]);
    assert_eq!(failing.status.code(), Some(1), "{failing:?}");
    let j = json(&failing);
    let rep = &j["databases"][0]["replicas"][0];
    assert!(rep["lag_seconds"].as_f64().unwrap() >= 1.0, "{j}");
    assert!(rep["last_error"].is_string(), "{j}");
    assert!(
        rep["txid"].as_u64().unwrap() < j["databases"][0]["txid"].as_u64().unwrap(),
        "{j}"
    );
    // The human table says the same.
    let table = status(&m.mountpoint, &["--max-lag", "500ms"]);
    assert_eq!(table.status.code(), Some(1));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("app.db") && text.contains("LAG"), "{text}");
    let errors = behind.must("walfs_upload_errors_total", &[&replica]);
    wait_for(port, Duration::from_secs(60), "errors keep rising", |s| {
        s.must("walfs_upload_errors_total", &[&replica]) > errors
    });

    // Recovery: the replica catches up and the lag returns to 0.
    proxy.set(Fault::Pass);
    wait_for(port, Duration::from_secs(60), "recovery", |s| {
        let txid = s.must("walfs_database_txid", &[db]);
        s.get("walfs_replica_txid", &[db, &replica]) == Some(txid)
            && s.get("walfs_replication_lag_seconds", &[db, &replica]) == Some(0.0)
    });
    let ok = status(&m.mountpoint, &["--json", "--max-lag", "500ms"]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(json(&ok)["databases"][0]["replicas"][0]["last_error"].is_null());

    m.stop();
    // The mount is gone: status says so in one line, with its own code.
    let gone = status(&m.mountpoint, &[]);
    assert_eq!(gone.status.code(), Some(3), "{gone:?}");
    assert_eq!(String::from_utf8_lossy(&gone.stderr).lines().count(), 1);
}

/// `walfs status` on a directory where no walfs mount runs exits 3 with one line; a mount
/// without replicas answers (no replicas, exit 0).
#[test]
fn status_of_a_plain_directory_and_of_a_mount_without_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let out = status(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no walfs mount answers"), "{err}");

    let m = Mount::new();
    let out = status(&m.mountpoint, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let j = json(&out);
    assert_eq!(j["replicas"].as_array().map(Vec::len), Some(0), "{j}");
    let out = status(&m.mountpoint, &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no replicas"),
        "{out:?}"
    );
    // Only the mount's user may ask.
    use std::os::unix::fs::PermissionsExt;
    let socket = walfs::observe::status::socket_path(&m.mountpoint.canonicalize().unwrap());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    // A daemon killed with SIGKILL leaves its socket, which answers no more.
    let mut m = m;
    m.kill9();
    assert!(socket.exists());
    let out = status(&m.mountpoint, &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let _ = std::fs::remove_file(&socket);
}

/// A port in use is a one-line startup error, and nothing is mounted.
#[test]
fn metrics_address_in_use_is_refused_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(WALFS)
        .args(["mount", "--metrics-addr", &addr])
        .arg(&backing)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot serve metrics on"), "{err}");
    assert!(!common::is_mounted(&mnt));
}
