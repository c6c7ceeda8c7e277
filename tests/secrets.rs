//! Credentials never reach walfs's logs, errors or `walfs list` output: a real mount
//! replicating to moto (S3 API on 127.0.0.1) with distinctive credentials in the
//! environment, logging at `trace`, then `list`, `verify` and `restore`, the errors of an
//! unreachable S3 endpoint and of a missing bucket, and replica URLs that carry
//! credentials themselves. The same for an Azure account key and SAS token (a real mount on
//! Azurite, whose account and key are the test's own) and a GCS service account key (no
//! GCS emulator works with walfs's client here: the errors of an unreachable endpoint).
//! Every byte each process printed is searched for them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::azurite::Azurite;
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

const AZ_ACCOUNT: &str = "walfsleak";
/// An Azure account key (base64 of a distinctive text).
const AZ_KEY: &str = "d2FsZnMtYXp1cmUtYWNjb3VudC1rZXktZm9yLXRoZS1sZWFrLXRlc3QtMDAwMSE=";
const AZ_SAS_SIG: &str = "WalfsSasSignatureForTheLeakTest0001";
/// The private key text of a GCS service account key.
const GCS_PRIVATE: &str = "WalfsGcsPrivateKeyForTheLeakTest0001";

/// Fails if `text` holds an Azure or GCS secret.
fn assert_clean_cloud(what: &str, text: &str) {
    for (name, secret) in [
        ("Azure account key", AZ_KEY),
        ("Azure account key (its start)", &AZ_KEY[..24]),
        ("Azure SAS signature", AZ_SAS_SIG),
        ("GCS private key", GCS_PRIVATE),
    ] {
        let encoded = secret
            .replace('/', "%2F")
            .replace('+', "%2B")
            .replace('=', "%3D");
        assert!(
            !text.contains(secret) && !text.contains(&encoded),
            "{what} printed the {name}:\n{text}"
        );
    }
}

/// Runs `walfs ARGS` with `env` (and every log line on); its status and what it printed.
fn walfs_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let o = Command::new(WALFS)
        .args(args)
        .env("RUST_LOG", "trace")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), text)
}

