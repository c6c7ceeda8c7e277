//! Applying a restore plan: download the planned LTX objects, rebuild the database in a
//! temporary file next to the output, verify it, and only then rename it into place.
//!
//! This file owns [`restore_database`] and what it reports ([`RestoreOutcome`]).
//!
//! Steps, for output `OUT`:
//! 1. refuse an existing `OUT` unless `force` (a directory is always refused);
//! 2. write pages into `.OUT.walfs-restore-XXXX` in `OUT`'s directory, object by object
//!    (each object is decoded and checked in full: a corrupt object is an error naming its
//!    key), truncating whenever a file shrinks the database and finally to the last
//!    commit size (pages × page size), then fsync;
//! 3. verify: the SQLite header agrees with the LTX page size and commit size; the content
//!    checksum (blake3, computed over the result on every core) equals the writer's
//!    verification record for the TXID, if one exists; the LTX database checksum (CRC-64)
//!    equals the last object's post-apply checksum, if it carries one (and a record written
//!    before walfs used blake3); and `PRAGMA integrity_check` says `ok`;
//! 4. remove a stale `OUT-wal`, `OUT-shm` or `OUT-journal` (SQLite would apply them to the
//!    new file), rename the temporary file to `OUT`, fsync the directory.
//!
//! On any error the temporary file is removed and `OUT` is untouched: never half-written.

use std::fs::{self, File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use indicatif::{ProgressBar, ProgressStyle};
use rusqlite::{Connection, OpenFlags};
use tokio::runtime::Runtime;

use crate::ltx::{DatabaseChecksum, LtxDecoder, LtxHeader};
use crate::replica::store::ReplicaStore;
use crate::sqlite::header::DbHeader;
use crate::sqlite::ContentChecksum;

use super::error::{Context, RestoreError, RestoreResult};
use super::plan::{db_label, RestorePlan};
use super::record::{RecordedChecksum, SidecarStore};

/// How the content checksum of a restored database was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumCheck {
    /// It equals the checksum the writer recorded for the TXID.
    Recorded,
    /// The writer recorded none (e.g. Litestream wrote the replica); only
    /// `integrity_check` vouches for the content.
    NotRecorded,
}

/// What a successful restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// The database path in the replica.
    pub db: String,
    /// Where it was restored.
    pub output: PathBuf,
    /// The TXID restored.
    pub txid: u64,
    /// When that TXID was written.
    pub timestamp: SystemTime,
    /// The page size.
    pub page_size: u32,
    /// The database size in pages.
    pub commit: u32,
    /// The content checksum of the restored file.
    pub checksum: ContentChecksum,
    /// How the checksum was verified.
    pub checksum_check: ChecksumCheck,
    /// Objects applied.
    pub objects: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// What `PRAGMA integrity_check` found, when the restore was written anyway (asked
    /// without the check's veto); `None` when it passed.
    pub integrity_failure: Option<String>,
}

/// Removes the temporary file unless disarmed.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A sibling name for the temporary file: `.OUT.walfs-restore-XXXX`.
fn temp_path(out: &Path) -> RestoreResult<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| RestoreError::Output(format!("{} does not name a file", out.display())))?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tag = (u64::from(std::process::id()) << 32 | u64::from(nanos)) & 0xffff_ffff_ffff;
    let mut n = std::ffi::OsString::from(".");
    n.push(name);
    n.push(format!(".walfs-restore-{tag:012x}"));
    Ok(out.with_file_name(n))
}

fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that `out` may be written: absent, or a non-directory with `force`.
pub fn check_output(out: &Path, force: bool) -> RestoreResult<()> {
    match fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => Err(RestoreError::Output(format!(
            "{} is a directory; give the path of the database file to create",
            out.display()
        ))),
        Ok(_) if !force => Err(RestoreError::Output(format!(
            "{} exists; pass --force to replace it",
            out.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::Output(format!(
            "cannot check {}: {e}",
            out.display()
        ))),
    }
}

/// The content checksum of the first `commit` pages of `file`, and its LTX database
/// checksum if `with_crc`. XOR combines, so the pages are split across the cores.
fn checksums_of(
    file: &File,
    page_size: u32,
    commit: u32,
    with_crc: bool,
) -> std::io::Result<(ContentChecksum, Option<DatabaseChecksum>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let per = commit.div_ceil(threads).max(1);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| (1 + i * per, (1 + (i + 1) * per).min(commit + 1)))
            .filter(|(first, end)| first < end)
            .map(|pages| s.spawn(move || checksums_of_pages(file, page_size, pages, with_crc)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("checksum thread panicked"))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let (mut content, mut crc) = (ContentChecksum::EMPTY, DatabaseChecksum::EMPTY);
    for (c, d) in parts {
        content.toggle(c.value());
        crc.toggle(d.value());
    }
    Ok((content, with_crc.then_some(crc)))
}

/// The contributions of pages `first..end` of `file` to its content checksum and (if
/// `with_crc`, else empty) its LTX database checksum.
fn checksums_of_pages(
    file: &File,
    page_size: u32,
    (first, end): (u32, u32),
    with_crc: bool,
) -> std::io::Result<(ContentChecksum, DatabaseChecksum)> {
    let ps = page_size as usize;
    let pages_per_read = ((1 << 20) / ps).max(1) as u32;
    let mut buf = vec![0u8; pages_per_read as usize * ps];
    let (mut content, mut crc) = (ContentChecksum::EMPTY, DatabaseChecksum::EMPTY);
    let mut pgno = first;
    while pgno < end {
        let n = pages_per_read.min(end - pgno);
        let chunk = &mut buf[..n as usize * ps];
        file.read_exact_at(chunk, u64::from(pgno - 1) * ps as u64)?;
        for (i, page) in chunk.chunks_exact(ps).enumerate() {
            content.add_page(pgno + i as u32, page);
            if with_crc {
                crc.add_page(pgno + i as u32, page);
            }
        }
        pgno += n;
    }
    Ok((content, crc))
}

/// A progress bar of `total` bytes on stderr, labelled `msg`, if stderr is a terminal
/// (else `None`: nothing extra is printed to a log or a pipe). It redraws itself every
/// 200 ms, so that it shows time passing during one long step.
pub fn bytes_bar(total: u64, msg: String) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({elapsed}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(msg);
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    Some(b)
}

/// Restores `plan` into `out` (see the module documentation). Without `integrity_check`
/// a restore that fails `PRAGMA integrity_check` is written anyway, and its outcome says
/// what the check found. `progress` shows a progress bar on stderr if stderr is a
/// terminal.
#[allow(clippy::too_many_arguments)]
pub fn restore_database(
    rt: &Runtime,
    store: &ReplicaStore,
    sidecar: &SidecarStore,
    plan: &RestorePlan,
    out: &Path,
    force: bool,
    integrity_check: bool,
    progress: bool,
) -> RestoreResult<RestoreOutcome> {
    check_output(out, force)?;
    let label = db_label(&plan.db);
    let dir = parent_dir(out);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = temp_path(out)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut guard = TempGuard {
        path: tmp.clone(),
        armed: true,
    };

    let bar = if progress {
        bytes_bar(plan.bytes(), format!("restoring {label}"))
    } else {
        None
    };

    let mut last: Option<(LtxHeader, u64)> = None;
    let mut len = 0u64;
    let mut page = Vec::new();
    let mut downloaded = 0u64;
    for obj in &plan.objects {
        let bytes = rt
            .block_on(store.get_ltx(&plan.db, obj.level, obj.min_txid, obj.max_txid))
            .with_context(|| format!("cannot download object {}", obj.key))?;
        downloaded += bytes.len() as u64;
        let corrupt = |e: &dyn std::fmt::Display| {
            RestoreError::Corrupt(format!("object {} is corrupt: {e}", obj.key))
        };
        let mut dec = LtxDecoder::new(&bytes[..]).map_err(|e| corrupt(&e))?;
        let h = *dec.header();
        if (h.min_txid, h.max_txid) != (obj.min_txid, obj.max_txid) {
            return Err(corrupt(&format!(
                "its header covers TXIDs {} to {}, its name {} to {}",
                h.min_txid, h.max_txid, obj.min_txid, obj.max_txid
            )));
        }
        if let Some((prev, _)) = &last {
            if prev.page_size != h.page_size {
                return Err(corrupt(&format!(
                    "its page size {} differs from the {} of the objects before it",
                    h.page_size, prev.page_size
                )));
            }
        }
        let ps = u64::from(h.page_size);
        page.resize(h.page_size as usize, 0);
        while let Some(pgno) = dec.read_page(&mut page).map_err(|e| corrupt(&e))? {
            file.write_all_at(&page, (u64::from(pgno) - 1) * ps)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            len = len.max(u64::from(pgno) * ps);
        }
        let trailer = dec.finish().map_err(|e| corrupt(&e))?;
        // A shrinking transaction drops the pages past its commit size: later growth must
        // not resurrect them.
        let size = u64::from(h.commit) * ps;
        if size < len {
            file.set_len(size)
                .with_context(|| format!("cannot truncate {}", tmp.display()))?;
            len = size;
        }
        last = Some((h, trailer.post_apply_checksum));
        if let Some(b) = &bar {
            b.inc(obj.size);
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let Some((h, post_apply)) = last else {
        return Err(RestoreError::Usage(format!(
            "the restore plan for {label} holds no objects"
        )));
    };
    let page_size = h.page_size;
    let commit = h.commit;
    file.set_len(u64::from(commit) * u64::from(page_size))
        .with_context(|| format!("cannot size {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot fsync {}", tmp.display()))?;

    // (c) The SQLite header agrees with the LTX headers.
    if commit > 0 {
        let mut head = [0u8; 100];
        file.read_exact_at(&mut head, 0)
            .with_context(|| format!("cannot read {}", tmp.display()))?;
        let dbh = DbHeader::parse(&head).map_err(|e| {
            RestoreError::Corrupt(format!("restored {label} at TXID {} has no valid SQLite header ({e:?}); the replica is corrupt", plan.txid))
        })?;
        if dbh.page_size != page_size {
            return Err(RestoreError::Corrupt(format!(
                "restored {label} at TXID {}: its header says page size {}, the replica {page_size}; the replica is corrupt",
                plan.txid,
                dbh.page_size
            )));
        }
        if let Some(n) = dbh.valid_db_size() {
            if n != commit {
                return Err(RestoreError::Corrupt(format!(
                    "restored {label} at TXID {}: its header says {n} pages, the replica {commit}; the replica is corrupt",
                    plan.txid
                )));
            }
        }
    }

    // (a) The content checksum, and the LTX checksum where the replica carries one.
    let record = rt
        .block_on(sidecar.get_checksum_record(&plan.db, plan.txid, plan.objects.last()))
        .with_context(|| format!("cannot read the verification record of {label}"))?;
    let ltx_post_apply = (h.has_checksums() && post_apply != 0).then_some(post_apply);
    let legacy = record
        .as_ref()
        .is_some_and(|(r, _)| matches!(r.checksum, RecordedChecksum::LegacyCrc64(_)));
    let (checksum, crc) =
        checksums_of(&file, page_size, commit, ltx_post_apply.is_some() || legacy)
            .with_context(|| format!("cannot read back {}", tmp.display()))?;
    if let (Some(want), Some(got)) = (ltx_post_apply, crc) {
        if want != got.value() {
            return Err(RestoreError::Corrupt(format!(
                "restored {label} at TXID {} does not match the checksum in object {} ({want:016x}, restored {:016x}); the replica is corrupt",
                plan.txid,
                plan.objects.last().map(|o| o.key.as_str()).unwrap_or(""),
                got.value()
            )));
        }
    }
    let checksum_check = match record {
        Some((r, place)) => {
            let restored = match r.checksum {
                RecordedChecksum::Content(_) => RecordedChecksum::Content(checksum),
                RecordedChecksum::LegacyCrc64(_) => {
                    RecordedChecksum::LegacyCrc64(crc.map_or(0, |c| c.value()))
                }
            };
            if (r.checksum, r.page_size, r.commit) != (restored, page_size, commit) {
                return Err(RestoreError::Corrupt(format!(
                    "restored {label} at TXID {} does not match its verification record {}: \
                     recorded {} ({} pages of {} bytes), restored {restored} \
                     ({commit} pages of {page_size} bytes); the replica is corrupt or was \
                     changed; {} was not written",
                    plan.txid,
                    place,
                    r.checksum,
                    r.commit,
                    r.page_size,
                    out.display()
                )));
            }
            ChecksumCheck::Recorded
        }
        None => ChecksumCheck::NotRecorded,
    };

    // (b) SQLite's own check. The content checksum matched what the writer read, so a
    // failure here is a replica that was corrupt when written, or a database that was.
    let integrity_failure = match self::integrity_check(&tmp) {
        Ok(()) => None,
        Err(e) if !integrity_check => Some(e.to_string()),
        Err(e) => {
            return Err(RestoreError::Corrupt(format!(
                "restored {label} at TXID {} fails PRAGMA integrity_check: {e}; the replica \
                 is corrupt, or the database was when it was replicated: restore an earlier \
                 --txid or --timestamp, or pass --no-integrity-check to salvage it; {} was \
                 not written",
                plan.txid,
                out.display()
            )))
        }
    };
    drop(file);

    // Stale companions of a replaced database would be applied to the new one.
    if force {
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut p = out.as_os_str().to_owned();
            p.push(suffix);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(RestoreError::Output(format!(
                        "cannot remove {}: {e}; remove it before replacing {}",
                        Path::new(&p).display(),
                        out.display()
                    )))
                }
            }
        }
    }
    fs::rename(&tmp, out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
    guard.armed = false;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;

    Ok(RestoreOutcome {
        db: plan.db.clone(),
        output: out.to_path_buf(),
        txid: plan.txid,
        timestamp: plan.timestamp,
        page_size,
        commit,
        checksum,
        checksum_check,
        objects: plan.objects.len(),
        bytes: downloaded,
        integrity_failure,
    })
}

/// Runs `PRAGMA integrity_check` on a database file without locking it or creating any
/// companion file (`immutable=1`).
pub fn integrity_check(path: &Path) -> RestoreResult<()> {
    let abs = std::path::absolute(path)?;
    let s = abs
        .to_str()
        .ok_or_else(|| RestoreError::Usage(format!("{} is not UTF-8", path.display())))?;
    let mut uri = String::from("file:");
    for c in s.chars() {
        match c {
            '%' | '?' | '#' => uri.push_str(&format!("%{:02X}", c as u32)),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    if rows != ["ok"] {
        let shown: Vec<&str> = rows.iter().take(5).map(String::as_str).collect();
        return Err(RestoreError::Corrupt(shown.join("; ")));
    }
    Ok(())
}
