//! Azure Blob Storage replicas end to end: real `walfs mount --replica abs://...` over a
//! real Azurite (`azurite-blob`, the Azure Storage emulator) that each test starts on a free
//! port of 127.0.0.1 and kills when it ends. Concurrent `sqlite3` writer processes, kill -9
//! of walfs and a restart, compaction and retention deletes; then `walfs restore` must give
//! back databases whose pages equal the backing files', `walfs list` and `walfs verify`
//! must read the replica, an independent client (Python's standard library signing Shared
//! Key requests) must find Litestream's layout and metadata in the container, a second
//! mount of the replica must be refused by the lease, and a wrong account key must fail
//! with one line that says what to set.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::azurite::{Azurite, AZURE_ENV};
use common::{as_strs, assert_same_database, wait_timeout, Mount, WALFS};

/// Maintenance fast enough to run within the test: compaction into L1 every second, L0
/// objects compacted away deleted a second later, snapshots and retention in seconds.
const FAST: &[&str] = &[
    "--sync-interval",
    "100ms",
    "--compaction-intervals",
    "1s,3s",
    "--snapshot-interval",
    "4s",
    "--retention",
    "8s",
    "--l0-retention",
    "1s",
];

/// A replica prefix in Azurite's container, with a staging directory and an output
/// directory for restores.
struct Fixture {
    az: Azurite,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        Fixture {
            az: Azurite::start(),
            prefix: prefix.into(),
            dir: tempfile::Builder::new()
                .prefix("walfs-azure-test-")
                .tempdir()
                .unwrap(),
        }
    }

    fn url(&self) -> String {
        self.az.url(&self.prefix)
    }

    fn args(&self, staging: &str, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "--replica".to_string(),
            self.url(),
            "--staging-dir".to_string(),
            self.dir.path().join(staging).display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn out(&self, name: &str) -> std::path::PathBuf {
        let p = self.dir.path().join("out").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&p);
        p
    }

    /// Runs `walfs ARGS` with `env`; its status and what it printed (stdout, stderr).
    fn walfs(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
        let o = Command::new(WALFS)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `walfs restore` of `db`, required to succeed verified against the writer's record;
    /// the restored file.
    fn restore(&self, db: &str) -> std::path::PathBuf {
        let out = self.out(db);
        let (ok, _, err) = self.walfs(
            &[
                "restore",
                &self.url(),
                "--db",
                db,
                "-o",
                out.to_str().unwrap(),
            ],
            AZURE_ENV,
        );
        assert!(ok, "walfs restore of {db} failed: {err}");
        assert!(
            err.contains("content checksum matches the writer's record"),
            "restore of {db} was not verified against the recorded checksum: {err}"
        );
        out
    }
}

/// Starts a `sqlite3` process that commits `n` single-row transactions to `db` (a WAL
/// database with table `t`) as writer `w` (busy timeout generous: other writers share the
/// database).
fn writer(db: &Path, w: usize, n: usize) -> Child {
    let mut sql = String::from(".timeout 30000\n");
    for i in 0..n {
        sql.push_str(&format!(
            "INSERT INTO t VALUES ({w}, {i}, randomblob(300));\n"
        ));
    }
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3");
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(sql.as_bytes());
    });
    child
}

/// Waits for the writers; each must have committed everything.
fn finish(writers: Vec<Child>) {
    for mut w in writers {
        let status = wait_timeout(&mut w, Duration::from_secs(120)).expect("a writer hung");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut err).ok();
        assert!(status.success(), "a sqlite3 writer failed: {err}");
    }
}

/// The rows of `db` (a path under a mount or a backing directory).
fn rows(db: &Path) -> i64 {
    common::sqlite3(db, "SELECT count(*) FROM t;")
        .trim()
        .parse()
        .unwrap()
}

