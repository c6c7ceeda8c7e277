//! Local copies of what one replica holds, so that compaction and snapshots never GET
//! what walfs uploaded itself.
//!
//! Per database and replica, under the database's staging directory (`<id>`: see
//! [`super::fanout::replica_id`]):
//!
//! ```text
//! <staging>/<relpath>/replicas/<id>/<level>/<min>-<max>.ltx      an LTX object the replica holds
//! <staging>/<relpath>/replicas/<id>/<level>/<min>-<max>.record   its verification record, if any
//! <staging>/<relpath>/replicas/<id>/<level>/<min>-<max>.tick     an object whose copy went (empty)
//! ```
//!
//! A `.tick` file stands for an object of the level's window whose copy was dropped
//! because a larger object of the same level covers it ([`super::compact::covered_at_level`]):
//! the binary counter still counts its tick ([`super::compact::absorbed_by_next`]), but
//! nothing needs its bytes.
//!
//! Each replica's uploader keeps each object it uploaded; that replica's maintenance loop
//! ([`super::maintain`]) adds the objects it compacts and deletes the copies it no
//! longer needs. After a restart the directory is the maintenance loop's view of what is
//! still to compact. Replicas are uploaded on their own ([`super::fanout`]), so each holds
//! different objects and has copies of its own.
//!
//! The copies live in each database's staging directory (staging leaves [`KEPT_DIR`]
//! alone); [`KeptCopies`] is one replica's view of them.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::ltx::{ltx_object_name, parse_ltx_object_name, LtxHeader, HEADER_SIZE};
use crate::staging::{list_dir, sync_dir, Staging, StagingResult, KEPT_DIR};

use super::compact::ObjId;
use super::record::ChecksumRecord;

/// A local copy of an object the replica holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    /// The LTX file.
    pub path: PathBuf,
    /// Its header's timestamp: the commit time of `max_txid`, in ms.
    pub timestamp_ms: i64,
    /// The verification record of `max_txid`, if the writer had one.
    pub record: Option<ChecksumRecord>,
}

