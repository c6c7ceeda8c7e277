//! The verification record: the content checksum (blake3) after each uploaded TXID range, in a
//! place Litestream ignores. On S3 the uploader puts it in the LTX object's metadata
//! (`walfs-record`); on a file replica, and for replicas written before that, it is a small
//! sidecar object. Restores compare the rebuilt database against it (docs/FORMAT.md,
//! "Verification records").
//!
//! This file owns the record's format and keys ([`ChecksumRecord`], [`checksum_record_key`])
//! and [`SidecarStore`], the access to objects that are not LTX files (records, and the
//! 100-byte header of an LTX object).
//!
//! Keys (`<txid>` is the max TXID of the uploaded range, `%016x`):
//! - file replica: `<dir>/<db>/walfs/checksums/<txid>`;
//! - S3: `<prefix>/<db>/walfs/checksums/<txid>`.
//!
//! The deletion marker of a database that was deleted: `<db>/walfs/deleted` beside them
//! ([`deleted_marker_key`]).
//!
//! Content, one line: `txid=<%016x> blake3=<%032x> page_size=<n> commit=<n>`, where `blake3`
//! is the [`ContentChecksum`] of the whole database after `txid` (blake3 per page,
//! XOR-combined; see `sqlite/content.rs`), and commit is its size in pages. Records written
//! before walfs used blake3 have `checksum=<%016x>` instead: the LTX database checksum
//! (CRC-64, [`crate::ltx::DatabaseChecksum`]). Restore still checks those.
//!
//! Litestream lists only `<db>/ltx/<level>/` (file) or `<db>/<level %04x>/` (S3) and parses
//! object names as `<min>-<max>.ltx`, so it never sees these objects, and
//! `ReplicaStore::list_databases` ignores them for the same reason.
//!

use bytes::Bytes;

use crate::ltx::{LtxHeader, HEADER_SIZE};
use crate::replica::error::{ReplicaError, ReplicaResult};
use crate::replica::layout::Layout;
use crate::replica::store::{LtxObjectInfo, ReplicaStore};
use crate::replica::url::ReplicaUrl;
use crate::sqlite::ContentChecksum;

/// The directory of a database's records, below the database's replica path.
pub const CHECKSUMS_DIR: &str = "walfs/checksums";

/// The content checksum after one TXID, as walfs recorded it when it uploaded that TXID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumRecord {
    /// The TXID (the max TXID of an uploaded range).
    pub txid: u64,
    /// The checksum of the whole database after `txid`.
    pub checksum: RecordedChecksum,
    /// The database page size.
    pub page_size: u32,
    /// The database size in pages after `txid`.
    pub commit: u32,
}

impl ChecksumRecord {
    /// The record's content: one line, ending in a newline.
    pub fn encode(&self) -> String {
        format!(
            "txid={:016x} {} page_size={} commit={}\n",
            self.txid, self.checksum, self.page_size, self.commit
        )
    }

    /// Parses a record's content; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text.trim();
        if line.contains('\n') {
            return Err("a record is one line".into());
        }
        let (mut txid, mut page_size, mut commit) = (None, None, None);
        let (mut content, mut crc) = (None, None);
        for field in line.split_whitespace() {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| format!("field {field:?} is not key=value"))?;
            let bad = |what: &str| format!("{k}={v:?} is not {what}");
            match k {
                "txid" => txid = Some(u64::from_str_radix(v, 16).map_err(|_| bad("hex"))?),
                "blake3" => {
                    content =
                        Some(ContentChecksum::parse_hex(v).ok_or_else(|| bad("32 hex digits"))?)
                }
                "checksum" => crc = Some(u64::from_str_radix(v, 16).map_err(|_| bad("hex"))?),
                "page_size" => page_size = Some(v.parse().map_err(|_| bad("a number"))?),
                "commit" => commit = Some(v.parse().map_err(|_| bad("a number"))?),
                // Unknown fields are allowed, for later versions.
                _ => {}
            }
        }
        let need = |name: &str| format!("the record has no {name} field");
        Ok(ChecksumRecord {
            txid: txid.ok_or_else(|| need("txid"))?,
            checksum: match (content, crc) {
                (Some(c), _) => RecordedChecksum::Content(c),
                (None, Some(c)) => RecordedChecksum::LegacyCrc64(c),
                (None, None) => return Err(need("blake3")),
            },
            page_size: page_size.ok_or_else(|| need("page_size"))?,
            commit: commit.ok_or_else(|| need("commit"))?,
        })
    }
}

