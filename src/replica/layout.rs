//! The object layout: the key of each LTX object in a replica ([`Layout`]), and which
//! database paths are valid in it (`check_db_path`). Names of the objects themselves
//! (`<min>-<max>.ltx`) are [`crate::ltx`]'s.
//!
//! Layout, as Litestream 0.5 writes it (`file/replica_client.go`, `s3/replica_client.go`,
//! `litestream.go` at v0.5.16):
//! - file replica: `<dir>/<db>/ltx/<level in decimal>/<min %016x>-<max %016x>.ltx`;
//! - S3: `<prefix>/<db>/<level as %04x>/<min %016x>-<max %016x>.ltx`.
//!
//! `<db>` is the database's path relative to a replicated directory, or empty when the
//! replica holds a single database directly at its URL. Litestream itself builds S3 keys of
//! a database at the bucket root as `./0000/...` or `/0000/...` (it joins an empty or `.`
//! path with `/`); walfs writes `0000/...` there, the only form object stores agree on.

use crate::ltx::{ltx_object_name, parse_ltx_object_name};

use super::error::{StoreError, StoreErrorKind};

/// Which of Litestream's two object layouts a store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<db>/ltx/<level decimal>/<name>`
    File,
    /// `<db>/<level %04x>/<name>`
    S3,
}

impl Layout {
    /// The directory segment(s) of a level.
    fn level_dir(self, level: u8) -> String {
        match self {
            Layout::File => format!("ltx/{level}"),
            Layout::S3 => format!("{level:04x}"),
        }
    }

    /// The key of a level's directory: `root/db/level`.
    pub fn level_key(self, root: &str, db_path: &str, level: u8) -> String {
        join_key(&[root, db_path, &self.level_dir(level)])
    }

    /// The key of an LTX object, relative to the bucket (S3) or replica directory (file).
    pub fn ltx_key(
        self,
        root: &str,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> String {
        join_key(&[
            root,
            db_path,
            &self.level_dir(level),
            &ltx_object_name(min_txid, max_txid),
        ])
    }

    /// Splits a key relative to the root into (db path, level, min, max), if it is an LTX
    /// object of this layout.
    pub fn parse_key(self, rel: &str) -> Option<(String, u8, u64, u64)> {
        let mut parts: Vec<&str> = rel.split('/').collect();
        let (min, max) = parse_ltx_object_name(parts.pop()?)?;
        let level_seg = parts.pop()?;
        let level = match self {
            Layout::File => {
                if parts.pop()? != "ltx" || !level_seg.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                level_seg.parse::<u8>().ok()?
            }
            Layout::S3 => {
                if level_seg.len() != 4
                    || !level_seg
                        .bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                {
                    return None;
                }
                u8::try_from(u16::from_str_radix(level_seg, 16).ok()?).ok()?
            }
        };
        Some((parts.join("/"), level, min, max))
    }
}

/// The non-empty parts joined with `/`.
pub(super) fn join_key(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks a database path relative to the replica root: "" or `a/b/c.db` with no empty, `.`
/// or `..` segments.
pub(super) fn check_db_path(db_path: &str) -> Result<(), StoreError> {
    if db_path.is_empty() {
        return Ok(());
    }
    let bad = db_path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.contains('\0'));
    if bad {
        return Err(StoreError::new(
            StoreErrorKind::InvalidPath,
            format!(
                "database path {db_path:?} is not a clean relative path; use e.g. \"app/main.db\" \
                 (no leading '/', '.', '..' or empty segments)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layouts_match_litestream() {
        let f = Layout::File;
        assert_eq!(
            f.ltx_key("", "", 0, 1, 2),
            "ltx/0/0000000000000001-0000000000000002.ltx"
        );
        assert_eq!(
            f.ltx_key("", "app/main.db", 9, 1, 0xabc),
            "app/main.db/ltx/9/0000000000000001-0000000000000abc.ltx"
        );
        assert_eq!(
            f.ltx_key("", "x.db", 10, 3, 3),
            "x.db/ltx/10/0000000000000003-0000000000000003.ltx"
        );
        let s = Layout::S3;
        assert_eq!(
            s.ltx_key("backups/prod", "", 0, 1, 2),
            "backups/prod/0000/0000000000000001-0000000000000002.ltx"
        );
        assert_eq!(
            s.ltx_key("backups", "app/main.db", 10, 0xff, 0x100),
            "backups/app/main.db/000a/00000000000000ff-0000000000000100.ltx"
        );
        assert_eq!(
            s.ltx_key("", "", 9, 1, 1),
            "0009/0000000000000001-0000000000000001.ltx"
        );

        assert_eq!(
            f.parse_key("app/main.db/ltx/9/0000000000000001-0000000000000abc.ltx"),
            Some(("app/main.db".to_string(), 9, 1, 0xabc))
        );
        assert_eq!(
            f.parse_key("ltx/0/0000000000000001-0000000000000002.ltx"),
            Some((String::new(), 0, 1, 2))
        );
        assert_eq!(
            s.parse_key("a/000a/00000000000000ff-0000000000000100.ltx"),
            Some(("a".to_string(), 10, 0xff, 0x100))
        );
        assert_eq!(
            f.parse_key("a/0/0000000000000001-0000000000000002.ltx"),
            None
        );
        assert_eq!(
            s.parse_key("a/0/0000000000000001-0000000000000002.ltx"),
            None
        );
        assert_eq!(
            s.parse_key("a/0000/0000000000000001-0000000000000002.ltx.tmp"),
            None
        );
        assert_eq!(
            s.parse_key("a/000A/0000000000000001-0000000000000002.ltx"),
            None
        );
    }

    #[test]
    fn rejects_unclean_db_paths() {
        for bad in ["/abs.db", "a//b.db", "./a.db", "a/../b.db", "a/"] {
            assert_eq!(
                check_db_path(bad).unwrap_err().kind(),
                StoreErrorKind::InvalidPath,
                "{bad}"
            );
        }
        check_db_path("").unwrap();
        check_db_path("a b/c.db").unwrap();
    }
}
