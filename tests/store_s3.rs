//! `ReplicaStore` against a real S3 API server: `moto_server` (PyPI `moto[server]`) on
//! 127.0.0.1, started on a free port by each test and killed when the test ends. The server
//! comes from `$MOTO_SERVER`, else `$HOME/.cache/walfs/venv/bin/moto_server` (what
//! scripts/test installs). Without it the tests fail: they never skip.

mod common;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Moto, BUCKET};
use walfs::replica::error::StoreErrorKind;
use walfs::replica::store::{ReplicaStore, StoreTuning};
use walfs::replica::url::ReplicaUrl;

/// Runs a Python snippet with boto3 against the server (see [`Moto::boto3`]), required to
/// succeed; returns its stdout.
fn boto3(moto: &Moto, script: &str) -> String {
    let out = moto.boto3(script);
    assert!(
        out.status.success(),
        "boto3 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// HEAD of a key through boto3: its size and `litestream-timestamp` metadata.
fn boto3_head(moto: &Moto, key: &str) -> (u64, String) {
    let out = boto3(
        moto,
        &format!(
            "h = s3.head_object(Bucket='{BUCKET}', Key='{key}')\n\
             print(h['ContentLength'], h['Metadata'].get('litestream-timestamp', '-'))"
        ),
    );
    let (size, stamp) = out.trim().split_once(' ').expect("size and timestamp");
    (size.parse().unwrap(), stamp.to_string())
}

fn ts(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip_in_litestream_layout() {
    let moto = Moto::start();
    let store = ReplicaStore::open(&moto.replica_url("backups/prod")).unwrap();
    assert_eq!(store.requests().total(), 0, "opening makes no request");

    assert!(store.list_ltx("", 0).await.unwrap().is_empty());
    assert!(store.list_databases().await.unwrap().is_empty());

    let body = Bytes::from_static(b"first ltx bytes");
    let info = store
        .put_ltx("", 0, 1, 1, body.clone(), ts(1_700_000_000_123))
        .await
        .unwrap();
    assert_eq!(
        info.key,
        "backups/prod/0000/0000000000000001-0000000000000001.ltx"
    );
    store
        .put_ltx(
            "",
            0,
            2,
            5,
            Bytes::from_static(b"second"),
            ts(1_700_000_001_000),
        )
        .await
        .unwrap();
    store
        .put_ltx(
            "",
            9,
            1,
            5,
            Bytes::from_static(b"snapshot"),
            ts(1_700_000_002_000),
        )
        .await
        .unwrap();
    store
        .put_ltx(
            "dir/app.db",
            10,
            0xab,
            0x1ff,
            Bytes::from_static(b"nested"),
            ts(5),
        )
        .await
        .unwrap();

    // The keys and metadata are Litestream's, checked through another S3 client.
    let listed = boto3(
        &moto,
        &format!(
            "for o in s3.list_objects_v2(Bucket='{BUCKET}')['Contents']: print(o['Key'], o['Size'])"
        ),
    );
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        vec![
            "backups/prod/0000/0000000000000001-0000000000000001.ltx 15",
            "backups/prod/0000/0000000000000002-0000000000000005.ltx 6",
            "backups/prod/0009/0000000000000001-0000000000000005.ltx 8",
            "backups/prod/dir/app.db/000a/00000000000000ab-00000000000001ff.ltx 6",
        ]
    );
    // The timestamp metadata, as Litestream writes it (Go's RFC3339Nano, UTC).
    assert_eq!(
        boto3_head(
            &moto,
            "backups/prod/0000/0000000000000001-0000000000000001.ltx"
        ),
        (15, "2023-11-14T22:13:20.123Z".to_string())
    );
    assert_eq!(
        boto3_head(
            &moto,
            "backups/prod/0009/0000000000000001-0000000000000005.ltx"
        ),
        (8, "2023-11-14T22:13:22Z".to_string())
    );
    let got = boto3(
        &moto,
        &format!(
            "sys.stdout.write(s3.get_object(Bucket='{BUCKET}', \
             Key='backups/prod/0000/0000000000000001-0000000000000001.ltx')['Body'].read().decode())"
        ),
    );
    assert_eq!(got.as_bytes(), body.as_ref());

    let l0 = store.list_ltx("", 0).await.unwrap();
    assert_eq!(
        l0.iter()
            .map(|i| (i.level, i.min_txid, i.max_txid, i.size))
            .collect::<Vec<_>>(),
        vec![(0, 1, 1, body.len() as u64), (0, 2, 5, 6)]
    );
    assert_eq!(store.list_ltx("", 9).await.unwrap().len(), 1);
    let nested = store.list_ltx("dir/app.db", 10).await.unwrap();
    assert_eq!(nested.len(), 1);
    assert_eq!(
        nested[0].key,
        "backups/prod/dir/app.db/000a/00000000000000ab-00000000000001ff.ltx"
    );
    assert!(store.list_ltx("", 1).await.unwrap().is_empty());
    assert_eq!(
        store.list_databases().await.unwrap(),
        vec![String::new(), "dir/app.db".to_string()]
    );

    // HEAD reads the litestream-timestamp metadata back.
    let head = store.head_ltx("", 0, 1, 1).await.unwrap();
    assert_eq!(head.timestamp, ts(1_700_000_000_123));
    assert_eq!(head.size, body.len() as u64);
    assert_eq!(
        store
            .head_ltx("dir/app.db", 10, 0xab, 0x1ff)
            .await
            .unwrap()
            .timestamp,
        ts(5)
    );

    assert_eq!(store.get_ltx("", 0, 1, 1).await.unwrap(), body);
    let missing = store.get_ltx("", 0, 7, 7).await.unwrap_err();
    assert_eq!(missing.kind(), StoreErrorKind::NotFound, "{missing}");
    assert!(
        missing
            .to_string()
            .contains("s3://walfs-test/backups/prod/0000/0000000000000007-0000000000000007.ltx"),
        "{missing}"
    );

    store.delete_ltx("", 0, 1, 1).await.unwrap();
    store.delete_ltx("", 0, 1, 1).await.unwrap(); // deleting a missing object succeeds
    assert_eq!(
        store
            .list_ltx("", 0)
            .await
            .unwrap()
            .iter()
            .map(|i| i.min_txid)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(store.get_ltx("", 0, 1, 1).await.unwrap_err().is_not_found());

    let c = store.requests();
    assert_eq!(
        (c.put, c.get, c.head, c.list, c.delete),
        (4, 3, 2, 8, 2),
        "{c:?}"
    );

    // Idle: no requests happen on their own.
    let before = store.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_single_database_at_bucket_root() {
    let moto = Moto::start();
    let store = ReplicaStore::open(&moto.replica_url("")).unwrap();
    let info = store
        .put_ltx("", 0, 1, 1, Bytes::from_static(b"x"), ts(1))
        .await
        .unwrap();
    assert_eq!(info.key, "0000/0000000000000001-0000000000000001.ltx");
    assert_eq!(
        boto3_head(&moto, &info.key),
        (1, "1970-01-01T00:00:00.001Z".to_string())
    );
    assert_eq!(store.list_ltx("", 0).await.unwrap().len(), 1);
    assert_eq!(store.list_databases().await.unwrap(), vec![String::new()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_clearly_after_bounded_retries() {
    let mut moto = Moto::start();
    let url = moto.replica_url("p");
    moto.stop();
    let tuning = StoreTuning {
        max_retries: 2,
        retry_timeout: Duration::from_secs(3),
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
    };
    let store = ReplicaStore::open_with(&url, &tuning).unwrap();
    let started = Instant::now();
    let err = store
        .put_ltx("", 0, 1, 1, Bytes::from_static(b"x"), ts(1))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("unreachable endpoint after {took:?}: {err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    let msg = err.to_string();
    assert_eq!(err.kind(), StoreErrorKind::Request, "{msg}");
    assert!(
        msg.starts_with(
            "s3 PUT of s3://walfs-test/p/0000/0000000000000001-0000000000000001.ltx failed:"
        ),
        "{msg}"
    );
    assert!(msg.contains("check the credentials, endpoint"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    let err = store.list_ltx("", 0).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("s3 LIST of s3://walfs-test/p/0000/ failed:"),
        "{err}"
    );
}

/// A staged file larger than the multipart threshold is streamed in parts (S3 multipart
/// upload; on a file replica, the store's own multipart writer), keeps its timestamp
/// metadata, and reads back byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_are_streamed_as_multipart_uploads() {
    use walfs::replica::store::MULTIPART_THRESHOLD;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.ltx");
    let len = MULTIPART_THRESHOLD as usize + 5 * 1024 * 1024 + 123;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&file, &data).unwrap();

    let moto = Moto::start();
    let s3 = ReplicaStore::open(&moto.replica_url("mp")).unwrap();
    let local = ReplicaStore::open(
        &ReplicaUrl::parse(&format!("file://{}", dir.path().join("r").display())).unwrap(),
    )
    .unwrap();
    for store in [&s3, &local] {
        let info = store
            .put_ltx_file("db", 9, (1, 7), &file, ts(1234), None)
            .await
            .unwrap();
        assert_eq!(info.size, len as u64);
        let back = store.get_ltx("db", 9, 1, 7).await.unwrap();
        assert!(back.as_ref() == data.as_slice(), "content differs");
    }
    let (size, stamp) = boto3_head(&moto, "mp/db/0009/0000000000000001-0000000000000007.ltx");
    assert_eq!(size, len as u64);
    assert_eq!(stamp, "1970-01-01T00:00:01.234Z");
    // A missing staged file is a clear error, not a partial object.
    let e = s3
        .put_ltx_file("db", 9, (8, 8), &dir.path().join("gone.ltx"), ts(1), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("gone.ltx"), "{e}");
}