/// The LTX blobs of `db` in the container: (level, min TXID, metadata names), sorted.
fn ltx_blobs(f: &Fixture, db: &str) -> Vec<(u8, u64, Vec<String>)> {
    let mut out: Vec<_> =
        f.az.blobs(&format!("{}/{db}", f.prefix))
            .into_iter()
            .filter_map(|(name, md)| {
                let mut segs = name.rsplit('/');
                let file = segs.next()?.strip_suffix(".ltx")?;
                let level = u8::from_str_radix(segs.next()?, 16).ok()?;
                let min = u64::from_str_radix(file.split_once('-')?.0, 16).ok()?;
                Some((level, min, md.into_iter().map(|(k, _)| k).collect()))
            })
            .collect();
    out.sort();
    out
}

#[test]
fn concurrent_writers_kill9_and_restart_then_restore_list_and_verify_from_azurite() {
    let f = Fixture::new("e2e");
    let args = f.args("staging", FAST);
    let mut m = Mount::with_env(&as_strs(&args), AZURE_ENV);
    std::fs::create_dir(m.path("dir")).unwrap();
    let dbs = ["a.db", "dir/b.db"];
    for db in dbs {
        common::sqlite3(
            &m.path(db),
            "PRAGMA journal_mode=WAL; CREATE TABLE t(w, i, v);",
        );
    }

    // Four writer processes, two per database, at once.
    let writers: Vec<Child> = (0..4)
        .map(|w| writer(&m.path(dbs[w % 2]), w, 300))
        .collect();
    finish(writers);
    for db in dbs {
        assert_eq!(rows(&m.path(db)), 600, "{db}");
    }
    // Let compaction and L0 retention run, then crash the daemon in the middle of more
    // writes.
    std::thread::sleep(Duration::from_secs(4));
    let writers: Vec<Child> = (4..6)
        .map(|w| writer(&m.path(dbs[w % 2]), w, 50_000))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    for db in dbs {
        let n = rows(&m.path(db));
        assert!(
            n > 600 && n < 50_600,
            "{db}: the crash lands mid-writes ({n} rows)"
        );
    }
    m.kill9();
    for mut w in writers {
        w.kill().ok();
        w.wait().ok();
    }

    // The restart takes over this host's crashed mount's lease, reconciles what the
    // backing files hold, and goes on replicating.
    m.start(&as_strs(&args));
    let writers: Vec<Child> = (6..8)
        .map(|w| writer(&m.path(dbs[w % 2]), w, 200))
        .collect();
    finish(writers);
    std::thread::sleep(Duration::from_secs(5));
    let log = m.stop();
    assert!(
        !log.contains("ERROR"),
        "the mount logged errors against Azurite: {log}"
    );

    for db in dbs {
        let backing = m.backing_path(db);
        let n = rows(&backing);
        assert!(n >= 1000, "{db} holds {n} rows");
        let restored = f.restore(db);
        assert_same_database(&backing, &restored);
        assert_eq!(rows(&restored), n, "{db}");

        // Litestream's layout, read by another client: <prefix>/<db>/<level %04x>/...,
        // each object dated in Azure's hyphen-less metadata name, with walfs's record.
        let blobs = ltx_blobs(&f, db);
        assert!(
            blobs
                .iter()
                .all(|(_, _, md)| md.iter().any(|k| k == "litestreamtimestamp")),
            "{db}: an LTX blob without litestreamtimestamp metadata: {blobs:?}"
        );
        assert!(
            blobs
                .iter()
                .any(|(_, _, md)| md.iter().any(|k| k == "walfsrecord")),
            "{db}: no blob carries walfs's verification record: {blobs:?}"
        );
        // Compaction wrote L1 objects, and the L0 objects it covered were deleted.
        assert!(
            blobs.iter().any(|(level, ..)| *level == 1),
            "{db}: compaction wrote nothing to level 1: {blobs:?}"
        );
        assert!(
            !blobs.iter().any(|(level, min, _)| *level == 0 && *min == 1),
            "{db}: the first L0 object outlived its compaction and --l0-retention: {blobs:?}"
        );
    }

    let (ok, out, err) = f.walfs(&["list", &f.url()], AZURE_ENV);
    assert!(ok, "walfs list: {err}");
    for db in dbs {
        assert!(out.contains(db), "walfs list shows {db}: {out}");
    }
    let (ok, out, err) = f.walfs(&["verify", &f.url()], AZURE_ENV);
    assert!(ok, "walfs verify: {out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("all ") && l.ends_with(" checks passed")),
        "walfs verify: {out}"
    );
}

