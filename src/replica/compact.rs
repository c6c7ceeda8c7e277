//! Compaction: which LTX objects merge into one, and the merge itself. Pure planning over
//! object ranges ([`compaction_runs`], [`snapshot_chain`]) plus [`merge_ltx`], which
//! streams any number of local LTX files (the oldest first, a snapshot possibly first) into
//! one, page by page, holding one page per input in memory.
//!
//! Compacting level `k` merges the objects of level `k - 1` that are newer than level `k`'s
//! last object into one object covering TXIDs `min..=max` of its inputs (Litestream 0.5's
//! rule). A snapshot (level 9) is the previous snapshot merged with the chain of objects
//! after it. The merged file's timestamp is its last input's, the commit time of its max
//! TXID, so that point-in-time restore never takes a state committed after the moment
//! asked for.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

use super::error::{ReplicaError, ReplicaResult};
use crate::ltx::{LtxDecoder, LtxEncoder, LtxError, LtxHeader};

/// One LTX object, by level and TXID range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjId {
    pub level: u8,
    pub min: u64,
    pub max: u64,
}

impl ObjId {
    pub fn new(level: u8, min: u64, max: u64) -> ObjId {
        ObjId { level, min, max }
    }
}

/// The runs of `below` (objects of the level below, any order) to compact into one object
/// each: from `done` (the last max TXID the level already holds), the chain of objects that
/// reach furthest at each step ([`chain_from`]), split where the TXIDs do not continue (a
/// gap that a snapshot bridged). An object that the chain already covers is left out: with
/// binary-counter objects below ([`absorbed_by_next`]) a run takes the few large ones.
pub fn compaction_runs(below: &[ObjId], done: u64) -> Vec<Vec<ObjId>> {
    let objs: Vec<ObjId> = below.iter().copied().filter(|o| o.max > done).collect();
    let mut runs: Vec<Vec<ObjId>> = Vec::new();
    let mut at = done;
    loop {
        let run = chain_from(&objs, at);
        if let Some(last) = run.last() {
            at = last.max;
            runs.push(run);
            continue;
        }
        // A gap: the next run starts at the lowest TXID still ahead.
        match objs.iter().filter(|o| o.max > at).map(|o| o.min).min() {
            Some(min) => at = min - 1,
            None => return runs,
        }
    }
}

/// The chain of `objs` (any levels, any order) from TXID `from`: each step takes the object
/// applicable at the current TXID (`min <= at + 1 < max + 1`) that reaches furthest, the
/// higher level on a tie. Stops at a gap. Taking the furthest reach is optimal: any object
/// applicable after a shorter step is applicable after the longest one too.
pub fn chain_from(objs: &[ObjId], from: u64) -> Vec<ObjId> {
    let mut chain = Vec::new();
    let mut at = from;
    loop {
        let next = objs
            .iter()
            .filter(|o| o.min <= at + 1 && o.max > at)
            .max_by_key(|o| (o.max, o.level, std::cmp::Reverse(o.min)));
        match next {
            Some(o) => {
                chain.push(*o);
                at = o.max;
            }
            None => return chain,
        }
    }
}

/// The objects (levels 0 to 8, any order) that bring a database from `from` (a snapshot's
/// max TXID) as far as they reach. Stops at a gap.
pub fn snapshot_chain(objs: &[ObjId], from: u64) -> Vec<ObjId> {
    let below: Vec<ObjId> = objs.iter().copied().filter(|o| o.level < 9).collect();
    chain_from(&below, from)
}

