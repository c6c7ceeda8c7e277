//! The versions of one followed database: what a reader under a follower mount reads, at
//! which state, while new states arrive from the replica.
//!
//! This module owns [`FollowedDb`]. Each state applied from the replica is a *version*,
//! numbered by a counter local to the follower. A version belongs to a *generation*: a
//! base file (a verified restore) plus an overlay of the pages that later versions changed,
//! appended to an overlay file and indexed in memory by page and version. A reader (an
//! open file) pinned to a version reads, for each page, the newest overlay entry at or
//! below its version, else the base. So applying a version never changes what a pinned
//! reader sees, and a reader never waits for a whole version to be applied: at most for
//! one page write, or for a fold (which runs only once no reader needs what it folds).
//!
//! Once no reader is pinned below a version, the overlay up to it is folded into the base
//! (written in place) and dropped; with short read transactions that happens after every
//! apply, so the overlay stays near empty. A version no one is pinned to and that is not
//! the latest is forgotten; a generation no version needs is deleted with its files.
//!
//! Reads of the first 100 bytes see a rewritten header (`patch_header`): the database is
//! served in rollback-journal mode (bytes 18 and 19 = 1, so readers use the file's POSIX
//! locks and no `-wal` or `-shm`), and the file change counter and version-valid-for number
//! are the version number, so a reader's page cache is dropped exactly when the version it
//! starts a transaction on differs from its last one.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;

/// One state of the database a reader can be pinned to.
#[derive(Debug, Clone, Copy)]
struct Version {
    generation: u64,
    /// Size in pages.
    commit: u32,
    /// The replica's TXID of this state.
    txid: u64,
}

/// A base file and the overlay of pages changed since it.
struct Generation {
    page_size: u32,
    base: File,
    base_path: PathBuf,
    overlay: File,
    overlay_path: PathBuf,
    overlay_len: u64,
    /// Page number → (version, offset in the overlay), oldest first.
    index: HashMap<u32, Vec<(u64, u64)>>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.base_path);
        let _ = fs::remove_file(&self.overlay_path);
    }
}

impl Generation {
    /// Reads page `pgno` as of version `v` into `buf` (one page).
    fn read_page(&self, pgno: u32, v: u64, buf: &mut [u8]) -> io::Result<()> {
        let entry = self
            .index
            .get(&pgno)
            .and_then(|e| e.iter().rev().find(|(ver, _)| *ver <= v));
        match entry {
            Some((_, off)) => self.overlay.read_exact_at(buf, *off),
            None => {
                let pos = u64::from(pgno - 1) * u64::from(self.page_size);
                read_or_zero(&self.base, buf, pos)
            }
        }
    }

