//! A database's committed image as SQLite would read it: the database file, overlaid with
//! the newest committed version of each page in the `-wal`, or with the original pages a
//! live rollback journal holds. Snapshots and comparisons walk it page by page.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{now_ms, read_db_header, rollback, CaptureError, CaptureResult};
use crate::ltx::LtxHeader;
use crate::sqlite::{
    lock_byte_page, page_hash, read_full, ContentChecksum, DbHeader, PageHash, WalError, WalPage,
    WalTransaction, WAL_FRAME_HEADER_SIZE,
};
use crate::staging::{HeldBatch, LtxWriter, Staging};

/// The committed database image that SQLite would read from the files: its page size, its
/// size in pages and, per page, where its newest committed version lies (a WAL frame, a
/// live journal's original, or the database file).
pub(super) struct Image<'a> {
    pub(super) page_size: u32,
    pub(super) size: u32,
    pub(super) overlay: BTreeMap<u32, (&'a WalTransaction, WalPage)>,
    /// A live rollback journal (a transaction in progress, or hot after a crash): the
    /// committed content of the pages it recorded is their original in the journal.
    pub(super) originals: Option<rollback::Originals>,
}

impl<'a> Image<'a> {
    /// The image of the database file `db` with the committed WAL transactions `txns`
    /// (read from `wal`) on top, or, with no WAL commits, with the live journal at
    /// `journal` (if given) rolled back. Its header is the one SQLite reads: page 1's newest version
    /// in the WAL, else the journal's original of page 1, else the database file's own.
    /// `None` if the files hold no SQLite database; an error if they hold one that SQLite's
    /// own view does not settle (a WAL of another page size, an empty file beside a WAL),
    /// until the next opener or checkpoint does.
    pub(super) fn read(
        db: &File,
        wal: Option<&File>,
        txns: &'a [WalTransaction],
        journal: Option<&Path>,
    ) -> CaptureResult<Option<Image<'a>>> {
        let db_len = db_len_from(db)?;
        let Some(last) = txns.last() else {
            return Self::without_wal(db, db_len, journal);
        };
        if db_len == 0 {
            // SQLite's next opener deletes such a WAL (`pagerOpenWalIfPresent`), while a
            // connection that has it open reads it.
            return Err(CaptureError::CannotFollow(
                "the database file is empty while its WAL holds commits".into(),
            ));
        }
        let mut overlay = BTreeMap::new();
        for t in txns {
            for p in &t.pages {
                overlay.insert(p.pgno, (t, *p));
            }
        }
        let header = match (overlay.get(&1), wal) {
            (Some((t, p)), Some(wal)) => {
                let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + t.header.page_size as usize];
                t.read_frame_page(wal, p, &mut frame)?;
                DbHeader::parse(&frame[WAL_FRAME_HEADER_SIZE..]).map_err(|e| {
                    CaptureError::CannotFollow(format!("page 1 in the WAL is not valid: {e}"))
                })?
            }
            _ => read_db_header(db)?.ok_or_else(|| {
                CaptureError::CannotFollow(
                    "the database file has no SQLite header and its WAL holds no page 1".into(),
                )
            })?,
        };
        let wal_page_size = last.header.page_size;
        if header.page_size != wal_page_size {
            return Err(CaptureError::CannotFollow(format!(
                "the WAL's page size {wal_page_size} differs from the database's {}",
                header.page_size
            )));
        }
        Ok(Some(Image {
            page_size: wal_page_size,
            size: header.logical_size(last.db_size),
            overlay,
            originals: None,
        }))
    }

    /// [`Image::read`] for a database whose WAL holds no commit.
    fn without_wal(
        db: &File,
        db_len: u64,
        journal: Option<&Path>,
    ) -> CaptureResult<Option<Image<'a>>> {
        let file_header = read_db_header(db)?;
        // A journal beside an empty file is not hot: SQLite deletes it.
        let originals = match (db_len, journal) {
            (0, _) | (_, None) => None,
            (_, Some(journal)) => rollback::Originals::open(journal)?,
        };
        let Some(o) = originals else {
            return Ok(file_header.map(|h| Image {
                page_size: h.page_size,
                size: h
                    .valid_db_size()
                    .unwrap_or((db_len / u64::from(h.page_size)) as u32),
                overlay: BTreeMap::new(),
                originals: None,
            }));
        };
        // What a rollback restores: the journal's page size, size and page 1.
        let page_size = o.page_size();
        let header = match o.original_page1()? {
            Some(page1) => DbHeader::parse(&page1).ok(),
            None => file_header,
        };
        match header {
            None => Ok(None),
            Some(h) if h.page_size != page_size => Err(CaptureError::CannotFollow(format!(
                "the rollback journal's page size {page_size} differs from the database's {}",
                h.page_size
            ))),
            // A rollback leaves the file as long as the journal's original size (the file's
            // size in pages when the transaction began), and SQLite's size is the header's
            // when it is valid: a file can be longer than the database (pages a writer
            // killed in MEMORY or OFF mode spilled past its end). A header size past the
            // file's end is corrupt to SQLite; the image stops at the file's end.
            Some(h) => Ok(Some(Image {
                page_size,
                size: h
                    .valid_db_size()
                    .map_or(o.initial_db_pages(), |n| n.min(o.initial_db_pages())),
                overlay: BTreeMap::new(),
                originals: Some(o),
            })),
        }
    }

    /// Calls `f` for every page from 1 to the size (but the lock page), in order.
    /// `Ok(false)` means a WAL frame or the journal changed under the read: retry.
    pub(super) fn walk(
        &self,
        db: &File,
        wal: Option<&File>,
        mut f: impl FnMut(u32, &[u8]) -> CaptureResult<()>,
    ) -> CaptureResult<bool> {
        let ps = self.page_size as usize;
        let lock = lock_byte_page(self.page_size);
        // One frame buffer: WAL pages are read with their frame header, database pages
        // into the page part.
        let mut frame = vec![0u8; WAL_FRAME_HEADER_SIZE + ps];
        for pgno in 1..=self.size {
            if pgno == lock {
                continue;
            }
            if let Some(o) = &self.originals {
                if let Some(rec) = o.record(pgno) {
                    let buf = &mut frame[WAL_FRAME_HEADER_SIZE..];
                    if !o.read(rec, buf)? {
                        return Ok(false);
                    }
                    f(pgno, buf)?;
                    continue;
                }
            }
            match (self.overlay.get(&pgno), wal) {
                (Some((t, p)), Some(wal)) => match t.read_frame_page(wal, p, &mut frame) {
                    Ok(()) => {}
                    Err(WalError::FrameChanged { .. }) => return Ok(false),
                    Err(e) => return Err(e.into()),
                },
                (Some(_), None) => return Ok(false),
                (None, _) => {
                    let buf = &mut frame[WAL_FRAME_HEADER_SIZE..];
                    let off = u64::from(pgno - 1) * ps as u64;
                    if !read_full(db, off, buf)? {
                        // Past the end of the file: what SQLite reads there is zeros.
                        let n = db_len_from(db)?.saturating_sub(off).min(ps as u64) as usize;
                        read_full(db, off, &mut buf[..n])?;
                        buf[n..].fill(0);
                    }
                }
            }
            f(pgno, &frame[WAL_FRAME_HEADER_SIZE..])?;
        }
        Ok(true)
    }
}