/// Which objects of one level the next object written at that level absorbs (oldest first),
/// so that every level is a binary counter within its window and a restore needs few objects.
///
/// A level's *window* is the objects it holds that end after `window_start`, the highest
/// TXID that a higher level (or a snapshot) covers (the first may start below it: a
/// history's first object overlaps the snapshot taken of it); each write at the level (an
/// upload at level 0, a compaction above) is one *tick* of it. Written plainly, the `n`-th
/// tick's object covers that tick alone and reaching tick `n` takes `n` objects
/// (Litestream's layout: up to 29 level-0, 9 level-1, 11 level-2 and 23 level-3 objects
/// with the default intervals). Here the object of tick `n` also covers the `lowbit(n) -
/// 1` ticks before it (a Fenwick tree): it merges the newest objects of the window's chain
/// while their tick counts are 1, 2, 4, ..., so the chain from `window_start` to tick `n`
/// is `popcount(n)` objects, and each tick's pages are uploaded about `log2(ticks per
/// window) / 2` more times.
///
/// `level` holds the level's objects that have bytes (the local copies); `ticked` the
/// level's objects whose copies were dropped because a larger object of the level covers
/// them ([`covered_at_level`]; only their tick is remembered). Together they are every
/// object of the window, for counting ticks; the chain is taken from `level` alone (a
/// covered object never is the furthest reach while its cover is kept). `ends_at` is
/// where the chain must end for the new object to continue it (the TXID before the new
/// tick's first). A chain that does not end there (a missing copy, an overlap after a
/// race with the level above) absorbs nothing: the new object is then one tick, which is
/// always correct, only less compact.
pub fn absorbed_by_next(
    level: &[ObjId],
    ticked: &[ObjId],
    window_start: u64,
    ends_at: u64,
) -> Vec<ObjId> {
    let in_window = |o: &&ObjId| o.max > window_start && o.max <= ends_at;
    let with_bytes: Vec<ObjId> = level.iter().filter(in_window).copied().collect();
    let mut window: Vec<ObjId> = with_bytes.clone();
    window.extend(ticked.iter().filter(in_window).copied());
    window.sort();
    window.dedup();
    let chain = chain_from(&with_bytes, window_start);
    if chain.last().map(|o| o.max) != Some(ends_at) {
        return Vec::new();
    }
    // Every tick wrote one object ending at the tick's last TXID, so an object spans as
    // many ticks as the window holds objects ending inside it.
    let ticks = |n: &ObjId| {
        window
            .iter()
            .filter(|w| n.min <= w.max && w.max <= n.max)
            .count()
    };
    let mut want = 1;
    let mut take = 0;
    for o in chain.iter().rev() {
        if ticks(o) != want {
            break;
        }
        take += 1;
        want *= 2;
    }
    chain[chain.len() - take..].to_vec()
}

/// The inputs, oldest first, of each object that compacting level `k` writes now, given the
/// local copies `local` (all levels) and `done`, the highest TXID level `k` holds. The
/// first object continues the level's binary counter ([`absorbed_by_next`]): it starts
/// with the level-`k` objects it absorbs, then the run of level `k - 1`.
///
/// `ticked` holds the objects (any levels) whose copies were dropped, covered by a larger
/// one of their level, and only count ticks ([`absorbed_by_next`]).
pub fn compaction_inputs(local: &[ObjId], ticked: &[ObjId], k: u8, done: u64) -> Vec<Vec<ObjId>> {
    let below: Vec<ObjId> = local
        .iter()
        .copied()
        .filter(|o| o.level == k - 1 && !superseded_by_snapshot(local, o))
        .collect();
    let mut runs = compaction_runs(&below, done);
    if let Some(first) = runs.first_mut() {
        let at_k: Vec<ObjId> = local.iter().copied().filter(|o| o.level == k).collect();
        let ticked_k: Vec<ObjId> = ticked.iter().copied().filter(|o| o.level == k).collect();
        let mut absorbed = absorbed_by_next(&at_k, &ticked_k, window_start(local, k), done);
        if !absorbed.is_empty() && first[0].min <= done + 1 {
            absorbed.append(first);
            *first = absorbed;
        }
    }
    runs
}

/// Whether `o` (levels 0 to 8) is a whole database image (its min TXID is 1: a history's
/// first upload) that a local snapshot reaching as far supersedes: compacting it would
/// only write an object that retention deletes at once.
pub fn superseded_by_snapshot(local: &[ObjId], o: &ObjId) -> bool {
    o.level < 9
        && o.min == 1
        && local
            .iter()
            .any(|s| s.level == 9 && s.min == 1 && s.max >= o.max)
}

/// Where level `k`'s window starts: the highest TXID held at a level above it (snapshots
/// included), 0 if none.
pub fn window_start(local: &[ObjId], k: u8) -> u64 {
    local
        .iter()
        .filter(|o| o.level > k)
        .map(|o| o.max)
        .max()
        .unwrap_or(0)
}

