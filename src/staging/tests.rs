//! Tests of the staging area: layout, durability across reopen, uploads, crash leftovers,
//! and errors on a full or read-only filesystem.

use std::path::Path;

use super::*;
use crate::ltx::decode;
use crate::sqlite::page_hash;

fn page(ps: usize, fill: u8) -> Vec<u8> {
    vec![fill; ps]
}

fn wal_pos() -> WalPosition {
    let h = WalHeader::new(false, 4096, 3, 0xdead_beef, 42);
    WalPosition {
        header: h,
        committed_end: 32 + 5 * 4120,
        checksum: [7, u32::MAX],
    }
}

#[test]
fn state_roundtrip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = Path::new("sub/dir/app.db");
    let st = DbState {
        txid: 17,
        page_size: 4096,
        commit: 9,
        checksum: ContentChecksum::from_value(0x1234 << 100 | 0x5678),
        wal: Some(wal_pos()),
        uploaded_txid: 3,
    };
    {
        let s = Staging::open(dir.path()).unwrap();
        assert_eq!(s.state(db).unwrap(), None);
        s.save_state(db, &st).unwrap();
        assert_eq!(s.state(db).unwrap(), Some(st));
    }
    let s = Staging::open(dir.path()).unwrap();
    assert_eq!(s.state(db).unwrap(), Some(st));
    let no_wal = DbState { wal: None, ..st };
    s.save_state(db, &no_wal).unwrap();
    assert_eq!(s.state(db).unwrap(), Some(no_wal));
    assert!(dir.path().join("sub/dir/app.db/state").is_file());

    // A corrupted state file is an error, never a silent default.
    let path = dir.path().join("sub/dir/app.db/state");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("txid 17", "txid 18");
    fs::write(&path, text).unwrap();
    let e = s.state(db).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("crc"), "{e}");

    // A format-1 state (CRC-64 checksum, from before blake3) keeps its TXIDs and WAL
    // position, with page size 0 so that it matches no database: the capture heals.
    let v1_body = "walfs-staging-state 1\ntxid 17\npage_size 4096\ncommit 9\nchecksum 80000000deadbeef\nuploaded_txid 3\n";
    let v1 = format!("{v1_body}crc {:016x}\n", crc_of(v1_body));
    fs::write(&path, v1).unwrap();
    assert_eq!(
        s.state(db).unwrap(),
        Some(DbState {
            page_size: 0,
            checksum: ContentChecksum::EMPTY,
            ..no_wal
        })
    );

    // Keys must be plain relative paths.
    for bad in ["", "/abs.db", "../up.db", "a/../b.db"] {
        assert!(s.state(Path::new(bad)).is_err(), "{bad}");
    }
}

fn append(seg: &mut SegmentWriter, min: u64, max: u64, pages: &[(u32, u8)]) {
    let mut w = seg
        .begin(BatchHeader {
            page_size: 512,
            commit: 4,
            min_txid: min,
            max_txid: max,
            timestamp_ms: 2000 + max as i64,
            page_count: pages.len() as u32,
            wal: None,
        })
        .unwrap();
    for &(pgno, fill) in pages {
        let data = page(512, fill);
        w.add_page(pgno, &data, page_hash(pgno, &data)).unwrap();
    }
    w.finish(ContentChecksum::from_value(max.into())).unwrap();
}

fn ranges(s: &Staging, db: &Path) -> Vec<(u64, u64, bool)> {
    s.pending(db)
        .unwrap()
        .iter()
        .map(|p| (p.min_txid(), p.max_txid(), matches!(p, Staged::Snapshot(_))))
        .collect()
}