pub(super) fn db_len_from(f: &File) -> io::Result<u64> {
    Ok(f.metadata()?.len())
}

/// Receives the pages of a database image: computes per-page checksums and, for a
/// snapshot, writes them to a staged LTX file. `start` may be called again on a retry.
pub(super) struct ImageSink<'a> {
    /// For a snapshot: the staging area, the key, the TXID and the file being written.
    pub(super) writer: Option<(Arc<Staging>, PathBuf, u64, Option<LtxWriter>)>,
    pub(super) sums: Vec<PageHash>,
    pub(super) sum: ContentChecksum,
    /// Pages to keep a copy of (a listed run being read back), and the copies.
    pub(super) keep: Option<&'a BTreeSet<u32>>,
    pub(super) kept: HeldBatch,
}

impl ImageSink<'_> {
    pub(super) fn new(writer: Option<(Arc<Staging>, PathBuf, u64, Option<LtxWriter>)>) -> Self {
        ImageSink {
            writer,
            sums: Vec::new(),
            sum: ContentChecksum::EMPTY,
            keep: None,
            kept: HeldBatch::default(),
        }
    }
}

/// Receives the pages of a database image, in order (`start` may be called again on a
/// retry).
pub(super) trait PageSink {
    fn start(&mut self, page_size: u32, size: u32) -> CaptureResult<()>;
    fn page(&mut self, pgno: u32, data: &[u8]) -> CaptureResult<()>;
}

impl PageSink for ImageSink<'_> {
    fn start(&mut self, page_size: u32, size: u32) -> CaptureResult<()> {
        self.sums = vec![0; size as usize];
        self.sum = ContentChecksum::EMPTY;
        self.kept.clear();
        if let Some((staging, rel, txid, w)) = &mut self.writer {
            *w = None;
            if size > 0 {
                let h = LtxHeader::snapshot(page_size, size, *txid, now_ms());
                *w = Some(staging.begin_snapshot(rel, h)?);
            }
        }
        Ok(())
    }

    fn page(&mut self, pgno: u32, data: &[u8]) -> CaptureResult<()> {
        let c = page_hash(pgno, data);
        self.sums[pgno as usize - 1] = c;
        self.sum.toggle(c);
        if self.keep.is_some_and(|k| k.contains(&pgno)) {
            self.kept.add(pgno, c, data);
        }
        if let Some((_, _, _, Some(w))) = &mut self.writer {
            w.add_page(pgno, data)?;
        }
        Ok(())
    }
}
