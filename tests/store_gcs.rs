//! Google Cloud Storage replicas end to end, against an in-process stand-in for GCS's XML
//! API (`common::fake_gcs`: no GCS emulator installable here speaks the API object_store's
//! client uses). Real `walfs mount --replica gs://...` processes, concurrent `sqlite3`
//! writers, kill -9 and a restart; `walfs restore` must equal the backing files, `walfs
//! list` and `walfs verify` must read the replica; the lease, made of GCS's generation
//! preconditions, must refuse a second mount and fence a mount whose lease another writer
//! replaced.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_gcs::FakeGcs;
use common::{as_strs, assert_same_database, wait_timeout, Mount, WALFS};

const BUCKET: &str = "walfs-gcs";
/// Unsigned requests: the stand-in checks no credentials.
const GCS_ENV: &[(&str, &str)] = &[("GOOGLE_SKIP_SIGNATURE", "true")];

struct Fixture {
    gcs: FakeGcs,
    prefix: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        Fixture {
            gcs: FakeGcs::start(),
            prefix: prefix.into(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!(
            "gs://{BUCKET}/{}?endpoint={}",
            self.prefix,
            self.gcs.endpoint()
        )
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

    fn walfs(&self, args: &[&str]) -> (bool, String, String) {
        let o = Command::new(WALFS)
            .args(args)
            .envs(GCS_ENV.iter().copied())
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn restore(&self, db: &str) -> std::path::PathBuf {
        let out = self.dir.path().join("out").join(db);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&out);
        let (ok, _, err) = self.walfs(&[
            "restore",
            &self.url(),
            "--db",
            db,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "walfs restore of {db} failed: {err}");
        assert!(
            err.contains("content checksum matches the writer's record"),
            "restore of {db} was not verified against the recorded checksum: {err}"
        );
        out
    }

    fn lease(&self) -> String {
        String::from_utf8(
            self.gcs
                .body(BUCKET, &format!("{}/.walfs-lease", self.prefix))
                .expect("no lease object"),
        )
        .unwrap()
    }
}

fn writer(db: &Path, w: usize, n: usize) -> std::process::Child {
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

fn finish(writers: Vec<std::process::Child>) {
    for mut w in writers {
        let status = wait_timeout(&mut w, Duration::from_secs(120)).expect("a writer hung");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut err).ok();
        assert!(status.success(), "a sqlite3 writer failed: {err}");
    }
}

fn rows(db: &Path) -> i64 {
    common::sqlite3(db, "SELECT count(*) FROM t;")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn concurrent_writers_kill9_and_restart_then_restore_list_and_verify_from_gcs() {
    let f = Fixture::new("e2e");
    let args = f.args(
        "staging",
        &["--sync-interval", "100ms", "--lease-ttl", "3s"],
    );
    let mut m = Mount::with_env(&as_strs(&args), GCS_ENV);
    std::fs::create_dir(m.path("dir")).unwrap();
    let dbs = ["a.db", "dir/b.db"];
    for db in dbs {
        common::sqlite3(
            &m.path(db),
            "PRAGMA journal_mode=WAL; CREATE TABLE t(w, i, v);",
        );
    }
    finish(
        (0..4)
            .map(|w| writer(&m.path(dbs[w % 2]), w, 300))
            .collect(),
    );
    let writers: Vec<_> = (4..6)
        .map(|w| writer(&m.path(dbs[w % 2]), w, 50_000))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    m.kill9();
    for mut w in writers {
        w.kill().ok();
        w.wait().ok();
    }
    // The restart takes this host's crashed mount's lease over: a conditional update on
    // the lease object's generation.
    m.start(&as_strs(&args));
    finish(
        (6..8)
            .map(|w| writer(&m.path(dbs[w % 2]), w, 200))
            .collect(),
    );
    // Renewals (every 0.5 s while writing) go on generation preconditions too.
    std::thread::sleep(Duration::from_secs(2));
    let log = m.stop();
    assert!(
        !log.contains("ERROR") && !log.contains("cannot renew"),
        "the mount logged errors against the GCS stand-in: {log}"
    );
    assert!(f.lease().contains("released"), "{}", f.lease());

    for db in dbs {
        let backing = m.backing_path(db);
        let n = rows(&backing);
        assert!(n >= 1000, "{db} holds {n} rows");
        let restored = f.restore(db);
        assert_same_database(&backing, &restored);
        let names = f.gcs.names(BUCKET, &format!("e2e/{db}/"));
        let ltx: Vec<_> = names.iter().filter(|n| n.ends_with(".ltx")).collect();
        assert!(!ltx.is_empty(), "{db}: {names:?}");
        for n in &ltx {
            let md = f.gcs.metadata(BUCKET, n).unwrap();
            assert!(
                md.iter().any(|(k, _)| k == "litestream-timestamp"),
                "{n} has no litestream-timestamp: {md:?}"
            );
        }
    }
    let (ok, out, err) = f.walfs(&["list", &f.url()]);
    assert!(ok, "walfs list: {err}");
    for db in dbs {
        assert!(out.contains(db), "walfs list shows {db}: {out}");
    }
    let (ok, out, err) = f.walfs(&["verify", &f.url()]);
    assert!(ok, "walfs verify: {out}{err}");
}

#[test]
fn the_gcs_lease_refuses_a_second_mount_and_fences_a_replaced_one() {
    let f = Fixture::new("lease");
    let ttl = ["--sync-interval", "100ms", "--lease-ttl", "3s"];
    let mut first = Mount::with_env(&as_strs(&f.args("s1", &ttl)), GCS_ENV);
    assert!(
        f.lease()
            .contains(&format!("pid {}", first.child.as_ref().unwrap().id())),
        "{}",
        f.lease()
    );

    // A second mount is refused (a create with generation 0 fails on the existing lease).
    let dir = tempfile::tempdir().unwrap();
    for d in ["b", "m"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let mut child = Command::new(WALFS)
        .arg("mount")
        .arg(dir.path().join("b"))
        .arg(dir.path().join("m"))
        .args(f.args("s2", &[]))
        .envs(GCS_ENV.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = wait_timeout(&mut child, Duration::from_secs(20)) else {
        child.kill().ok();
        child.wait().ok();
        Command::new("umount")
            .arg("-l")
            .arg(dir.path().join("m"))
            .status()
            .ok();
        panic!("a second mount of the same gs:// replica started");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("is in use by another mount"), "{err}");

    // Another writer replaces the lease object (a new generation): the first mount's next
    // renewal fails its precondition, and it stops writing the replica.
    let foreign = "walfs-lease 1\nhost other-host\npid 4242\nmount /srv/other\n\
                   since 2020-01-01T00:00:00Z\nexpires 2999-01-01T00:00:00Z\n";
    f.gcs.put(BUCKET, "lease/.walfs-lease", foreign.as_bytes());
    common::sqlite3(
        &first.path("x.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    );
    let start = Instant::now();
    while !first.log().contains("lost the replica's lease") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the replaced mount did not notice: {}",
            first.log()
        );
        common::sqlite3(&first.path("x.db"), "INSERT INTO t VALUES (2);");
        std::thread::sleep(Duration::from_millis(200));
    }
    first.stop();
    assert_eq!(
        f.lease(),
        foreign,
        "the fenced mount left the other's lease alone"
    );
}