/// Where the bytes of an object to keep come from.
pub enum KeepSource<'a> {
    /// The object's bytes: written to a new file (fsynced).
    Bytes(&'a [u8]),
    /// A file in staging that nothing else needs: moved into place.
    File(&'a Path),
    /// A file in staging that stays (a staged snapshot another replica may still need):
    /// hard-linked into place (copied where links do not work).
    Linked(&'a Path),
}

fn record_path(ltx: &Path) -> PathBuf {
    ltx.with_extension("record")
}

/// One replica's local copies of the objects it holds, for every database of a mount.
#[derive(Clone)]
pub struct KeptCopies {
    staging: Arc<Staging>,
    /// The replica's id ([`super::fanout::replica_id`]).
    id: String,
    /// The replica's directory inside each database's staging directory.
    dir: PathBuf,
}

impl KeptCopies {
    /// The copies of the replica with id `id` ([`super::fanout::replica_id`]).
    pub fn new(staging: Arc<Staging>, id: &str) -> KeptCopies {
        KeptCopies {
            staging,
            id: id.to_string(),
            dir: Path::new(KEPT_DIR).join(id),
        }
    }

    /// The replica's id.
    pub fn replica_id(&self) -> &str {
        &self.id
    }

    /// The staging area the copies live in.
    pub fn staging(&self) -> &Arc<Staging> {
        &self.staging
    }

    /// The replica's directory of `db` (its copies by level, and what the replica holds:
    /// [`super::fanout`]).
    pub fn replica_dir(&self, db: &Path) -> StagingResult<PathBuf> {
        Ok(self.staging.db_dir(db)?.join(&self.dir))
    }

    /// The directory of `db`'s local copies at `level`.
    pub fn kept_dir(&self, db: &Path, level: u8) -> StagingResult<PathBuf> {
        Ok(self.replica_dir(db)?.join(level.to_string()))
    }

    /// Keeps a local copy of an object the replica now holds; returns it.
    pub fn keep(
        &self,
        db: &Path,
        level: u8,
        (min_txid, max_txid): (u64, u64),
        source: KeepSource<'_>,
        record: Option<ChecksumRecord>,
    ) -> StagingResult<Kept> {
        let dir = self.kept_dir(db, level)?;
        fs::create_dir_all(&dir)?;
        let path = dir.join(ltx_object_name(min_txid, max_txid));
        match source {
            KeepSource::Bytes(b) => {
                let tmp = path.with_extension("ltx.tmp");
                let mut f = File::create(&tmp)?;
                f.write_all(b)?;
                f.sync_all()?;
                fs::rename(&tmp, &path)?;
            }
            KeepSource::File(f) => {
                if f != path {
                    fs::rename(f, &path)?;
                }
            }
            KeepSource::Linked(f) => {
                let _ = fs::remove_file(&path);
                if let Err(e) = fs::hard_link(f, &path) {
                    tracing::debug!(file = %f.display(), "copying rather than linking: {e}");
                    let tmp = path.with_extension("ltx.tmp");
                    fs::copy(f, &tmp)?;
                    File::open(&tmp)?.sync_all()?;
                    fs::rename(&tmp, &path)?;
                }
            }
        }
        self.set_kept_record(&path, record.as_ref())?;
        sync_dir(&dir)?;
        let timestamp_ms = read_header(&path)?.timestamp_ms;
        Ok(Kept {
            level,
            min_txid,
            max_txid,
            path,
            timestamp_ms,
            record,
        })
    }

    /// Writes (or removes, for `None`) the record beside a kept LTX file.
    pub fn set_kept_record(
        &self,
        ltx: &Path,
        record: Option<&ChecksumRecord>,
    ) -> StagingResult<()> {
        let rp = record_path(ltx);
        match record {
            Some(r) => {
                let tmp = rp.with_extension("record.tmp");
                let mut f = File::create(&tmp)?;
                f.write_all(r.encode().as_bytes())?;
                f.sync_all()?;
                Ok(fs::rename(&tmp, &rp)?)
            }
            None => match fs::remove_file(&rp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
        }
    }

    /// The directories of `db`'s local copies, one per level, with their level.
    fn level_dirs(&self, db: &Path) -> StagingResult<Vec<(u8, PathBuf)>> {
        Ok(list_dir(&self.replica_dir(db)?)?
            .into_iter()
            .filter_map(|e| {
                let level = e.file_name().to_str()?.parse::<u8>().ok()?;
                Some((level, e.path()))
            })
            .collect())
    }

    /// Every local copy of `db`, by level then TXIDs. Stray temporary files (an
    /// interrupted merge or keep) are removed; a copy whose header cannot be read is
    /// removed too (the replica still holds the object).
    pub fn kept(&self, db: &Path) -> StagingResult<Vec<Kept>> {
        let mut out = Vec::new();
        for (level, dir) in self.level_dirs(db)? {
            for f in list_dir(&dir)? {
                let name = f.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".tmp") {
                    fs::remove_file(f.path())?;
                    continue;
                }
                let Some((min_txid, max_txid)) = parse_ltx_object_name(&name) else {
                    continue;
                };
                let path = f.path();
                let header = match read_header(&path) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(file = %path.display(), "dropping an unreadable local copy: {e}");
                        self.drop_kept(&path)?;
                        continue;
                    }
                };
                let record = match fs::read_to_string(record_path(&path)) {
                    Ok(t) => ChecksumRecord::parse(&t).ok(),
                    Err(_) => None,
                };
                out.push(Kept {
                    level,
                    min_txid,
                    max_txid,
                    path,
                    timestamp_ms: header.timestamp_ms,
                    record,
                });
            }
        }
        out.sort_by_key(|k| (k.level, k.min_txid, k.max_txid));
        Ok(out)
    }

    /// The local copies of `db` by name only (level and TXIDs) with their paths, without
    /// reading them
    /// and without the clean-up of [`KeptCopies::kept`], so that it is safe to call while the
    /// maintenance loop writes or drops copies (a copy may be gone by the time it is read).
    pub fn kept_names(&self, db: &Path) -> StagingResult<Vec<(ObjId, PathBuf)>> {
        let mut out = Vec::new();
        for (level, dir) in self.level_dirs(db)? {
            for f in list_dir(&dir)? {
                if let Some((min, max)) = parse_ltx_object_name(&f.file_name().to_string_lossy()) {
                    out.push((ObjId::new(level, min, max), f.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a local copy and its record.
    pub fn drop_kept(&self, ltx: &Path) -> StagingResult<()> {
        for p in [ltx.to_path_buf(), record_path(ltx)] {
            match fs::remove_file(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Replaces the copy of `id` by a tick marker: the object's tick still counts, its bytes
    /// and record go. The marker is written before the copy goes, without fsync: if a crash
    /// loses it, the binary counter only counts one tick fewer (a less compact object).
    pub fn drop_to_tick(&self, db: &Path, id: ObjId, ltx: &Path) -> StagingResult<()> {
        let dir = self.kept_dir(db, id.level)?;
        File::create(dir.join(tick_name(id.min, id.max)))?;
        self.drop_kept(ltx)
    }

    /// The objects of `db` whose copies were replaced by tick markers
    /// ([`KeptCopies::drop_to_tick`]), any level.
    pub fn ticks(&self, db: &Path) -> StagingResult<Vec<ObjId>> {
        let mut out = Vec::new();
        for (level, dir) in self.level_dirs(db)? {
            for f in list_dir(&dir)? {
                if let Some((min, max)) = parse_tick_name(&f.file_name().to_string_lossy()) {
                    out.push(ObjId::new(level, min, max));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes a tick marker.
    pub fn drop_tick(&self, db: &Path, id: ObjId) -> StagingResult<()> {
        let p = self.kept_dir(db, id.level)?.join(tick_name(id.min, id.max));
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Bytes of every local copy of every database (for tests and metrics).
    pub fn kept_bytes(&self, db: &Path) -> StagingResult<u64> {
        Ok(self
            .kept(db)?
            .iter()
            .filter_map(|k| fs::metadata(&k.path).ok())
            .map(|m| m.len())
            .sum())
    }
}

fn tick_name(min: u64, max: u64) -> String {
    ltx_object_name(min, max).replace(".ltx", ".tick")
}

fn parse_tick_name(name: &str) -> Option<(u64, u64)> {
    parse_ltx_object_name(&format!("{}.ltx", name.strip_suffix(".tick")?))
}

/// The header of a local copy.
pub fn read_header(path: &Path) -> io::Result<LtxHeader> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; HEADER_SIZE];
    File::open(path)?.read_exact_at(&mut b, 0)?;
    LtxHeader::from_bytes(&b).map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))
}
