//! Tests of the staging area: layout, durability across reopen, uploads, crash leftovers,
//! and errors on a full or read-only filesystem.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::*;
use crate::replica::ltx::decode;

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
        checksum: DatabaseChecksum::EMPTY.value() | 0x1234,
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

    // Keys must be plain relative paths.
    for bad in ["", "/abs.db", "../up.db", "a/../b.db"] {
        assert!(s.state(Path::new(bad)).is_err(), "{bad}");
    }
}

#[test]
fn stage_pending_upload_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let s = Staging::open(dir.path().join("staging")).unwrap();
    s.set_checksums(true);
    let db = Path::new("x.db");
    let ps = 512usize;
    let pages: Vec<io::Result<(u32, Vec<u8>)>> =
        (1..=3).map(|p| Ok((p, page(ps, p as u8)))).collect();
    let (snap, sum) = s.stage_snapshot(db, pages, 512, 3, 1, 1000).unwrap();
    assert!(snap.is_snapshot());
    assert_eq!(
        snap.path,
        dir.path()
            .join("staging/x.db/ltx/0")
            .join(ltx_object_name(1, 1))
    );
    let mut post = sum;
    post.replace_page(2, &page(ps, 2), &page(ps, 9));
    post.add_page(4, &page(ps, 4));
    for txid in 2..=4u64 {
        let meta = TxnMeta {
            txid,
            page_size: 512,
            commit: 4,
            pre_checksum: sum,
            post_checksum: post,
            timestamp_ms: 2000 + txid as i64,
            wal: Some((32, 2 * 536, 1, 2)),
        };
        let staged = s
            .stage_transaction(
                db,
                &meta,
                [Ok((2u32, page(ps, 9))), Ok((4u32, page(ps, 4)))],
            )
            .unwrap();
        assert_eq!((staged.min_txid, staged.max_txid), (txid, txid));
        let f = decode(File::open(&staged.path).unwrap()).unwrap();
        assert_eq!(f.header.pre_apply_checksum, sum.value());
        assert_eq!(f.trailer.post_apply_checksum, post.value());
        assert_eq!(f.header.wal_offset, 32);
        assert_eq!(f.pages.len(), 2);
    }
    let pending = s.pending(db).unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.min_txid, p.max_txid))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 2), (3, 3), (4, 4)]
    );
    // Default: no checksums in the files (Litestream 0.5 compatibility).
    s.set_checksums(false);
    let meta = TxnMeta {
        txid: 5,
        page_size: 512,
        commit: 4,
        pre_checksum: post,
        post_checksum: post,
        timestamp_ms: 1,
        wal: None,
    };
    let staged = s
        .stage_transaction(db, &meta, [Ok((1u32, page(ps, 1)))])
        .unwrap();
    let f = decode(File::open(&staged.path).unwrap()).unwrap();
    assert!(!f.header.has_checksums());
    assert_eq!(f.trailer.post_apply_checksum, 0);

    // A page out of order is refused and leaves nothing behind.
    let meta = TxnMeta { txid: 6, ..meta };
    let e = s
        .stage_transaction(
            db,
            &meta,
            [Ok((3u32, page(ps, 1))), Ok((2u32, page(ps, 1)))],
        )
        .unwrap_err();
    assert!(e.to_string().contains("ascend"), "{e}");
    let names: Vec<_> = fs::read_dir(dir.path().join("staging/x.db/ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");

    // Uploading: the state records it, the files go.
    s.save_state(
        db,
        &DbState {
            txid: 5,
            page_size: 512,
            commit: 4,
            checksum: post.value(),
            wal: None,
            uploaded_txid: 0,
        },
    )
    .unwrap();
    assert_eq!(s.mark_uploaded(db, 3).unwrap(), 3);
    assert_eq!(s.state(db).unwrap().unwrap().uploaded_txid, 3);
    assert_eq!(s.pending(db).unwrap().len(), 2);

    // A crash after staging TXID 5 but before saving a state that counts it.
    fs::write(
        dir.path()
            .join("staging/x.db/ltx/0/.0000000000000006-0000000000000006.ltx.tmp"),
        b"partial",
    )
    .unwrap();
    assert_eq!(s.discard_after(db, 4).unwrap(), 1);
    assert_eq!(s.pending(db).unwrap().len(), 1);
    assert_eq!(
        fs::read_dir(dir.path().join("staging/x.db/ltx/0"))
            .unwrap()
            .count(),
        1
    );
    // Reopening sees the same thing.
    let s2 = Staging::open(dir.path().join("staging")).unwrap();
    assert_eq!(s2.pending(db).unwrap().len(), 1);
    assert_eq!(s2.state(db).unwrap().unwrap().txid, 5);
    assert!(s2.pending(Path::new("never.db")).unwrap().is_empty());
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
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
        let src = CString::new("tmpfs").unwrap();
        let opts = CString::new("size=1m").unwrap();
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                cstr(&mnt).as_ptr(),
                src.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", io::Error::last_os_error());
        struct Unmount(CString);
        impl Drop for Unmount {
            fn drop(&mut self) {
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _guard = Unmount(cstr(&mnt));
        let s = Staging::open(&mnt).unwrap();
        let e = snapshot(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        // Nothing half-written is left behind.
        assert!(s.pending(db).unwrap().is_empty());
        let leftovers = fs::read_dir(mnt.join("big.db/ltx/0")).unwrap().count();
        assert_eq!(leftovers, 0);

        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                cstr(&mnt).as_ptr(),
                src.as_ptr(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "remount ro: {}", io::Error::last_os_error());
        let e = s.save_state(db, &DbState::default()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let e = s
            .stage_transaction(
                db,
                &TxnMeta {
                    txid: 2,
                    page_size: 512,
                    commit: 1,
                    pre_checksum: DatabaseChecksum::EMPTY,
                    post_checksum: DatabaseChecksum::EMPTY,
                    timestamp_ms: 0,
                    wal: None,
                },
                [Ok((1u32, page(512, 0)))],
            )
            .unwrap_err();
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
