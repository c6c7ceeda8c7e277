//! Credentials never reach walfs's logs, errors or `walfs list` output: a real mount
//! replicating to moto (S3 API on 127.0.0.1) with distinctive credentials in the
//! environment, logging at `trace`, then `list`, `verify` and `restore`, the errors of an
//! unreachable S3 endpoint and of a missing bucket, and replica URLs that carry
//! credentials themselves. Every byte each process printed is searched for them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{as_strs, free_port, Mount, S3Fixture, BUCKET, WALFS};

const KEY_ID: &str = "AKIAWALFSTESTKEY0001";
const SECRET: &str = "wAlFs/Secret+Key/ForTheLeakTest0000001";
const TOKEN: &str = "walfsSessionTokenForTheLeakTest0000001";

/// The credentials, as a child's environment, with every log line on.
const ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", KEY_ID),
    ("AWS_SECRET_ACCESS_KEY", SECRET),
    ("AWS_SESSION_TOKEN", TOKEN),
    ("RUST_LOG", "trace"),
];

/// Fails if `text` (what `what` printed) holds a credential. The access key ID is not a
/// secret by AWS's rules, but walfs shows at most its first four characters.
fn assert_clean(what: &str, text: &str) {
    for (name, secret) in [
        ("secret access key", SECRET),
        ("session token", TOKEN),
        ("access key ID", KEY_ID),
    ] {
        // The secret key and token also as their URL and header encodings.
        let encoded = secret.replace('/', "%2F").replace('+', "%2B");
        assert!(
            !text.contains(secret) && !text.contains(&encoded),
            "{what} printed the {name}:\n{text}"
        );
    }
}

/// Runs `walfs ARGS` with the credentials; returns its status and everything it printed.
fn walfs(args: &[&str]) -> (bool, String) {
    let o = Command::new(WALFS)
        .args(args)
        .envs(ENV.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn credentials_never_reach_logs_errors_or_list_output() {
    let s3 = S3Fixture::new("secrets");
    // A mount at trace level: every request, upload and S3 call logged.
    let mut m = Mount::with_env(&as_strs(&s3.args(&["--sync-interval", "100ms"])), ENV);
    let db = m.path("app.db");
    common::sqlite3(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);",
    );
    common::sqlite3(
        &db,
        "INSERT INTO t VALUES (4); PRAGMA wal_checkpoint(TRUNCATE);",
    );
    s3.moto
        .wait_settled(Duration::from_secs(2), Duration::from_secs(60));
    let log = m.stop();
    assert!(
        log.contains("TRACE") && log.contains("upload"),
        "the mount logged at trace level and uploaded: {log}"
    );
    assert_clean("walfs mount (trace)", &log);

    let url = s3.url();
    let (ok, out) = walfs(&["list", &url]);
    assert!(ok && out.contains("app.db"), "walfs list: {out}");
    assert_clean("walfs list", &out);
    let (ok, out) = walfs(&["verify", &url]);
    assert!(ok, "walfs verify: {out}");
    assert_clean("walfs verify", &out);
    let restored = s3.out("app.db");
    let (ok, out) = walfs(&[
        "restore",
        &url,
        "--db",
        "app.db",
        "-o",
        restored.to_str().unwrap(),
    ]);
    assert!(ok, "walfs restore: {out}");
    assert_clean("walfs restore", &out);
    common::assert_same_database(&m.backing_path("app.db"), &restored);

    // Errors: nothing listens on the endpoint; the bucket does not exist.
    let dead = format!(
        "s3://{BUCKET}/secrets?endpoint=http://127.0.0.1:{}&region=us-east-1",
        free_port()
    );
    let (ok, out) = walfs(&["list", &dead]);
    assert!(!ok, "walfs list of an unreachable S3: {out}");
    assert_clean("walfs list (unreachable)", &out);
    let missing = s3.url().replace(BUCKET, "no-such-bucket");
    let (ok, out) = walfs(&[
        "restore",
        &missing,
        "--db",
        "app.db",
        "-o",
        restored.to_str().unwrap(),
        "--force",
    ]);
    assert!(!ok, "walfs restore from a missing bucket: {out}");
    assert_clean("walfs restore (missing bucket)", &out);
    // A mount whose uploads fail: its error lines name the replica, never the keys.
    let mut m = Mount::with_env(
        &as_strs(&s3.args_to(&dead, &["--sync-interval", "100ms"])),
        ENV,
    );
    common::sqlite3(
        &m.path("b.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = m.stop();
    assert!(
        log.contains("ERROR") || log.contains("WARN"),
        "the failing uploads were logged: {log}"
    );
    assert_clean("walfs mount (unreachable S3)", &log);

    // Credentials written into the replica URL itself are refused without being echoed.
    for url in [
        format!("s3://{KEY_ID}:{SECRET}@{BUCKET}/p?endpoint=http://127.0.0.1:1"),
        format!("s3://{BUCKET}/p?endpoint=http://{KEY_ID}:{SECRET}@127.0.0.1:1"),
        format!("s3://{BUCKET}/p?endpoint=http://127.0.0.1:1&secret-access-key={SECRET}&session-token={TOKEN}"),
        format!("s3://{BUCKET}/p?endpoint=http://127.0.0.1:1&access-key-id={KEY_ID}"),
    ] {
        let (ok, out) = walfs(&["list", &url]);
        assert!(!ok, "walfs list {url}: {out}");
        assert!(out.contains("walfs: error:"), "a one-line error: {out}");
        assert_clean(&format!("walfs list of a URL with credentials ({})", url.len()), &out);
    }
}
