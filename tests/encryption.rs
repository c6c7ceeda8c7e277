//! Encryption at rest end to end: a real `walfs mount --encryption-key-file` writing with
//! `sqlite3` to a moto S3 replica (and to a `file://` one), then the bucket read with an
//! independent client (boto3): no plaintext page or LTX header in any body, the key id
//! in the metadata. `walfs restore`, `list` and `verify` read it only with the key: a
//! missing or wrong key is one line naming the key id needed, a flipped bit names the
//! object, and after a key rotation the history needs every key it was written with.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{as_strs, assert_same_database, sqlite3, Mount, S3Fixture, S3_ENV, WALFS};

/// Writes a key file of 32 random-looking bytes (from `seed`) as 64 hex digits with a
/// comment, mode 0600, and returns its path and key id.
fn key_file(dir: &Path, name: &str, seed: u8) -> (PathBuf, String) {
    let raw: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(151).wrapping_add(seed.wrapping_mul(89)) ^ 0x5c)
        .collect();
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name);
    std::fs::write(&path, format!("# walfs test key {name}\n{hex}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let id = walfs::replica::crypt::Key::parse(&raw)
        .unwrap()
        .id()
        .to_string();
    (path, id)
}

/// Commits a few transactions of varied size into `db` through the mount.
fn write_rows(m: &Mount, db: &str, rounds: usize) {
    let path = m.path(db);
    sqlite3(
        &path,
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);",
    );
    for i in 0..rounds {
        sqlite3(
            &path,
            &format!(
                "INSERT INTO t(v) SELECT randomblob({}) FROM generate_series(1, 40);",
                100 + i * 37
            ),
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    sqlite3(&path, "PRAGMA wal_checkpoint(TRUNCATE);");
}

/// Every object under the fixture's prefix, read with boto3: (key, body, metadata).
fn bucket_objects(r: &S3Fixture) -> Vec<(String, Vec<u8>, serde_json::Value)> {
    let o = r.moto.boto3(&format!(
        "import base64\n\
         out = []\n\
         for page in s3.get_paginator('list_objects_v2').paginate(Bucket='{bucket}', Prefix='{prefix}/'):\n\
         \x20   for o in page.get('Contents', []):\n\
         \x20       g = s3.get_object(Bucket='{bucket}', Key=o['Key'])\n\
         \x20       out.append([o['Key'], base64.b64encode(g['Body'].read()).decode(), g.get('Metadata', {{}})])\n\
         print(json.dumps(out))\n",
        bucket = common::BUCKET,
        prefix = r.prefix
    ));
    assert!(
        o.status.success(),
        "boto3 listing failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Vec<(String, String, serde_json::Value)> = serde_json::from_slice(&o.stdout).unwrap();
    use base64::Engine as _;
    v.into_iter()
        .map(|(k, b, m)| {
            (
                k,
                base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
                m,
            )
        })
        .collect()
}

/// Overwrites the body of `key` in the bucket with `body` (boto3).
fn put_body(r: &S3Fixture, key: &str, body: &[u8]) {
    use base64::Engine as _;
    let o = r.moto.boto3(&format!(
        "import base64\n\
         s3.put_object(Bucket='{}', Key='{key}', Body=base64.b64decode('{}'))\n",
        common::BUCKET,
        base64::engine::general_purpose::STANDARD.encode(body)
    ));
    assert!(
        o.status.success(),
        "boto3 put failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `walfs ARGS` with moto's credentials and `env`: (success, stdout + stderr).
fn walfs(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let o = Command::new(WALFS)
        .args(args)
        .env_remove("WALFS_ENCRYPTION_KEY_FILE")
        .env_remove("WALFS_ENCRYPTION_KEY")
        .envs(S3_ENV.iter().copied())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Asserts that `out` (a failed command's output) is one line holding every one of
/// `needles`.
fn one_line_with(out: &str, needles: &[&str]) {
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {out}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing from: {out}");
    }
}

/// Waits (up to `limit`) until `db`'s replica holds an object at `level`.
fn wait_for_level(r: &S3Fixture, db: &str, level: u8, limit: Duration) {
    let start = Instant::now();
    while !r.objects(db).iter().any(|o| o.0 == level) {
        assert!(
            start.elapsed() < limit,
            "no level-{level} object within {limit:?}: {:?}",
            r.objects(db)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_encrypted_s3_replica_holds_only_ciphertext_and_restores_only_with_its_key() {
    let r = S3Fixture::new("enc");
    let (k1, id1) = key_file(r.dir.path(), "k1.key", 1);
    let (k2, id2) = key_file(r.dir.path(), "k2.key", 2);
    let k1s = k1.to_str().unwrap();
    let k2s = k2.to_str().unwrap();
    let mut m = r.mount(&[
        "--encryption-key-file",
        k1s,
        "--compaction-intervals",
        "1s,2s",
    ]);
    write_rows(&m, "app.db", 12);
    // Compacted levels are encrypted too.
    wait_for_level(&r, "app.db", 1, Duration::from_secs(20));
    write_rows(&m, "app.db", 2);
    m.stop();

    // What the bucket holds: no plaintext page or LTX header, the key id in each LTX
    // object's metadata and the verification records sealed.
    let objects = bucket_objects(&r);
    let mut ltx = 0;
    for (key, body, meta) in &objects {
        if key.ends_with(".walfs-lease") {
            assert!(body.starts_with(b"walfs-lease"), "{key}");
            continue;
        }
        assert!(body.starts_with(b"WFSE"), "{key} is not encrypted");
        for plain in [&b"SQLite format 3"[..], b"LTX1", b"txid="] {
            assert!(
                !body.windows(plain.len()).any(|w| w == plain),
                "{key} holds {:?}",
                String::from_utf8_lossy(plain)
            );
        }
        assert_eq!(meta["walfs-key-id"], id1.as_str(), "{key}: {meta}");
        if key.ends_with(".ltx") {
            ltx += 1;
            let record = meta["walfs-record"].as_str().unwrap_or("");
            assert!(record.starts_with("wfse1:"), "{key}: {meta}");
        }
    }
    let levels: std::collections::BTreeSet<u8> = r.objects("app.db").iter().map(|o| o.0).collect();
    assert!(
        ltx >= 3 && levels.contains(&1) && levels.contains(&9),
        "{levels:?}"
    );

    // With the key: equal to the live database, verified against the writer's record.
    let (out, _) = r.restore("app.db", "with-key.db", &["--encryption-key-file", k1s]);
    assert_same_database(&m.backing_path("app.db"), &out);
    let (ok, out) = walfs(&["list", &r.url(), "--encryption-key-file", k1s], &[]);
    assert!(ok && out.contains("app.db"), "{out}");
    let (ok, out) = walfs(&["verify", &r.url(), "--encryption-key-file", k1s], &[]);
    assert!(ok && out.contains("checks passed"), "{out}");

    // Without a key, or with another: one line naming the key id needed.
    let e = r.try_restore("app.db", "no-key.db", &[]).unwrap_err();
    one_line_with(&e, &[&id1, "no key was given", "--encryption-key-file"]);
    let e = r
        .try_restore("app.db", "wrong-key.db", &["--encryption-key-file", k2s])
        .unwrap_err();
    one_line_with(&e, &[&id1, &id2]);
    let (ok, out) = walfs(&["list", &r.url()], &[]);
    assert!(!ok);
    one_line_with(&out, &[&id1]);
    let (ok, out) = walfs(&["verify", &r.url(), "--encryption-key-file", k2s], &[]);
    assert!(!ok && out.contains(&id1), "{out}");
    // The key in the environment works as the flag does.
    let (ok, out) = walfs(
        &["list", &r.url()],
        &[("WALFS_ENCRYPTION_KEY_FILE", &format!("{k2s}:{k1s}"))],
    );
    assert!(ok && out.contains("app.db"), "{out}");

    // A flipped bit in the snapshot (every restore starts from it): restore and verify
    // fail and name the object.
    let (snap_key, mut body, _) = objects
        .iter()
        .find(|(k, ..)| k.contains("/0009/"))
        .cloned()
        .expect("a snapshot");
    let mid = body.len() / 2;
    body[mid] ^= 0x01;
    put_body(&r, &snap_key, &body);
    let e = r
        .try_restore("app.db", "tampered.db", &["--encryption-key-file", k1s])
        .unwrap_err();
    one_line_with(&e, &[&snap_key, "failed authentication"]);
    let (ok, out) = walfs(&["verify", &r.url(), "--encryption-key-file", k1s], &[]);
    assert!(!ok, "verify passed a tampered replica: {out}");
    assert!(
        out.contains(&snap_key) && out.contains("failed authentication"),
        "{out}"
    );
}

#[test]
fn after_a_key_rotation_a_restore_needs_every_key_the_history_was_written_with() {
    let r = S3Fixture::new("rot");
    let (k1, id1) = key_file(r.dir.path(), "k1.key", 11);
    let (k2, id2) = key_file(r.dir.path(), "k2.key", 12);
    let k1s = k1.to_str().unwrap();
    let k2s = k2.to_str().unwrap();
    // A database that exists when the first mount starts gets its snapshot from that
    // mount, under the first key.
    let mut m = Mount::prepare(S3_ENV);
    sqlite3(
        &m.backing_path("app.db"),
        "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
         INSERT INTO t(v) VALUES (randomblob(3000));",
    );
    m.start(&as_strs(&r.args(&["--encryption-key-file", k1s])));
    write_rows(&m, "app.db", 4);
    m.stop();
    // The new key encrypts; the old one stays for what it wrote.
    r.restart(
        &mut m,
        &["--encryption-key-file", k2s, "--encryption-key-file", k1s],
    );
    write_rows(&m, "app.db", 4);
    m.stop();

    let objects = bucket_objects(&r);
    let ids: std::collections::BTreeSet<String> = objects
        .iter()
        .filter(|(k, ..)| k.ends_with(".ltx"))
        .map(|(_, _, meta)| meta["walfs-key-id"].as_str().unwrap().to_string())
        .collect();
    let shown: Vec<(&String, &serde_json::Value)> = objects
        .iter()
        .map(|(k, _, m)| (k, &m["walfs-key-id"]))
        .collect();
    assert_eq!(
        ids,
        [id1.clone(), id2.clone()].into(),
        "k1 {id1}, k2 {id2}: {shown:?}\n{}",
        m.log()
    );

    let (out, _) = r.restore(
        "app.db",
        "both.db",
        &["--encryption-key-file", k2s, "--encryption-key-file", k1s],
    );
    assert_same_database(&m.backing_path("app.db"), &out);
    let e = r
        .try_restore("app.db", "new-only.db", &["--encryption-key-file", k2s])
        .unwrap_err();
    one_line_with(&e, &[&id1, &id2, "give the key with id"]);
    let e = r
        .try_restore("app.db", "old-only.db", &["--encryption-key-file", k1s])
        .unwrap_err();
    one_line_with(&e, &[&id2]);

    // A mount without the key refuses to add plaintext objects to the encrypted replica
    // (its lease names the key the last mount wrote with).
    let args = r.args(&[]);
    let mut argv = vec![
        "mount",
        m.backing.to_str().unwrap(),
        m.mountpoint.to_str().unwrap(),
    ];
    argv.extend(as_strs(&args));
    let (ok, out) = walfs(&argv, &[]);
    assert!(!ok, "{out}");
    one_line_with(&out, &["is encrypted", &id2, "--encryption-key-file"]);
    assert!(!common::is_mounted(&m.mountpoint));
}

#[test]
fn an_encrypted_file_replica_round_trips_with_the_key_in_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let (k, id) = key_file(tmp.path(), "k.key", 21);
    let replica = tmp.path().join("replica");
    let url = format!("file://{}", replica.display());
    let staging = tmp.path().join("staging");
    let args = [
        "--replica",
        &url,
        "--staging-dir",
        staging.to_str().unwrap(),
    ];
    let env = [("WALFS_ENCRYPTION_KEY_FILE", k.to_str().unwrap())];
    let mut m = Mount::with_env(&as_strs(&args.map(String::from)), &env);
    std::fs::create_dir_all(m.path("dir")).unwrap();
    write_rows(&m, "dir/app.db", 4);
    m.stop();

    // Every file but the lease is encrypted: LTX objects and the checksum records beside
    // them.
    let mut seen = 0;
    let mut records = 0;
    let mut stack = vec![replica.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.ends_with(".walfs-lease") {
                continue;
            }
            let body = std::fs::read(&p).unwrap();
            assert!(
                body.starts_with(b"WFSE"),
                "{} is not encrypted",
                p.display()
            );
            assert!(!body.windows(4).any(|w| w == b"LTX1"), "{}", p.display());
            seen += 1;
            records += usize::from(p.to_string_lossy().contains("walfs/checksums"));
        }
    }
    assert!(seen >= 2 && records >= 1, "{seen} files, {records} records");

    let out = tmp.path().join("restored.db");
    let (ok, log) = walfs(
        &[
            "restore",
            &url,
            "--db",
            "dir/app.db",
            "-o",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert!(
        ok && log.contains("content checksum matches the writer's record"),
        "{log}"
    );
    assert_same_database(&m.backing_path("dir/app.db"), &out);
    // The database's own replica URL (Litestream's layout) reads it too: objects are not
    // bound to their database's path.
    let own = tmp.path().join("own.db");
    let (ok, log) = walfs(
        &[
            "restore",
            &format!("{url}/dir/app.db"),
            "-o",
            own.to_str().unwrap(),
        ],
        &env,
    );
    assert!(ok, "{log}");
    assert_same_database(&m.backing_path("dir/app.db"), &own);
    let (ok, log) = walfs(
        &[
            "restore",
            &url,
            "--db",
            "dir/app.db",
            "-o",
            tmp.path().join("x.db").to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    one_line_with(&log, &[&id, "no key was given"]);

    // The replica refuses a mount without the key, and a plaintext replica a mount with
    // one: one replica never mixes the two.
    // (At the default log level a mount logs its key id at INFO before it stops.)
    let mount = |url: &str, env: &[(&str, &str)]| {
        let env: Vec<(&str, &str)> = env.iter().copied().chain([("RUST_LOG", "warn")]).collect();
        walfs(
            &[
                "mount",
                m.backing.to_str().unwrap(),
                m.mountpoint.to_str().unwrap(),
                "--replica",
                url,
                "--staging-dir",
                tmp.path().join("staging2").to_str().unwrap(),
            ],
            &env,
        )
    };
    let (ok, log) = mount(&url, &[]);
    assert!(!ok);
    one_line_with(&log, &["is encrypted", &id]);
    let plain = format!("file://{}", tmp.path().join("plain").display());
    let mut p = Mount::with_args(&["--replica", &plain]);
    p.stop();
    drop(p);
    let (ok, log) = mount(&plain, &env);
    assert!(!ok);
    one_line_with(&log, &["written without encryption", "new replica"]);

    // `walfs run` on an empty backing restores the encrypted replica at first boot with
    // the key from the environment, and the command reads the rows.
    let boot = tmp.path().join("boot");
    let boot_mnt = tmp.path().join("boot-mnt");
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::create_dir_all(&boot_mnt).unwrap();
    let expect = sqlite3(&m.backing_path("dir/app.db"), "SELECT count(*) FROM t;");
    let o = Command::new(WALFS)
        .arg("run")
        .arg(&boot)
        .arg(&boot_mnt)
        .args(["--replica", &url, "--staging-dir"])
        .arg(tmp.path().join("boot-staging"))
        .args(["--", "sqlite3"])
        .arg(boot_mnt.join("dir/app.db"))
        .arg("SELECT count(*) FROM t;")
        .env_remove("WALFS_ENCRYPTION_KEY")
        .envs(env)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "walfs run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), expect);
}

#[test]
fn malformed_and_weak_keys_are_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().display());
    let out = tmp.path().join("o.db");
    for (name, content, want) in [
        ("zeros.key", vec![0u8; 32], "weak"),
        ("short.key", b"0123456789abcdef\n".to_vec(), "16 hex digits"),
        (
            "pass.key",
            b"correct horse battery staple 123".to_vec(),
            "passphrase",
        ),
    ] {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        let (ok, log) = walfs(
            &[
                "restore",
                &url,
                "-o",
                out.to_str().unwrap(),
                "--encryption-key-file",
                p.to_str().unwrap(),
            ],
            &[],
        );
        assert!(!ok);
        one_line_with(&log, &[name, want, "head -c 32 /dev/urandom"]);
    }
    // The mount refuses before mounting.
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let bad = tmp.path().join("zeros.key");
    let (ok, log) = walfs(
        &[
            "mount",
            backing.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "--replica",
            &format!("file://{}/r", tmp.path().display()),
            "--staging-dir",
            tmp.path().join("staging").to_str().unwrap(),
            "--encryption-key-file",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    one_line_with(&log, &["zeros.key", "weak"]);
    assert!(!common::is_mounted(&mnt));
}

/// Maintenance that lacks its local copies fetches the objects it builds a snapshot on
/// from the replica, and decrypts those written under the previous key with it.
#[test]
fn a_snapshot_built_from_fetched_objects_reads_the_old_key() {
    let r = S3Fixture::new("fetch");
    let (k1, id1) = key_file(r.dir.path(), "k1.key", 31);
    let (k2, id2) = key_file(r.dir.path(), "k2.key", 32);
    let (k1s, k2s) = (k1.to_str().unwrap(), k2.to_str().unwrap());
    let maintenance = [
        "--sync-interval",
        "200ms",
        "--compaction-intervals",
        "1s,2s",
        "--snapshot-interval",
        "3s",
        "--retention",
        "120s",
    ];
    let first: Vec<&str> = maintenance
        .iter()
        .copied()
        .chain(["--encryption-key-file", k1s])
        .collect();
    let mut m = r.mount(&first);
    write_rows(&m, "app.db", 6);
    m.stop();
    // Staging as a walfs without maintenance left it: no local copies.
    std::fs::remove_dir_all(r.staging().join("app.db").join("replicas")).unwrap();
    let old_max = r.objects("app.db").iter().map(|o| o.2).max().unwrap();
    let mark = r.moto.requests().len();
    let rotated: Vec<&str> = maintenance
        .iter()
        .copied()
        .chain(["--encryption-key-file", k2s, "--encryption-key-file", k1s])
        .collect();
    r.restart(&mut m, &rotated);
    write_rows(&m, "app.db", 6);
    let start = Instant::now();
    while !r
        .objects("app.db")
        .iter()
        .any(|o| o.0 == 9 && o.2 > old_max)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no snapshot beyond TXID {old_max}: {:?}\n{}",
            r.objects("app.db"),
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let gets = r.moto.requests()[mark..]
        .iter()
        .filter(|q| q.starts_with("GET ") && q.contains(".ltx"))
        .count();
    assert!(gets > 0, "the snapshot was built without fetching");
    m.stop();
    let log = m.log();
    assert!(!log.contains("cannot fetch"), "{log}");
    // The new snapshot is under the new key; the fetched objects were under the old.
    let objects = bucket_objects(&r);
    let snap_ids: Vec<&str> = objects
        .iter()
        .filter(|(k, ..)| k.contains("/0009/"))
        .map(|(_, _, meta)| meta["walfs-key-id"].as_str().unwrap())
        .collect();
    assert!(snap_ids.contains(&id2.as_str()), "{snap_ids:?} {id1} {id2}");
    let (out, _) = r.restore(
        "app.db",
        "rotated.db",
        &["--encryption-key-file", k2s, "--encryption-key-file", k1s],
    );
    assert_same_database(&m.backing_path("app.db"), &out);
}
