//! Merging consecutive changes of one database into one: the newest version of each page,
//! the last size, and explicit zero pages where sequential application would have left
//! zeros (the database shrank below a page and grew back without writing it).
//!
//! Capture merges the WAL transactions of one poll into a batch with it, and the uploader
//! merges staged batches into one LTX file. Each page is identified by a location `T` (a
//! WAL frame, a segment offset) that the caller reads once, at the end.

use std::collections::BTreeMap;

/// The merge of a run of changes; see the module header.
#[derive(Debug, Clone)]
pub struct PageMerge<T> {
    pages: BTreeMap<u32, Option<T>>,
    floor: u32,
    commit: u32,
}

impl<T> PageMerge<T> {
    /// A merge on top of a database of `prior_size` pages (`None`: unknown, as for the
    /// uploader, which does not need to know).
    pub fn new(prior_size: Option<u32>) -> PageMerge<T> {
        PageMerge {
            pages: BTreeMap::new(),
            floor: prior_size.unwrap_or(u32::MAX),
            commit: prior_size.unwrap_or(0),
        }
    }

    /// Applies one change: the database is resized to `commit` pages, then `pages` are
    /// written (pages past `commit` are ignored).
    pub fn apply(&mut self, commit: u32, pages: impl IntoIterator<Item = (u32, T)>) {
        self.floor = self.floor.min(commit);
        self.pages.split_off(&(commit.saturating_add(1)));
        for (pgno, at) in pages {
            if pgno >= 1 && pgno <= commit {
                self.pages.insert(pgno, Some(at));
            }
        }
        self.commit = commit;
    }

    /// The size after the last change.
    pub fn commit(&self) -> u32 {
        self.commit
    }

    /// The merged change: the final size, and per page its newest location or `None` for
    /// a page that must be written as zeros. `lock_pgno` (SQLite's lock-byte page, never
    /// stored) is left out.
    pub fn finish(mut self, lock_pgno: u32) -> (u32, BTreeMap<u32, Option<T>>) {
        for pgno in self.floor.saturating_add(1)..=self.commit {
            if pgno != lock_pgno {
                self.pages.entry(pgno).or_insert(None);
            }
        }
        self.pages.remove(&lock_pgno);
        (self.commit, self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_version_wins_and_shrink_then_grow_zeroes() {
        let mut m = PageMerge::new(Some(10));
        m.apply(12, [(3, 'a'), (11, 'b'), (12, 'c')]);
        m.apply(12, [(3, 'd')]);
        let (commit, pages) = m.clone().finish(1000);
        assert_eq!(commit, 12);
        assert_eq!(
            pages.into_iter().collect::<Vec<_>>(),
            vec![(3, Some('d')), (11, Some('b')), (12, Some('c'))]
        );
        // Shrink to 5, grow to 8 writing only page 8: 6 and 7 read as zeros now.
        m.apply(5, []);
        m.apply(8, [(8, 'e')]);
        let (commit, pages) = m.finish(7);
        assert_eq!(commit, 8);
        assert_eq!(
            pages.into_iter().collect::<Vec<_>>(),
            vec![(3, Some('d')), (6, None), (8, Some('e'))],
            "page 7 is the lock page here"
        );
    }

    #[test]
    fn unknown_prior_size_starts_the_floor_at_the_first_change() {
        let mut m = PageMerge::new(None);
        m.apply(4, [(4, 1)]);
        m.apply(6, [(6, 2)]);
        let (commit, pages) = m.finish(1000);
        assert_eq!(commit, 6);
        assert_eq!(
            pages.into_iter().collect::<Vec<_>>(),
            vec![(4, Some(1)), (5, None), (6, Some(2))]
        );
    }
}