    /// Writes into the base every page of the overlay at or below version `upto`, and
    /// drops those entries. The overlay file is emptied once nothing in it is indexed,
    /// unless a version is being written into it (`writing`).
    fn fold(&mut self, upto: u64, writing: bool) -> io::Result<()> {
        let ps = u64::from(self.page_size);
        let mut page = vec![0u8; self.page_size as usize];
        for (pgno, entries) in self.index.iter_mut() {
            let Some(i) = entries.iter().rposition(|(v, _)| *v <= upto) else {
                continue;
            };
            self.overlay.read_exact_at(&mut page, entries[i].1)?;
            self.base.write_all_at(&page, u64::from(*pgno - 1) * ps)?;
            entries.drain(..=i);
        }
        self.index.retain(|_, e| !e.is_empty());
        if self.index.is_empty() && self.overlay_len > 0 && !writing {
            self.overlay.set_len(0)?;
            self.overlay_len = 0;
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `pos`; what lies past the end of the file reads as zeros.
fn read_or_zero(f: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

#[derive(Default)]
struct Versions {
    /// The number the next version gets (versions start at 1).
    next: u64,
    /// The newest version, what readers without a pin read; 0 before the first.
    latest: u64,
    versions: BTreeMap<u64, Version>,
    generations: BTreeMap<u64, Generation>,
    /// Reader (an open file) → the version it reads.
    pins: HashMap<u64, u64>,
    /// A version is being written into the current overlay ([`FollowedDb::begin`]).
    writing: bool,
}

impl Versions {
    /// Forgets what no reader needs, deletes unneeded generations, and folds the current
    /// generation's overlay up to its oldest needed version.
    fn prune(&mut self) -> io::Result<()> {
        let latest = self.latest;
        let pinned: Vec<u64> = self.pins.values().copied().collect();
        self.versions
            .retain(|v, _| *v == latest || pinned.contains(v));
        let needed: Vec<u64> = self.versions.values().map(|v| v.generation).collect();
        self.generations.retain(|g, _| needed.contains(g));
        for (g, gen) in self.generations.iter_mut() {
            let mine: Vec<&Version> = self
                .versions
                .iter()
                .filter(|(_, v)| v.generation == *g)
                .map(|(_, v)| v)
                .collect();
            let Some(oldest) = self
                .versions
                .iter()
                .filter(|(_, v)| v.generation == *g)
                .map(|(n, _)| *n)
                .next()
            else {
                continue;
            };
            gen.fold(oldest, self.writing)?;
            if gen.index.is_empty() {
                let pages = mine.iter().map(|v| v.commit).max().unwrap_or(0);
                gen.base
                    .set_len(u64::from(pages) * u64::from(gen.page_size))?;
            }
        }
        Ok(())
    }

    /// Version `n`'s size in bytes, if it is kept.
    fn size_of(&self, n: u64) -> Option<u64> {
        let x = self.versions.get(&n)?;
        let g = self.generations.get(&x.generation)?;
        Some(u64::from(x.commit) * u64::from(g.page_size))
    }

    /// The newest kept version whose size is within `limit`, or the latest if none is.
    fn newest_within(&self, limit: u64) -> u64 {
        self.versions
            .keys()
            .rev()
            .copied()
            .find(|n| self.size_of(*n).is_some_and(|size| size <= limit))
            .unwrap_or(self.latest)
    }

    fn version_of(&self, reader: Option<u64>) -> Option<(u64, Version)> {
        let n = reader
            .and_then(|o| self.pins.get(&o).copied())
            .unwrap_or(self.latest);
        self.versions.get(&n).map(|v| (n, *v))
    }
}

/// New pages of the next version, written to the overlay but not yet visible.
pub struct PendingVersion {
    generation: u64,
    version: u64,
    entries: Vec<(u32, u64)>,
}

/// One database under a follower mount.
pub struct FollowedDb {
    /// Where its files live (`<cache>/<n>`).
    dir: PathBuf,
    inner: RwLock<Versions>,
}

impl Drop for FollowedDb {
    /// Its directory goes with it (a database removed from the mount, or one whose first
    /// restore failed), once no open file holds it.
    fn drop(&mut self) {
        self.inner.get_mut().generations.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl FollowedDb {
    /// An empty database: it serves nothing until its first base is installed.
    pub fn new(dir: PathBuf) -> io::Result<FollowedDb> {
        fs::create_dir_all(&dir)?;
        Ok(FollowedDb {
            dir,
            inner: RwLock::new(Versions {
                next: 1,
                ..Versions::default()
            }),
        })
    }

    /// Where a new base file may be restored to.
    pub fn base_path(&self) -> PathBuf {
        let n = self.inner.read().next;
        self.dir.join(format!("base-{n}"))
    }

    /// Makes the restored file at `path` (from [`FollowedDb::base_path`]) the next version,
    /// in a generation of its own.
    pub fn install_base(
        &self,
        path: &Path,
        page_size: u32,
        commit: u32,
        txid: u64,
    ) -> io::Result<()> {
        let base = OpenOptions::new().read(true).write(true).open(path)?;
        let mut v = self.inner.write();
        let n = v.next;
        let overlay_path = self.dir.join(format!("overlay-{n}"));
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&overlay_path)?;
        v.generations.insert(
            n,
            Generation {
                page_size,
                base,
                base_path: path.to_path_buf(),
                overlay,
                overlay_path,
                overlay_len: 0,
                index: HashMap::new(),
            },
        );
        v.versions.insert(
            n,
            Version {
                generation: n,
                commit,
                txid,
            },
        );
        v.next = n + 1;
        v.latest = n;
        // The version is live: a fold that fails only leaves the overlay larger.
        self.prune_logged(&mut v);
        Ok(())
    }

    /// The page size of the latest version, if there is one.
    pub fn page_size(&self) -> Option<u32> {
        let v = self.inner.read();
        let latest = v.versions.get(&v.latest)?;
        v.generations.get(&latest.generation).map(|g| g.page_size)
    }

    /// The latest version's TXID and size in pages.
    pub fn latest(&self) -> Option<(u64, u32)> {
        let v = self.inner.read();
        v.versions.get(&v.latest).map(|x| (x.txid, x.commit))
    }

    /// Reads page `pgno` of the latest version.
    pub fn read_latest_page(&self, pgno: u32, buf: &mut [u8]) -> io::Result<()> {
        let v = self.inner.read();
        let Some((n, ver)) = v.version_of(None) else {
            buf.fill(0);
            return Ok(());
        };
        if pgno > ver.commit {
            buf.fill(0);
            return Ok(());
        }
        v.generations[&ver.generation].read_page(pgno, n, buf)
    }

    /// Starts the next version on top of the latest.
    pub fn begin(&self) -> io::Result<PendingVersion> {
        let mut v = self.inner.write();
        let latest = v
            .versions
            .get(&v.latest)
            .ok_or_else(|| io::Error::other("no version to apply on"))?;
        let pending = PendingVersion {
            generation: latest.generation,
            version: v.next,
            entries: Vec::new(),
        };
        v.writing = true;
        Ok(pending)
    }

    /// Adds a page to `pending` (one page of the generation's page size). Only the applier
    /// appends to the overlay; readers read only what the index shows them.
    pub fn write_page(
        &self,
        pending: &mut PendingVersion,
        pgno: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut v = self.inner.write();
        let g = v
            .generations
            .get_mut(&pending.generation)
            .ok_or_else(|| io::Error::other("generation gone"))?;
        if data.len() != g.page_size as usize {
            return Err(io::Error::other("page size differs"));
        }
        let off = g.overlay_len;
        g.overlay.write_all_at(data, off)?;
        g.overlay_len += data.len() as u64;
        pending.entries.push((pgno, off));
        Ok(())
    }

    /// Makes `pending` the latest version: readers that start a transaction from now on
    /// see it, readers pinned to older versions do not.
    pub fn publish(&self, pending: PendingVersion, commit: u32, txid: u64) -> io::Result<()> {
        let mut v = self.inner.write();
        if v.next != pending.version || !v.generations.contains_key(&pending.generation) {
            v.writing = false;
            return Err(io::Error::other(
                "another version or generation was installed meanwhile",
            ));
        }
        let g = v
            .generations
            .get_mut(&pending.generation)
            .expect("checked above, under the same lock");
        for (pgno, off) in pending.entries {
            let e = g.index.entry(pgno).or_default();
            match e.last_mut() {
                Some(last) if last.0 == pending.version => last.1 = off,
                _ => e.push((pending.version, off)),
            }
        }
        v.versions.insert(
            pending.version,
            Version {
                generation: pending.generation,
                commit,
                txid,
            },
        );
        v.next = pending.version + 1;
        v.latest = pending.version;
        v.writing = false;
        // The version is live: a fold that fails only leaves the overlay larger.
        self.prune_logged(&mut v);
        Ok(())
    }

    /// Gives up `pending`: its pages stay in the overlay, unindexed, until it is emptied.
    pub fn abandon(&self, pending: PendingVersion) {
        drop(pending);
        self.inner.write().writing = false;
    }

    /// Pins `reader` (an open file) to the latest version, or moves its pin there: it
    /// reads that version until it is pinned again or unpinned.
    pub fn pin(&self, reader: u64) {
        let mut v = self.inner.write();
        let latest = v.latest;
        if v.pins
            .insert(reader, latest)
            .is_some_and(|old| old != latest)
        {
            self.prune_logged(&mut v);
        }
    }

    /// Pins `reader` to the latest version, as [`FollowedDb::pin`], if that version's size
    /// is within `limit`, the size its `stat` just answered (SQLite refuses a header that
    /// says more pages than the file holds); else it keeps the version it has, which is
    /// within it. Without a pin it takes the newest version within `limit` (the latest if
    /// none is kept). Without a limit it takes the latest. The check and the pin are one
    /// step: a version published meanwhile is never pinned unchecked.
    pub fn pin_within(&self, reader: u64, limit: Option<u64>) {
        let mut v = self.inner.write();
        let latest = v.latest;
        let target = match (limit, v.pins.get(&reader)) {
            (None, _) => latest,
            (Some(l), Some(&pinned)) => {
                if v.size_of(latest).is_none_or(|size| size <= l) {
                    latest
                } else {
                    pinned
                }
            }
            (Some(l), None) => v.newest_within(l),
        };
        if v.pins
            .insert(reader, target)
            .is_some_and(|old| old != target)
        {
            self.prune_logged(&mut v);
        }
    }

    /// Pins `reader`, unless it is pinned already, to the newest version within `limit`
    /// (the size its thread's last `stat` answered, if any), as [`FollowedDb::pin_within`].
    /// `limit` is asked only for an unpinned reader: every read of a pinned one comes here.
    pub fn pin_if_unpinned(&self, reader: u64, limit: impl FnOnce() -> Option<u64>) {
        if !self.inner.read().pins.contains_key(&reader) {
            let limit = limit();
            let mut v = self.inner.write();
            let target = match limit {
                Some(l) => v.newest_within(l),
                None => v.latest,
            };
            v.pins.entry(reader).or_insert(target);
        }
    }

    /// Unpins `reader`: it is outside any read transaction, or closed.
    pub fn unpin(&self, reader: u64) {
        let mut v = self.inner.write();
        if v.pins.remove(&reader).is_some() {
            self.prune_logged(&mut v);
        }
    }

    fn prune_logged(&self, v: &mut Versions) {
        if let Err(e) = v.prune() {
            tracing::warn!(dir = %self.dir.display(), "cannot fold the follower's overlay: {e}");
        }
    }

    /// How many readers are pinned, and to how many distinct versions.
    pub fn pinned(&self) -> (usize, usize) {
        let v = self.inner.read();
        let mut versions: Vec<u64> = v.pins.values().copied().collect();
        versions.sort_unstable();
        versions.dedup();
        (v.pins.len(), versions.len())
    }

    /// The file size to report: the largest of the versions anyone may read, so that a
    /// reader pinned to a larger version than the latest never sees its file shorter than
    /// its header says.
    pub fn size(&self) -> u64 {
        let v = self.inner.read();
        v.versions
            .values()
            .filter_map(|x| {
                v.generations
                    .get(&x.generation)
                    .map(|g| u64::from(x.commit) * u64::from(g.page_size))
            })
            .max()
            .unwrap_or(0)
    }

    /// Reads `size` bytes at `offset` as `reader` sees the file (its pinned version, or
    /// the latest). The read stops at the end of that version.
    pub fn read(&self, reader: Option<u64>, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let v = self.inner.read();
        let Some((n, ver)) = v.version_of(reader) else {
            return Ok(Vec::new());
        };
        let g = &v.generations[&ver.generation];
        let ps = u64::from(g.page_size);
        let end = (offset + u64::from(size)).min(u64::from(ver.commit) * ps);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut page = vec![0u8; g.page_size as usize];
        let mut pos = offset;
        while pos < end {
            let pgno = (pos / ps) as u32 + 1;
            let in_page = (pos % ps) as usize;
            let take = ((ps - pos % ps).min(end - pos)) as usize;
            g.read_page(pgno, n, &mut page)?;
            let at = (pos - offset) as usize;
            out[at..at + take].copy_from_slice(&page[in_page..in_page + take]);
            pos += take as u64;
        }
        patch_header(&mut out, offset, n, ver.commit);
        Ok(out)
    }
}

/// Rewrites the header bytes that `buf` (read at `offset`) holds, for version `version` of
/// `commit` pages: rollback-journal mode (bytes 18 and 19), the change counter (24..28)
/// and version-valid-for number (92..96) set to the version, and the size in pages
/// (28..32).
pub fn patch_header(buf: &mut [u8], offset: u64, version: u64, commit: u32) {
    let counter = (version as u32).to_be_bytes();
    let fields: [(u64, &[u8]); 4] = [
        (18, &[1, 1]),
        (24, &counter),
        (28, &commit.to_be_bytes()),
        (92, &counter),
    ];
    for (at, bytes) in fields {
        for (i, b) in bytes.iter().enumerate() {
            let pos = at + i as u64;
            if pos >= offset && pos < offset + buf.len() as u64 {
                buf[(pos - offset) as usize] = *b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u32 = 512;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PS as usize]
    }

    /// A database of `pages` pages, page n filled with n.
    fn db_with_base(dir: &Path, pages: u8) -> FollowedDb {
        let db = FollowedDb::new(dir.join("db")).unwrap();
        let path = db.base_path();
        let bytes: Vec<u8> = (1..=pages).flat_map(page).collect();
        fs::write(&path, bytes).unwrap();
        db.install_base(&path, PS, u32::from(pages), 10).unwrap();
        db
    }

    fn page_of(db: &FollowedDb, owner: Option<u64>, pgno: u32) -> Vec<u8> {
        db.read(owner, u64::from(pgno - 1) * u64::from(PS), PS)
            .unwrap()
    }

    fn apply(db: &FollowedDb, pages: &[(u32, u8)], commit: u32, txid: u64) {
        let mut p = db.begin().unwrap();
        for (pgno, fill) in pages {
            db.write_page(&mut p, *pgno, &page(*fill)).unwrap();
        }
        db.publish(p, commit, txid).unwrap();
    }

    #[test]
    fn a_pinned_reader_keeps_its_version_while_new_ones_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_base(dir.path(), 3);
        db.pin(7);
        apply(&db, &[(2, 0xaa), (4, 0xbb)], 4, 11);
        apply(&db, &[(2, 0xcc)], 4, 12);
        // The pinned reader sees the base, and its size.
        assert_eq!(page_of(&db, Some(7), 2), page(2));
        assert!(
            page_of(&db, Some(7), 4).is_empty(),
            "page 4 is past its end"
        );
        // Others see the latest.
        assert_eq!(page_of(&db, None, 2), page(0xcc));
        assert_eq!(page_of(&db, Some(8), 4), page(0xbb));
        assert_eq!(db.size(), 4 * u64::from(PS));
        db.unpin(7);
        // Folded: the overlay is empty and the base holds the latest.
        assert_eq!(
            fs::metadata(dir.path().join("db/overlay-1")).unwrap().len(),
            0
        );
        assert_eq!(page_of(&db, Some(7), 2), page(0xcc));
        assert_eq!(db.latest(), Some((12, 4)));
    }

    #[test]
    fn a_reader_pinned_between_versions_sees_the_pages_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_base(dir.path(), 2);
        apply(&db, &[(1, 0x11)], 2, 11);
        db.pin(1);
        apply(&db, &[(1, 0x22), (2, 0x23)], 2, 12);
        db.pin(2);
        apply(&db, &[(1, 0x33)], 1, 13);
        // Version 2 (TXID 11), 3 (TXID 12), 4 (TXID 13) side by side.
        let first = page_of(&db, Some(1), 1);
        assert_eq!(&first[100..], &page(0x11)[100..]);
        assert_eq!(page_of(&db, Some(1), 2), page(2));
        assert_eq!(&page_of(&db, Some(2), 1)[100..], &page(0x22)[100..]);
        assert_eq!(page_of(&db, Some(2), 2), page(0x23));
        assert!(page_of(&db, None, 2).is_empty(), "the latest has one page");
        // The larger version keeps the file size up.
        assert_eq!(db.size(), 2 * u64::from(PS));
        db.unpin(1);
        db.unpin(2);
        assert_eq!(db.size(), u64::from(PS));
    }

    #[test]
    fn the_header_is_served_in_rollback_mode_with_the_version_as_change_counter() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_base(dir.path(), 2);
        apply(&db, &[(2, 9)], 2, 11);
        let head = db.read(None, 0, 100).unwrap();
        assert_eq!(&head[18..20], &[1, 1]);
        assert_eq!(&head[24..28], &2u32.to_be_bytes());
        assert_eq!(&head[92..96], &2u32.to_be_bytes());
        assert_eq!(&head[28..32], &2u32.to_be_bytes());
        // A read that starts inside the header is patched too.
        let part = db.read(None, 20, 10).unwrap();
        assert_eq!(&part[4..8], &2u32.to_be_bytes());
    }

    #[test]
    fn a_reader_does_not_move_to_a_version_larger_than_its_stat_said() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_base(dir.path(), 2);
        db.pin(1);
        let said = db.size();
        // A larger version arrives between the reader's stat and its header read.
        apply(&db, &[(3, 3)], 3, 11);
        db.pin_within(1, Some(said));
        assert!(
            page_of(&db, Some(1), 3).is_empty(),
            "it moved past its stat"
        );
        // Without a pin it takes the newest version within the limit (kept for reader 1):
        // the version its stat saw.
        db.pin_within(2, Some(said));
        assert!(page_of(&db, Some(2), 3).is_empty());
        db.pin_if_unpinned(3, || Some(said));
        assert!(page_of(&db, Some(3), 3).is_empty());
        // Their next transactions' stats cover the new size.
        for r in 1..=3 {
            db.pin_within(r, Some(db.size()));
            assert_eq!(page_of(&db, Some(r), 3), page(3));
        }
        // The latest when no kept version is within it.
        db.pin_within(4, Some(1));
        assert_eq!(page_of(&db, Some(4), 3), page(3));
        db.pin_if_unpinned(5, || None);
        assert_eq!(page_of(&db, Some(5), 3), page(3));
    }

    #[test]
    fn a_new_generation_replaces_the_old_once_no_reader_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_with_base(dir.path(), 2);
        db.pin(5);
        let path = db.base_path();
        fs::write(&path, [page(0x40), page(0x41), page(0x42)].concat()).unwrap();
        db.install_base(&path, PS, 3, 50).unwrap();
        assert_eq!(page_of(&db, Some(5), 2), page(2));
        assert_eq!(page_of(&db, None, 3), page(0x42));
        assert!(dir.path().join("db/base-1").exists());
        db.unpin(5);
        assert!(
            !dir.path().join("db/base-1").exists(),
            "old generation kept"
        );
    }
}