#[test]
fn snapshots_segments_upload_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let s = Staging::open(dir.path().join("staging")).unwrap();
    s.set_checksums(true);
    let db = Path::new("x.db");
    let ps = 512usize;
    let pages: Vec<io::Result<(u32, Vec<u8>)>> =
        (1..=3).map(|p| Ok((p, page(ps, p as u8)))).collect();
    let (snap, _) = s.stage_snapshot(db, pages, 512, 3, 1, 1000).unwrap();
    assert!(snap.is_snapshot());
    assert_eq!(
        snap.path,
        dir.path()
            .join("staging/x.db/snapshots")
            .join(ltx_object_name(1, 1))
    );
    let f = decode(File::open(&snap.path).unwrap()).unwrap();
    assert!(f.header.has_checksums());

    // Batches are pending only once sealed.
    let mut seg = s.open_segment(db).unwrap();
    append(&mut seg, 2, 3, &[(2, 9), (4, 4)]);
    append(&mut seg, 4, 4, &[(1, 7)]);
    assert_eq!(ranges(&s, db), vec![(1, 1, true)]);
    seg.seal().unwrap();
    append(&mut seg, 5, 6, &[(3, 3)]);
    assert_eq!(
        ranges(&s, db),
        vec![(1, 1, true), (2, 3, false), (4, 4, false)]
    );
    let Staged::Batch(b) = &s.pending(db).unwrap()[1] else {
        panic!("a batch")
    };
    assert_eq!(b.post_checksum, ContentChecksum::from_value(3));
    assert_eq!(
        b.path,
        dir.path()
            .join("staging/x.db/segments")
            .join(segment::sealed_name(2, 4))
    );

    // Default: no checksums in snapshot files (Litestream 0.5 compatibility).
    s.set_checksums(false);
    let pages: Vec<io::Result<(u32, Vec<u8>)>> = vec![Ok((1, page(ps, 1)))];
    let (snap, _) = s.stage_snapshot(db, pages, 512, 1, 7, 1000).unwrap();
    let f = decode(File::open(&snap.path).unwrap()).unwrap();
    assert!(!f.header.has_checksums());
    assert_eq!(f.trailer.post_apply_checksum, 0);

    // Uploading: the state records it, the files go.
    let st = DbState {
        txid: 7,
        page_size: 512,
        commit: 4,
        checksum: ContentChecksum::from_value(1),
        wal: None,
        uploaded_txid: 0,
    };
    s.save_state(db, &st).unwrap();
    assert_eq!(s.mark_uploaded(db, 4).unwrap(), 2);
    assert_eq!(s.state(db).unwrap().unwrap().uploaded_txid, 4);
    assert_eq!(ranges(&s, db), vec![(1, 7, true)]);
    assert_eq!(s.databases().unwrap(), vec![PathBuf::from("x.db")]);

    // A crash: the durable state says TXID 6; a sealed segment holds 5..=6 and 7..=8
    // (sealed, then the state could not be saved), the active one 9, plus a temporary
    // file.
    append(&mut seg, 7, 8, &[(2, 2)]);
    drop(seg);
    let segs = dir.path().join("staging/x.db/segments");
    fs::rename(segs.join("active"), segs.join(segment::sealed_name(5, 8))).unwrap();
    let mut seg = s.open_segment(db).unwrap();
    append(&mut seg, 9, 9, &[(2, 2)]);
    drop(seg);
    fs::write(
        dir.path().join("staging/x.db/snapshots/.x.ltx.tmp"),
        b"partial",
    )
    .unwrap();
    assert_eq!(
        s.recover(db, 6).unwrap(),
        4,
        "7..=8, 9, the snapshot of 7, the tmp"
    );
    assert_eq!(ranges(&s, db), vec![(5, 6, false)]);
    assert_eq!(
        fs::read_dir(dir.path().join("staging/x.db/snapshots"))
            .unwrap()
            .count(),
        0
    );
    let seg = s.open_segment(db).unwrap();
    assert!(seg.is_empty());
    // Reopening sees the same thing.
    let s2 = Staging::open(dir.path().join("staging")).unwrap();
    assert_eq!(ranges(&s2, db), vec![(5, 6, false)]);
    assert_eq!(s2.state(db).unwrap().unwrap().txid, 7);
    assert!(s2.pending(Path::new("never.db")).unwrap().is_empty());
}

/// Every staging write fails with an `io::Error` on a full or read-only filesystem. As root
/// the test mounts a tiny tmpfs (ENOSPC, then remounted read-only: EROFS); otherwise it uses
/// a directory without write permission (EACCES).
#[test]
fn full_or_readonly_staging_gives_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let db = Path::new("big.db");
    let ps = 65536usize;
    let snapshot = |s: &Staging| {
        // Random-ish pages so that LZ4 cannot shrink them.
        let mut x = 0x1234_5678_u64;
        let pages = (1..=40u32).map(move |p| {
            let data: Vec<u8> = (0..ps)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            Ok((p, data))
        });
        s.stage_snapshot(db, pages, ps as u32, 40, 1, 0)
    };
    if unsafe { libc::geteuid() } == 0 {
        let tmpfs = crate::testing::Tmpfs::mount(&mnt, "1m");
        let s = Staging::open(&mnt).unwrap();
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        // Nothing half-written is left behind.
        assert!(s.pending(db).unwrap().is_empty());
        let leftovers = fs::read_dir(mnt.join("big.db/snapshots")).unwrap().count();
        assert_eq!(leftovers, 0);

        tmpfs.make_read_only();
        let e = s.save_state(db, &DbState::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let e = s.open_segment(Path::new("other.db")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    } else {
        use std::os::unix::fs::PermissionsExt;
        let s = Staging::open(&mnt).unwrap();
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o500)).unwrap();
        let e = s.save_state(db, &DbState::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o700)).unwrap();
    }
}

#[test]
fn corrupt_files_and_broken_rules_are_typed_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let s = Staging::open(dir.path()).unwrap();
    let db = Path::new("app.db");

    // A state file that fails its check names the file and points at the disk.
    s.save_state(db, &DbState::default()).unwrap();
    let path = dir.path().join("app.db/state");
    fs::write(&path, "walfs-staging-state 2\ntxid x\n").unwrap();
    let e = s.state(db).unwrap_err();
    assert!(
        matches!(&e, StagingError::Corrupt { path: p, .. } if *p == path),
        "{e:?}"
    );
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert!(e.hint().contains("disk"), "{}", e.hint());

    // A database key that escapes the staging directory is a bug of the caller.
    let e = s.db_dir(Path::new("../escape.db")).unwrap_err();
    assert!(matches!(e, StagingError::Internal(_)), "{e:?}");
    assert!(e.to_string().contains("a bug in walfs"), "{e}");
    assert_eq!(e.raw_os_error(), None);

    // A page skipped in a snapshot is refused by the LTX encoder, with its reason.
    let mut w = s
        .begin_snapshot(db, LtxHeader::snapshot(4096, 3, 1, 0))
        .unwrap();
    w.add_page(1, &page(4096, 1)).unwrap();
    let e = w.add_page(3, &page(4096, 3)).unwrap_err();
    assert!(matches!(e, StagingError::Ltx(_)), "{e:?}");
    assert!(e.to_string().contains("expected page 2"), "{e}");
    assert!(e.hint().contains("bug"), "{}", e.hint());
    drop(w);
    // The snapshot never appeared.
    assert!(s.pending(db).unwrap().is_empty());

    // An I/O failure keeps its errno and says to free space.
    let e = StagingError::from(io::Error::from_raw_os_error(libc::ENOSPC));
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(e.hint().contains("free space"), "{}", e.hint());
}