#[test]
fn azure_and_gcs_credentials_never_reach_logs_errors_or_list_output() {
    let az = Azurite::start_with_account(AZ_ACCOUNT, AZ_KEY);
    let key_env: &[(&str, &str)] = &[("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY), ("RUST_LOG", "trace")];
    let staging = tempfile::tempdir().unwrap();
    let url = az.url("secrets");
    let args = [
        "--replica",
        &url,
        "--staging-dir",
        staging.path().to_str().unwrap(),
        "--sync-interval",
        "100ms",
    ];
    let mut m = Mount::with_env(&args, key_env);
    let db = m.path("app.db");
    common::sqlite3(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);",
    );
    common::sqlite3(
        &db,
        "INSERT INTO t VALUES (4); PRAGMA wal_checkpoint(TRUNCATE);",
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = m.stop();
    assert!(
        log.contains("TRACE") && log.contains("upload"),
        "the mount logged at trace level and uploaded: {log}"
    );
    assert_clean_cloud("walfs mount on Azurite (trace)", &log);

    let (ok, out) = walfs_env(&["list", &url], key_env);
    assert!(ok && out.contains("app.db"), "walfs list: {out}");
    assert_clean_cloud("walfs list (abs)", &out);
    let (ok, out) = walfs_env(&["verify", &url], key_env);
    assert!(ok, "walfs verify: {out}");
    assert_clean_cloud("walfs verify (abs)", &out);
    let restored = staging.path().join("restored.db");
    let (ok, out) = walfs_env(
        &[
            "restore",
            &url,
            "--db",
            "app.db",
            "-o",
            restored.to_str().unwrap(),
        ],
        key_env,
    );
    assert!(ok, "walfs restore: {out}");
    assert_clean_cloud("walfs restore (abs)", &out);
    common::assert_same_database(&m.backing_path("app.db"), &restored);

    // Errors: nothing listens on the endpoint; a SAS token Azurite refuses, and one sent
    // to no one (the token travels in the URL's query).
    let dead = format!(
        "abs://{AZ_ACCOUNT}@walfs-test/secrets?endpoint=http://127.0.0.1:{}/{AZ_ACCOUNT}",
        free_port()
    );
    let (ok, out) = walfs_env(&["list", &dead], key_env);
    assert!(!ok, "walfs list of an unreachable Azure endpoint: {out}");
    assert_clean_cloud("walfs list (unreachable abs)", &out);
    let sas =
        format!("sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&sig={AZ_SAS_SIG}");
    let sas_env: &[(&str, &str)] = &[("AZURE_STORAGE_SAS_TOKEN", &sas)];
    for u in [&url, &dead] {
        let (ok, out) = walfs_env(&["list", u], sas_env);
        assert!(!ok, "walfs list with a bad SAS token: {out}");
        assert!(out.contains("walfs: error:"), "{out}");
        assert_clean_cloud("walfs list (abs, SAS)", &out);
    }
    // A mount whose uploads fail against the dead endpoint.
    let mut m = Mount::with_env(
        &[
            "--replica",
            &dead,
            "--staging-dir",
            staging.path().join("dead").to_str().unwrap(),
            "--sync-interval",
            "100ms",
        ],
        sas_env,
    );
    common::sqlite3(
        &m.path("b.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = m.stop();
    assert!(log.contains("WARN") || log.contains("ERROR"), "{log}");
    assert_clean_cloud("walfs mount (unreachable abs, SAS)", &log);
    // A key written into the URL is refused, not echoed.
    let (ok, out) = walfs_env(
        &["list", &format!("abs://{AZ_ACCOUNT}:{AZ_KEY}@walfs-test/p")],
        &[],
    );
    assert!(!ok && out.contains("walfs: error:"), "{out}");
    assert_clean_cloud("walfs list of an abs URL with a key", &out);

    // GCS: a service account key in a file and in the environment; nothing listens.
    let sa = format!(
        "{{\"type\": \"service_account\", \"project_id\": \"p\", \"private_key_id\": \"k1\", \
         \"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{GCS_PRIVATE}\\n-----END PRIVATE KEY-----\\n\", \
         \"client_email\": \"walfs@p.iam.gserviceaccount.com\", \"client_id\": \"1\", \
         \"token_uri\": \"http://127.0.0.1:{}/token\"}}",
        free_port()
    );
    let sa_file = staging.path().join("sa.json");
    std::fs::write(&sa_file, &sa).unwrap();
    let gs = format!(
        "gs://walfs-test/secrets?endpoint=http://127.0.0.1:{}",
        free_port()
    );
    for env in [
        vec![("GOOGLE_APPLICATION_CREDENTIALS", sa_file.to_str().unwrap())],
        vec![("GOOGLE_SERVICE_ACCOUNT", sa_file.to_str().unwrap())],
        vec![("GOOGLE_SERVICE_ACCOUNT_KEY", sa.as_str())],
    ] {
        let (ok, out) = walfs_env(&["list", &gs], &env);
        assert!(!ok, "walfs list of an unreachable GCS: {out}");
        assert!(out.contains("walfs: error:"), "{out}");
        assert_clean_cloud(&format!("walfs list (gs, {})", env[0].0), &out);
    }
    // A mount with that key (not a valid RSA key) refuses to start, in one clean line.
    let dirs = tempfile::tempdir().unwrap();
    for d in ["b", "m"] {
        std::fs::create_dir(dirs.path().join(d)).unwrap();
    }
    let (ok, out) = walfs_env(
        &[
            "mount",
            dirs.path().join("b").to_str().unwrap(),
            dirs.path().join("m").to_str().unwrap(),
            "--replica",
            &gs,
            "--staging-dir",
            staging.path().join("gs").to_str().unwrap(),
        ],
        &[("GOOGLE_SERVICE_ACCOUNT_KEY", &sa)],
    );
    assert!(!ok, "a mount with a malformed GCS key started: {out}");
    let error = out.lines().find(|l| l.starts_with("walfs: error:"));
    assert!(
        error.is_some_and(|l| l.contains("GOOGLE_SERVICE_ACCOUNT_KEY")),
        "{out}"
    );
    assert_clean_cloud("walfs mount (malformed gs key, trace)", &out);
}