/// The checksum a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordedChecksum {
    /// The content checksum (`blake3=`).
    Content(ContentChecksum),
    /// The LTX database checksum (CRC-64, `checksum=`) of a record written before walfs
    /// used blake3.
    LegacyCrc64(u64),
}

/// The record's field: `blake3=<32 hex>` or `checksum=<16 hex>`.
impl std::fmt::Display for RecordedChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordedChecksum::Content(c) => write!(f, "blake3={c}"),
            RecordedChecksum::LegacyCrc64(c) => write!(f, "checksum={c:016x}"),
        }
    }
}

/// The deletion marker of a database, below its replica path (see [`deleted_marker_key`]).
pub const DELETED_MARKER: &str = "walfs/deleted";

/// The key of `db_path`'s deletion marker: `<root>/<db_path>/walfs/deleted`. Its content is
/// one line, `txid=<%016x> deleted_at=<RFC3339 UTC>`: the database was deleted (or stopped
/// being an SQLite database) after `txid`. A marker whose TXID is below the newest LTX
/// object's max TXID is superseded: the database came back.
pub fn deleted_marker_key(root: &str, db_path: &str) -> String {
    [root, db_path, DELETED_MARKER]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// The key of the record of `db_path` at `txid`, relative to the bucket (S3, whose prefix is
/// `root`) or the replica directory (file, `root` is "").
pub fn checksum_record_key(layout: Layout, root: &str, db_path: &str, txid: u64) -> String {
    let _ = layout; // The same shape in both layouts.
    [root, db_path, CHECKSUMS_DIR, &format!("{txid:016x}")]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// Access to a replica's objects that are not LTX files: verification records, and the
/// 100-byte header of an LTX object. A thin layer over [`ReplicaStore`], so it shares its
/// retries, request counters and credentials.
#[derive(Debug, Clone)]
pub struct SidecarStore {
    store: ReplicaStore,
}

impl SidecarStore {
    /// Opens a handle on the replica at `url`. Makes no request.
    pub fn open(url: &ReplicaUrl) -> ReplicaResult<Self> {
        Ok(SidecarStore {
            store: ReplicaStore::open(url)?,
        })
    }

    /// A sidecar on an already open replica store.
    pub fn new(store: ReplicaStore) -> Self {
        SidecarStore { store }
    }

    /// The key of `db_path`'s record at `txid`.
    pub fn record_key(&self, db_path: &str, txid: u64) -> String {
        checksum_record_key(self.store.layout(), self.store.root(), db_path, txid)
    }

    /// Uploads `db_path`'s record (atomically: readers see all of it or nothing).
    pub async fn put_checksum_record(
        &self,
        db_path: &str,
        record: &ChecksumRecord,
    ) -> ReplicaResult<()> {
        let key = self.record_key(db_path, record.txid);
        Ok(self
            .store
            .put_object(&key, Bytes::from(record.encode()))
            .await?)
    }

    /// Uploads `db_path`'s deletion marker with `content` (see [`deleted_marker_key`]).
    pub async fn put_deleted_marker(&self, db_path: &str, content: &str) -> ReplicaResult<()> {
        let key = deleted_marker_key(self.store.root(), db_path);
        Ok(self
            .store
            .put_object(&key, Bytes::from(content.to_string()))
            .await?)
    }

    /// Finds `db_path`'s record at `txid`: in the metadata of `last` (the object that ends
    /// at `txid`; S3), else as a separate record object. Returns it with where it was
    /// found; `None` if the writer recorded none.
    pub async fn get_checksum_record(
        &self,
        db_path: &str,
        txid: u64,
        last: Option<&LtxObjectInfo>,
    ) -> ReplicaResult<Option<(ChecksumRecord, String)>> {
        let base = self.store.base().to_string();
        let check = |text: &str, place: String| -> ReplicaResult<(ChecksumRecord, String)> {
            let record = ChecksumRecord::parse(text).map_err(|m| {
                ReplicaError::Invalid(format!("verification record {place} is malformed: {m}"))
            })?;
            if record.txid != txid {
                return Err(ReplicaError::Invalid(format!(
                    "verification record {place} is for TXID {}, not {txid}",
                    record.txid
                )));
            }
            Ok((record, place))
        };
        if let Some(o) = last.filter(|o| o.max_txid == txid) {
            let meta = self
                .store
                .head_ltx_record(db_path, o.level, o.min_txid, o.max_txid)
                .await?;
            if let Some(text) = meta {
                return check(&text, format!("in the metadata of {base}/{}", o.key)).map(Some);
            }
        }
        let key = self.record_key(db_path, txid);
        let bytes = match self.store.get_object(&key).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            ReplicaError::Invalid(format!("verification record {base}/{key} is not text"))
        })?;
        check(text, format!("{base}/{key}")).map(Some)
    }

    /// Reads and parses only the 100-byte header of `db_path`'s LTX object `o` (one
    /// ranged GET; on an encrypted replica, of its first 64 KiB segment).
    pub async fn ltx_header(&self, db_path: &str, o: &LtxObjectInfo) -> ReplicaResult<LtxHeader> {
        let key = &o.key;
        let b = self
            .store
            .get_ltx_head(db_path, o.level, (o.min_txid, o.max_txid), HEADER_SIZE)
            .await?;
        let arr: &[u8; HEADER_SIZE] = b[..].try_into().map_err(|_| {
            ReplicaError::Invalid(format!("object {key} is shorter than an LTX header"))
        })?;
        let h = LtxHeader::from_bytes(arr)
            .map_err(|m| ReplicaError::Invalid(format!("object {key} is corrupt: {m}")))?;
        h.validate().map_err(|m| {
            ReplicaError::Invalid(format!("object {key} is corrupt: invalid header: {m}"))
        })?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let r = ChecksumRecord {
            txid: 0x2a,
            checksum: RecordedChecksum::Content(ContentChecksum::from_value(0xdead_beef)),
            page_size: 4096,
            commit: 12,
        };
        let text = r.encode();
        assert_eq!(
            text,
            "txid=000000000000002a blake3=000000000000000000000000deadbeef page_size=4096 commit=12\n"
        );
        assert_eq!(ChecksumRecord::parse(&text).unwrap(), r);
        // A record from before blake3 keeps its CRC-64.
        let legacy = ChecksumRecord {
            checksum: RecordedChecksum::LegacyCrc64(0x8000_0000_dead_beef),
            ..r
        };
        assert_eq!(
            ChecksumRecord::parse("commit=12 txid=2a checksum=80000000deadbeef page_size=4096 x=y")
                .unwrap(),
            legacy
        );
        assert_eq!(ChecksumRecord::parse(&legacy.encode()).unwrap(), legacy);
        for (bad, want) in [
            ("txid=2a blake3=1 page_size=4096 commit=1", "32 hex digits"),
            ("txid=2a page_size=4096 commit=1", "no blake3"),
            ("txid=2a checksum=1 page_size=4096", "no commit"),
            ("txid=zz checksum=1 page_size=1 commit=1", "not hex"),
            ("txid", "key=value"),
            ("txid=1\ncommit=2", "one line"),
        ] {
            let e = ChecksumRecord::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn record_keys() {
        assert_eq!(
            checksum_record_key(Layout::File, "", "app/main.db", 0x2a),
            "app/main.db/walfs/checksums/000000000000002a"
        );
        assert_eq!(
            checksum_record_key(Layout::File, "", "", 1),
            "walfs/checksums/0000000000000001"
        );
        assert_eq!(
            checksum_record_key(Layout::S3, "backups/prod", "a.db", 1),
            "backups/prod/a.db/walfs/checksums/0000000000000001"
        );
        // Not an LTX key in either layout, so Litestream and list_databases skip it.
        for layout in [Layout::File, Layout::S3] {
            assert_eq!(
                layout.parse_key(&checksum_record_key(layout, "", "a.db", 1)),
                None
            );
        }
    }

    #[test]
    fn file_records_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let url = ReplicaUrl::parse(&format!("file://{}", tmp.path().display())).unwrap();
        let s = SidecarStore::open(&url).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(s.get_checksum_record("a.db", 7, None).await.unwrap(), None);
            let r = ChecksumRecord {
                txid: 7,
                checksum: RecordedChecksum::Content(ContentChecksum::from_value(1)),
                page_size: 512,
                commit: 3,
            };
            s.put_checksum_record("a.db", &r).await.unwrap();
            assert!(tmp
                .path()
                .join("a.db/walfs/checksums/0000000000000007")
                .is_file());
            let (got, place) = s
                .get_checksum_record("a.db", 7, None)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, r);
            assert!(
                place.ends_with("a.db/walfs/checksums/0000000000000007"),
                "{place}"
            );
            std::fs::write(
                tmp.path().join("a.db/walfs/checksums/0000000000000008"),
                "junk",
            )
            .unwrap();
            let e = s.get_checksum_record("a.db", 8, None).await.unwrap_err();
            assert!(e.to_string().contains("malformed"), "{e}");
        });
    }
}