/// The objects of `local` whose bytes `written` holds at its own level: the objects of
/// its level that it covers (`written.min <= min` and `max < written.max`), such as the
/// ones a binary-counter object absorbed ([`absorbed_by_next`]). Their copies can go:
/// wherever one of them is applicable, `written` is too and reaches further, so no chain
/// (compaction, snapshot, the binary counter's) takes them while `written` is kept; only
/// their ticks must still be counted.
pub fn covered_at_level(local: &[ObjId], written: ObjId) -> Vec<ObjId> {
    local
        .iter()
        .copied()
        .filter(|o| o.level == written.level && written.min <= o.min && o.max < written.max)
        .collect()
}

/// The local copies that are no longer needed once `written` (level `k`, compacted from
/// level `k - 1`) is kept: the level-`k - 1` objects up to its max TXID, whose window is
/// over (level `k` now covers them).
pub fn compacted_away(local: &[ObjId], written: ObjId) -> Vec<ObjId> {
    local
        .iter()
        .copied()
        .filter(|o| o.level + 1 == written.level && o.max <= written.max)
        .collect()
}

fn ltx_io(path: &Path, e: LtxError) -> ReplicaError {
    ReplicaError::LtxFile {
        path: path.to_path_buf(),
        error: e,
    }
}

/// How much more of a consumed input is read before the read part is freed.
const FREE_EVERY: u64 = 1 << 20;

/// One input of a merge: its decoder and the page it stands at.
struct Input {
    dec: LtxDecoder<File>,
    /// The next page: its number (`None` at the end) and content in `buf`.
    pgno: Option<u32>,
    buf: Vec<u8>,
    /// The smallest commit size of the inputs after this one: pages above it were cut off.
    survives_to: u32,
    /// An input the merge consumes: its file, and how much of it is freed.
    consume: Option<(File, u64)>,
}

impl Input {
    /// Frees what the merge has read of a consumed input, once it is [`FREE_EVERY`] more
    /// than was freed: its blocks are punched out of the file (the file keeps its size).
    /// A file system that cannot punch holes leaves the input whole.
    fn free_read(&mut self, path: &Path) {
        let Some((file, freed)) = &mut self.consume else {
            return;
        };
        let upto = self.dec.consumed() & !4095;
        if upto < *freed + FREE_EVERY {
            return;
        }
        use nix::fcntl::{fallocate, FallocateFlags};
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&*file, mode, *freed as i64, (upto - *freed) as i64) {
            Ok(()) => *freed = upto,
            Err(e) => {
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(file = %path.display(), "cannot free a merged input as it is read ({e}): while a large database's copies merge, staging holds them twice (logged once)");
                }
                self.consume = None;
            }
        }
    }
}

/// Merges the LTX files `inputs` (oldest first; each continues the one before) into one
/// LTX file at `out`: per page the newest version, the last commit size, zero pages where
/// applying them one by one would leave zeros (the database shrank and grew back), TXIDs
/// from the first input's min to the last's max, the last input's timestamp. With
/// `snapshot`, the first input must be a snapshot and the result is one (min TXID 1).
/// Every input is verified (its file checksum) before the result is kept. Pages keep the
/// LZ4 blocks their input stores (no second compression). Returns the header written.
pub fn merge_ltx(inputs: &[&Path], out: &Path, snapshot: bool) -> ReplicaResult<LtxHeader> {
    merge_ltx_consuming(inputs, &vec![false; inputs.len()], out, snapshot)
}