/// Runs `walfs mount ARGS` on fresh directories, expecting it to refuse to start; returns
/// what it printed.
fn refused_mount(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(WALFS)
        .arg("mount")
        .arg(&backing)
        .arg(&mnt)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    if status.is_none() {
        child.kill().ok();
        child.wait().ok();
        Command::new("umount").arg("-l").arg(&mnt).status().ok();
        panic!("a second mount of the same replica started");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    err
}

#[test]
fn a_second_mount_of_an_azure_replica_is_refused_by_the_lease() {
    let f = Fixture::new("lease");
    let mut first = Mount::with_env(&as_strs(&f.args("s1", &["--lease-ttl", "30s"])), AZURE_ENV);
    let lease = f.az.get_text("lease/.walfs-lease");
    assert!(
        lease.contains(&format!("pid {}", first.child.as_ref().unwrap().id())),
        "the lease blob names the first mount: {lease}"
    );

    let err = refused_mount(&as_strs(&f.args("s2", &[])), AZURE_ENV);
    assert!(
        err.contains("is in use by another mount") && err.contains(&f.url()),
        "the second mount names the replica and why: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // Once the first mount gives the lease up, a second mount takes it and writes.
    first.stop();
    assert!(
        f.az.get_text("lease/.walfs-lease").contains("released"),
        "a clean unmount marks the lease released"
    );
    let mut second = Mount::with_env(
        &as_strs(&f.args("s2", &["--sync-interval", "100ms"])),
        AZURE_ENV,
    );
    common::sqlite3(
        &second.path("x.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (42);",
    );
    let start = Instant::now();
    while ltx_blobs(&f, "x.db").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the second mount uploaded nothing: {}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    second.stop();
    let restored = f.restore("x.db");
    assert_same_database(&second.backing_path("x.db"), &restored);
}

#[test]
fn a_wrong_or_missing_account_key_fails_with_one_line_that_says_what_to_set() {
    let f = Fixture::new("keys");
    // A key of the right form that is not the account's: Azurite refuses the signature.
    let wrong = "d3JvbmctYWNjb3VudC1rZXktZm9yLXRoZS13YWxmcy10ZXN0LTAwMDA=";
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("AZURE_STORAGE_ACCOUNT_KEY", wrong)],
            "AZURE_STORAGE_ACCOUNT_KEY",
        ),
        (
            &[("AZURE_STORAGE_ACCOUNT_KEY", "not base64!")],
            "AZURE_STORAGE_ACCOUNT_KEY",
        ),
        (&[], "set AZURE_STORAGE_ACCOUNT_KEY"),
    ];
    for (env, hint) in cases {
        let (ok, out, err) = f.walfs(&["list", &f.url()], env);
        assert!(!ok, "walfs list with {env:?} succeeded: {out}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("walfs: error: "), "{err}");
        assert!(err.contains(hint), "{env:?}: {err}");
        assert!(!err.contains(wrong), "the key was printed: {err}");
    }
    // The right key reads the (empty) replica.
    let (ok, out, err) = f.walfs(&["list", &f.url()], AZURE_ENV);
    assert!(ok, "walfs list: {err}");
    assert!(out.contains("holds no databases"), "{out}");
    // So does AZURE_STORAGE_USE_EMULATOR, which defaults Azurite's account, key and
    // address (AZURITE_BLOB_STORAGE_URL).
    let base = format!("http://127.0.0.1:{}", f.az.port);
    let (ok, out, err) = f.walfs(
        &[
            "list",
            &format!("abs://{}/keys", common::azurite::CONTAINER),
        ],
        &[
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", &base),
        ],
    );
    assert!(ok, "walfs list with AZURE_STORAGE_USE_EMULATOR: {err}");
    assert!(out.contains("holds no databases"), "{out}");
}

/// The conditional writes the lease is made of, straight against Azurite: a create on an
/// existing blob and an update on a stale ETag are both conflicts (Azurite answers 409 and
/// 412), never errors, and the tag each write returns is the one a read sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_writes_on_azurite_conflict_as_the_lease_expects() {
    use bytes::Bytes;
    use walfs::replica::store::{Conditional, ReplicaStore};
    use walfs::replica::url::ReplicaUrl;

    let az = Azurite::start();
    let url = ReplicaUrl::parse_with_env(&az.url("cond"), |k| {
        AZURE_ENV
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let store = ReplicaStore::open(&url).unwrap();
    let key = "cond/.walfs-lease";
    let Conditional::Written(first) = store
        .put_if(key, Bytes::from_static(b"one"), None)
        .await
        .unwrap()
    else {
        panic!("the first create conflicted");
    };
    assert!(!first.is_empty(), "a create returns the blob's ETag");
    assert_eq!(
        store
            .put_if(key, Bytes::from_static(b"two"), None)
            .await
            .unwrap(),
        Conditional::Conflict,
        "a create on an existing blob"
    );
    let Conditional::Written(second) = store
        .put_if(key, Bytes::from_static(b"three"), Some(&first))
        .await
        .unwrap()
    else {
        panic!("an update on the current ETag conflicted");
    };
    assert_ne!(first, second);
    assert_eq!(
        store
            .put_if(key, Bytes::from_static(b"four"), Some(&first))
            .await
            .unwrap(),
        Conditional::Conflict,
        "an update on a stale ETag"
    );
    let (body, tag) = store.get_with_etag(key).await.unwrap();
    assert_eq!(body.as_ref(), b"three");
    assert_eq!(tag.as_deref(), Some(second.as_str()));
    assert_eq!(az.get_text(key), "three");
}

/// An LTX object larger than the multipart threshold goes up as blocks and a block list on
/// Azure, and keeps its timestamp and record in the blob's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_is_uploaded_in_blocks_with_its_metadata() {
    use std::time::SystemTime;
    use walfs::replica::store::{ReplicaStore, MULTIPART_THRESHOLD};
    use walfs::replica::url::ReplicaUrl;

    let az = Azurite::start();
    let url = ReplicaUrl::parse_with_env(&az.url("big"), |k| {
        AZURE_ENV
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let store = ReplicaStore::open(&url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.ltx");
    let len = MULTIPART_THRESHOLD as usize + 3 * 1024 * 1024 + 17;
    let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let info = store
        .put_ltx_file("app.db", 9, (1, 42), &file, ts, Some("record-42".into()))
        .await
        .unwrap();
    assert_eq!(info.size, len as u64);
    assert_eq!(
        info.key,
        "big/app.db/0009/0000000000000001-000000000000002a.ltx"
    );
    let got = store.get_ltx("app.db", 9, 1, 42).await.unwrap();
    assert!(
        got.as_ref() == body.as_slice(),
        "the blob differs from the file"
    );
    let head = store.head_ltx("app.db", 9, 1, 42).await.unwrap();
    assert_eq!(head.timestamp, ts);
    assert_eq!(
        store.head_ltx_record("app.db", 9, 1, 42).await.unwrap(),
        Some("record-42".to_string())
    );
    let blobs = az.blobs("big/app.db");
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert!(
        blobs[0].1.contains(&(
            "litestreamtimestamp".into(),
            "2023-11-14T22:13:20.123Z".into()
        )),
        "{blobs:?}"
    );
}
