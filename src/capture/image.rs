//! A database's committed image as SQLite would read it: the database file, overlaid with
//! the newest committed version of each page in the `-wal`, or with the original pages a
//! live rollback journal holds. Snapshots and comparisons walk it page by page.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::{now_ms, rollback, wal_io};
use crate::replica::ltx::{lock_pgno, LtxHeader};
use crate::sqlite::{
    page_hash, read_full, ContentChecksum, DbHeader, PageHash, WalError, WalPage, WalTransaction,
    WAL_FRAME_HEADER_SIZE,
};
use crate::staging::{HeldBatch, LtxWriter, Staging};

/// The committed database image as of the WAL transactions `txns` on top of `db`: its page
/// size, its size in pages and, per page, where its newest version lies.
pub(super) struct Image<'a> {
    pub(super) page_size: u32,
    pub(super) size: u32,
    pub(super) overlay: BTreeMap<u32, (&'a WalTransaction, WalPage)>,
    /// A live rollback journal (a transaction in progress, or hot after a crash): the
    /// committed content of the pages it recorded is their original in the journal.
    pub(super) originals: Option<rollback::Originals>,
}

impl<'a> Image<'a> {
    pub(super) fn new(header: &DbHeader, db_len: u64, txns: &'a [WalTransaction]) -> Image<'a> {
        let page_size = header.page_size;
        let mut size = header
            .valid_db_size()
            .unwrap_or((db_len / u64::from(page_size)) as u32);
        let mut overlay = BTreeMap::new();
        for t in txns {
            for p in &t.pages {
                overlay.insert(p.pgno, (t, *p));
            }
            size = t.db_size;
        }
        Image {
            page_size,
            size,
            overlay,
            originals: None,
        }
    }

    /// Calls `f` for every page from 1 to the size (but the lock page), in order.
    /// `Ok(false)` means a WAL frame changed under the read: retry.
    pub(super) fn walk(
        &self,
        db: &File,
        wal: Option<&File>,
        mut f: impl FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        let ps = self.page_size as usize;
        let lock = lock_pgno(self.page_size);
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
                    Err(e) => return Err(wal_io(e)),
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
    fn start(&mut self, page_size: u32, size: u32) -> io::Result<()>;
    fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()>;
}

impl PageSink for ImageSink<'_> {
    fn start(&mut self, page_size: u32, size: u32) -> io::Result<()> {
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

    fn page(&mut self, pgno: u32, data: &[u8]) -> io::Result<()> {
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

/// Why a transaction could not be staged.
pub(super) enum StageError {
    /// The WAL changed under the read (a restart overwrote it): heal.
    WalChanged(String),
    Io(io::Error),
}

impl From<io::Error> for StageError {
    fn from(e: io::Error) -> Self {
        StageError::Io(e)
    }
}