/// [`merge_ltx`], freeing the inputs marked in `consume` as it reads them (each MiB read
/// is punched out of the file, which keeps its size), so that the merge
/// never holds its inputs and its output on disk in full at once: a compaction of a large
/// database would otherwise need twice its size. Whatever the result, a consumed input
/// that was freed is no longer a valid LTX file (its header is zeros, which a restart's
/// [`super::kept::KeptCopies::kept`] drops, and which fails the checksum of any other
/// reader): the caller drops it. An input with more than one link (a staged snapshot
/// hard-linked into the copies) is never consumed: it would be freed under its other name
/// too.
pub fn merge_ltx_consuming(
    inputs: &[&Path],
    consume: &[bool],
    out: &Path,
    snapshot: bool,
) -> ReplicaResult<LtxHeader> {
    use std::os::unix::fs::MetadataExt;
    if inputs.is_empty() {
        return Err(ReplicaError::Invalid("nothing to merge".into()));
    }
    let mut decs = Vec::with_capacity(inputs.len());
    let mut consumed = Vec::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let f = File::open(p)?;
        let own = consume.get(i).copied().unwrap_or(false) && f.metadata()?.nlink() == 1;
        // Punching holes needs the file open for writing.
        let freer = if own {
            Some((File::options().write(true).open(p)?, 0))
        } else {
            None
        };
        consumed.push(freer);
        decs.push(LtxDecoder::new(f).map_err(|e| ltx_io(p, e))?);
    }
    let first = *decs[0].header();
    let last = *decs[decs.len() - 1].header();
    let page_size = first.page_size;
    if let Some(i) = decs.iter().position(|d| d.header().page_size != page_size) {
        return Err(ReplicaError::Invalid(format!(
            "{}: page size {} differs from {} in {}",
            inputs[i].display(),
            decs[i].header().page_size,
            page_size,
            inputs[0].display()
        )));
    }
    if snapshot && !first.is_snapshot() {
        return Err(ReplicaError::Invalid(format!(
            "{} is not a snapshot",
            inputs[0].display()
        )));
    }
    let commits: Vec<u32> = decs.iter().map(|d| d.header().commit).collect();
    let floor = commits.iter().copied().min().unwrap_or(0);
    let commit = last.commit;
    let mut ins: Vec<Input> = Vec::with_capacity(decs.len());
    for (i, (dec, consume)) in decs.into_iter().zip(consumed).enumerate() {
        let survives_to = commits[i + 1..].iter().copied().min().unwrap_or(u32::MAX);
        ins.push(Input {
            dec,
            pgno: None,
            buf: vec![0u8; page_size as usize],
            survives_to,
            consume,
        });
    }
    for (i, input) in ins.iter_mut().enumerate() {
        input.pgno = input
            .dec
            .read_page(&mut input.buf)
            .map_err(|e| ltx_io(inputs[i], e))?;
    }
    let header = if snapshot {
        LtxHeader::snapshot(page_size, commit, last.max_txid, last.timestamp_ms)
    } else {
        LtxHeader::incremental(
            page_size,
            commit,
            first.min_txid,
            last.max_txid,
            last.timestamp_ms,
            0,
        )
    }
    .without_checksums();
    let lock = header.lock_pgno();
    let tmp = out.with_extension("ltx.tmp");
    let res = (|| -> ReplicaResult<()> {
        let w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let mut enc = LtxEncoder::new(w, header).map_err(|e| ltx_io(out, e))?;
        let zero = vec![0u8; page_size as usize];
        loop {
            let next = ins.iter().filter_map(|i| i.pgno).min();
            let zero_from = floor.saturating_add(1);
            // The next page number to consider: an input's, or a zero page of the range
            // that applying the inputs in order leaves zeroed.
            let Some(pgno) = next else { break };
            // Zero pages below `pgno` that no input holds.
            for z in zero_from.max(enc_prev(&enc))..pgno.min(commit.saturating_add(1)) {
                if z != lock && z > floor {
                    enc.add_page(z, &zero).map_err(|e| ltx_io(out, e))?;
                }
            }
            let mut winner: Option<usize> = None;
            for (i, input) in ins.iter().enumerate() {
                if input.pgno == Some(pgno) && pgno <= input.survives_to {
                    winner = Some(i);
                }
            }
            if pgno <= commit && pgno != lock {
                match winner {
                    // The winner's stored LZ4 block, not a second compression.
                    Some(i) => match ins[i].dec.last_block() {
                        Some(block) => enc.add_page_with_block(pgno, &ins[i].buf, block),
                        None => enc.add_page(pgno, &ins[i].buf),
                    },
                    None if pgno > floor => enc.add_page(pgno, &zero),
                    None => Ok(()),
                }
                .map_err(|e| ltx_io(out, e))?;
            }
            for (i, input) in ins.iter_mut().enumerate() {
                if input.pgno == Some(pgno) {
                    input.pgno = input
                        .dec
                        .read_page(&mut input.buf)
                        .map_err(|e| ltx_io(inputs[i], e))?;
                    input.free_read(inputs[i]);
                }
            }
        }
        for z in floor.saturating_add(1).max(enc_prev(&enc))..=commit {
            if z != lock {
                enc.add_page(z, &zero).map_err(|e| ltx_io(out, e))?;
            }
        }
        for (i, input) in ins.iter_mut().enumerate() {
            input.dec.finish().map_err(|e| ltx_io(inputs[i], e))?;
        }
        enc.finish(0).map_err(|e| ltx_io(out, e))?;
        let file = enc.into_inner().into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, out)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|()| header)
}

/// The first page number the encoder may still take (one past the last written).
fn enc_prev<W: io::Write>(enc: &LtxEncoder<W>) -> u32 {
    enc.index().last().map_or(1, |e| e.pgno + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::decode;

    fn o(level: u8, min: u64, max: u64) -> ObjId {
        ObjId::new(level, min, max)
    }

    #[test]
    fn runs_take_what_is_newer_and_split_at_gaps() {
        let below = [
            o(0, 1, 3),
            o(0, 4, 4),
            o(0, 5, 9),
            o(0, 12, 15),
            o(0, 16, 16),
        ];
        assert_eq!(
            compaction_runs(&below, 4),
            vec![vec![o(0, 5, 9)], vec![o(0, 12, 15), o(0, 16, 16)]]
        );
        assert_eq!(compaction_runs(&below, 16), Vec::<Vec<ObjId>>::new());
        assert_eq!(
            compaction_runs(&below, 0)[0],
            vec![o(0, 1, 3), o(0, 4, 4), o(0, 5, 9)]
        );
        // An object inside the previous one adds nothing.
        assert_eq!(
            compaction_runs(&[o(1, 1, 10), o(1, 3, 5), o(1, 11, 12)], 0),
            vec![vec![o(1, 1, 10), o(1, 11, 12)]]
        );
    }

    #[test]
    fn each_level_is_a_binary_counter_within_its_window() {
        // Level 0 after a snapshot at TXID 10, one TXID per tick.
        let mut local = vec![o(9, 1, 10)];
        for t in 11..=18u64 {
            let l0: Vec<ObjId> = local.iter().copied().filter(|x| x.level == 0).collect();
            let absorbed = absorbed_by_next(&l0, &[], window_start(&local, 0), t - 1);
            let min = absorbed.first().map_or(t, |a| a.min);
            local.push(o(0, min, t));
        }
        let l0: Vec<ObjId> = local.iter().copied().filter(|x| x.level == 0).collect();
        assert_eq!(
            l0,
            vec![
                o(0, 11, 11),
                o(0, 11, 12),
                o(0, 13, 13),
                o(0, 11, 14),
                o(0, 15, 15),
                o(0, 15, 16),
                o(0, 17, 17),
                o(0, 11, 18)
            ]
        );
        // The chain to tick n is popcount(n) objects.
        assert_eq!(
            chain_from(&l0[..7], 10),
            vec![o(0, 11, 14), o(0, 15, 16), o(0, 17, 17)]
        );
        assert_eq!(chain_from(&l0, 10), vec![o(0, 11, 18)]);

        // Level 1 compacts the chain; its first object starts a new level-0 window.
        let inputs = compaction_inputs(&local, &[], 1, 0);
        assert_eq!(inputs, vec![vec![o(0, 11, 18)]]);
        local.push(o(1, 11, 18));
        let gone = compacted_away(&local, o(1, 11, 18));
        assert_eq!(gone.len(), 8);
        local.retain(|x| !gone.contains(x));
        assert_eq!(window_start(&local, 0), 18);
        let l0: Vec<ObjId> = local.iter().copied().filter(|x| x.level == 0).collect();
        assert!(absorbed_by_next(&l0, &[], 18, 18).is_empty());
        // The second level-1 compaction absorbs the first.
        local.push(o(0, 19, 19));
        local.push(o(0, 19, 20));
        assert_eq!(
            compaction_inputs(&local, &[], 1, 18),
            vec![vec![o(1, 11, 18), o(0, 19, 20)]]
        );
    }

    #[test]
    fn covered_copies_go_and_the_counter_counts_their_ticks() {
        // The same counter as above, keeping only the copies no object of the level
        // covers (the others become ticks): it writes the same objects, and the copies
        // kept are the chain alone, popcount(n) non-overlapping objects.
        let mut plain = vec![o(9, 1, 10)];
        let mut local = vec![o(9, 1, 10)];
        let mut ticked: Vec<ObjId> = Vec::new();
        for t in 11..=74u64 {
            let l0 = |v: &[ObjId]| -> Vec<ObjId> {
                v.iter().copied().filter(|x| x.level == 0).collect()
            };
            let a = absorbed_by_next(&l0(&plain), &[], 10, t - 1);
            let b = absorbed_by_next(&l0(&local), &ticked, 10, t - 1);
            assert_eq!(a, b, "tick {t}");
            let new = o(0, a.first().map_or(t, |x| x.min), t);
            plain.push(new);
            local.push(new);
            for c in covered_at_level(&local, new) {
                local.retain(|x| *x != c);
                ticked.push(c);
            }
            let kept = l0(&local);
            let n = t - 10;
            assert_eq!(kept.len() as u32, n.count_ones(), "tick {t}: {kept:?}");
            assert_eq!(chain_from(&kept, 10), kept);
            assert_eq!(chain_from(&kept, 10), chain_from(&l0(&plain), 10));
            assert_eq!(
                compaction_inputs(&local, &ticked, 1, 0),
                compaction_inputs(&plain, &[], 1, 0)
            );
        }
        // Ticks are counted at their own level only.
        assert!(covered_at_level(&[o(0, 11, 12), o(1, 11, 18)], o(1, 11, 18)).is_empty());
    }

    #[test]
    fn a_first_upload_that_a_snapshot_repeats_is_not_compacted() {
        let local = [o(9, 1, 2), o(0, 1, 2), o(0, 3, 4)];
        assert_eq!(compaction_inputs(&local, &[], 1, 0), vec![vec![o(0, 3, 4)]]);
        // Reaching past the snapshot, it is the history's base and is compacted.
        let local = [o(9, 1, 2), o(0, 1, 5)];
        assert_eq!(compaction_inputs(&local, &[], 1, 0), vec![vec![o(0, 1, 5)]]);
    }

    #[test]
    fn a_chain_that_does_not_end_where_the_next_object_starts_absorbs_nothing() {
        let l0 = [o(0, 11, 11), o(0, 12, 12)];
        assert_eq!(absorbed_by_next(&l0, &[], 10, 12), vec![o(0, 12, 12)]);
        // A missing copy: the tick ending at 13 was never kept.
        assert!(absorbed_by_next(&l0, &[], 10, 13).is_empty());
        // A chain ending short of where the next object starts.
        assert!(absorbed_by_next(&[o(0, 11, 12)], &[], 10, 14).is_empty());
    }

    #[test]
    fn chain_takes_the_furthest_reach() {
        let objs = [
            o(0, 11, 11),
            o(0, 12, 12),
            o(1, 11, 12),
            o(2, 8, 14),
            o(0, 15, 15),
            o(1, 15, 17),
            o(0, 20, 20),
        ];
        assert_eq!(
            snapshot_chain(&objs, 10),
            vec![o(2, 8, 14), o(1, 15, 17)],
            "stops at the gap after 17"
        );
        assert_eq!(snapshot_chain(&objs, 20), Vec::<ObjId>::new());
    }

    fn write_ltx(path: &Path, h: LtxHeader, pages: &[(u32, u8)]) {
        let mut enc = LtxEncoder::new(File::create(path).unwrap(), h.without_checksums()).unwrap();
        for &(p, b) in pages {
            enc.add_page(p, &vec![b; h.page_size as usize]).unwrap();
        }
        enc.finish(0).unwrap();
    }

    fn pages_of(path: &Path) -> (LtxHeader, Vec<(u32, u8)>) {
        let f = decode(File::open(path).unwrap()).unwrap();
        (
            f.header,
            f.pages
                .iter()
                .map(|p| {
                    assert!(p.data.iter().all(|&b| b == p.data[0]));
                    (p.pgno, p.data[0])
                })
                .collect(),
        )
    }

    #[test]
    fn merge_keeps_the_newest_page_truncates_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        write_ltx(
            &p("a"),
            LtxHeader::incremental(512, 6, 5, 6, 1000, 0),
            &[(2, 1), (5, 1), (6, 1)],
        );
        // Shrinks to 3 pages.
        write_ltx(
            &p("b"),
            LtxHeader::incremental(512, 3, 7, 7, 2000, 0),
            &[(3, 2)],
        );
        // Grows to 5 writing only page 5: page 4 reads as zeros.
        write_ltx(
            &p("c"),
            LtxHeader::incremental(512, 5, 8, 9, 3000, 0),
            &[(1, 3), (5, 3)],
        );
        let out = p("out");
        let h = merge_ltx(&[&p("a"), &p("b"), &p("c")], &out, false).unwrap();
        assert_eq!(
            (h.min_txid, h.max_txid, h.commit, h.timestamp_ms),
            (5, 9, 5, 3000)
        );
        let (dh, pages) = pages_of(&out);
        assert_eq!(dh, h);
        assert_eq!(pages, vec![(1, 3), (2, 1), (3, 2), (4, 0), (5, 3)]);
        // Copying the inputs' LZ4 blocks gives the very file a fresh encoding would.
        write_ltx(&p("fresh"), h, &pages);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(p("fresh")).unwrap()
        );

        // A snapshot first: the result is a snapshot with every page.
        write_ltx(
            &p("s"),
            LtxHeader::snapshot(512, 4, 4, 500),
            &[(1, 9), (2, 9), (3, 9), (4, 9)],
        );
        let h = merge_ltx(&[&p("s"), &p("a"), &p("b"), &p("c")], &out, true).unwrap();
        assert_eq!((h.min_txid, h.max_txid, h.commit), (1, 9, 5));
        assert_eq!(
            pages_of(&out).1,
            vec![(1, 3), (2, 1), (3, 2), (4, 0), (5, 3)]
        );
    }

    /// A page of `n` bytes that LZ4 cannot shrink, different for each `seed`.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn write_noise(path: &Path, h: LtxHeader, pages: impl Iterator<Item = (u32, u64)>) {
        let mut enc = LtxEncoder::new(File::create(path).unwrap(), h.without_checksums()).unwrap();
        for (p, seed) in pages {
            enc.add_page(p, &noise(seed, h.page_size as usize)).unwrap();
        }
        enc.finish(0).unwrap();
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_consuming_merge_frees_its_inputs_as_it_reads_them_but_never_a_linked_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // 12 MiB of pages, then a small later object rewriting the first ten.
        let big = LtxHeader::incremental(4096, 3000, 2, 2, 1000, 0);
        write_noise(&p("a"), big, (1..=3000).map(|n| (n, n as u64)));
        let small = LtxHeader::incremental(4096, 3000, 3, 3, 2000, 0);
        write_noise(&p("b"), small, (1..=10).map(|n| (n, 10_000 + n as u64)));
        let expect: Vec<(u32, u64)> = (1..=10)
            .map(|n| (n, 10_000 + n as u64))
            .chain((11..=3000).map(|n| (n, n as u64)))
            .collect();
        write_noise(
            &p("fresh"),
            LtxHeader::incremental(4096, 3000, 2, 3, 2000, 0),
            expect.iter().copied(),
        );
        let size = std::fs::metadata(p("a")).unwrap().len();
        assert!(allocated(&p("a")) >= size, "{}", allocated(&p("a")));

        let out = p("out");
        merge_ltx_consuming(&[&p("a"), &p("b")], &[true, true], &out, false).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(p("fresh")).unwrap()
        );
        // All but the last FREE_EVERY of the large input is freed; the file keeps its
        // size, and its header is gone.
        assert!(
            allocated(&p("a")) <= FREE_EVERY + 65536,
            "{} of {size} bytes still allocated",
            allocated(&p("a"))
        );
        assert_eq!(std::fs::metadata(p("a")).unwrap().len(), size);
        assert!(LtxDecoder::new(File::open(p("a")).unwrap()).is_err());

        // A copy hard-linked elsewhere (a staged snapshot) is never freed.
        write_noise(&p("c"), big, (1..=3000).map(|n| (n, n as u64)));
        std::fs::hard_link(p("c"), p("c-staged")).unwrap();
        merge_ltx_consuming(&[&p("c"), &p("b")], &[true, true], &out, false).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(p("fresh")).unwrap()
        );
        assert!(allocated(&p("c")) >= size);
        assert_eq!(pages_count(&p("c-staged")), 3000);
    }

    fn pages_count(path: &Path) -> usize {
        decode(File::open(path).unwrap()).unwrap().pages.len()
    }

    #[test]
    fn merge_refuses_a_corrupt_input_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        write_ltx(
            &a,
            LtxHeader::incremental(512, 2, 1, 1, 1, 0),
            &[(1, 1), (2, 1)],
        );
        let mut bytes = std::fs::read(&a).unwrap();
        let n = bytes.len();
        bytes[n - 20] ^= 0xff;
        std::fs::write(&a, bytes).unwrap();
        let out = dir.path().join("out.ltx");
        assert!(merge_ltx(&[&a], &out, false).is_err());
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
