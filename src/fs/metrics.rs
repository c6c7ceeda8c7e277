//! Per-operation counters of the FUSE layer: how many requests of each kind arrived, how
//! many failed, the time spent serving them, and how that time is distributed (a latency
//! histogram per operation, [`LATENCY_BUCKETS`]). Cheap enough for every request (relaxed
//! atomics, no lock), logged when the filesystem is unmounted and exported as metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

macro_rules! ops {
    ($($name:ident),* $(,)?) => {
        /// Every FUSE operation walfs serves.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Op { $($name),* }

        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$name),*];
            pub fn name(self) -> &'static str {
                match self { $(Op::$name => stringify!($name)),* }
            }
        }
    };
}

ops!(
    lookup,
    forget,
    getattr,
    setattr,
    readlink,
    mknod,
    mkdir,
    unlink,
    rmdir,
    symlink,
    rename,
    link,
    open,
    read,
    write,
    flush,
    release,
    fsync,
    opendir,
    readdir,
    releasedir,
    fsyncdir,
    statfs,
    setxattr,
    getxattr,
    listxattr,
    removexattr,
    create,
    fallocate,
    lseek,
    copy_file_range,
    ioctl,
);

const N: usize = Op::ALL.len();

/// The upper bounds of the latency histogram's buckets (a last bucket takes the rest).
pub const LATENCY_BUCKETS: [Duration; 11] = [
    Duration::from_micros(10),
    Duration::from_micros(50),
    Duration::from_micros(100),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
];

/// Bucket counts: one per bound of [`LATENCY_BUCKETS`], and one above the last.
const NB: usize = LATENCY_BUCKETS.len() + 1;

#[derive(Default)]
struct Counter {
    calls: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
    buckets: [AtomicU64; NB],
}

/// Counters for every operation.
pub struct Metrics {
    counters: [Counter; N],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            counters: std::array::from_fn(|_| Counter::default()),
        }
    }
}

/// One operation's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpTotals {
    pub op: Op,
    pub calls: u64,
    pub errors: u64,
    pub time: Duration,
}

impl Metrics {
    pub fn record(&self, op: Op, ok: bool, elapsed: Duration) {
        let c = &self.counters[op as usize];
        c.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| elapsed <= b)
            .unwrap_or(NB - 1);
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency histogram of every operation called at least once: per bucket of
    /// [`LATENCY_BUCKETS`] (and one more, unbounded), how many calls took that long; not
    /// cumulative.
    pub fn histograms(&self) -> Vec<(OpTotals, [u64; NB])> {
        self.totals()
            .into_iter()
            .map(|t| {
                let c = &self.counters[t.op as usize];
                (
                    t,
                    std::array::from_fn(|i| c.buckets[i].load(Ordering::Relaxed)),
                )
            })
            .collect()
    }

    /// Totals of every operation that was called at least once.
    pub fn totals(&self) -> Vec<OpTotals> {
        Op::ALL
            .iter()
            .map(|&op| {
                let c = &self.counters[op as usize];
                OpTotals {
                    op,
                    calls: c.calls.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    time: Duration::from_nanos(c.nanos.load(Ordering::Relaxed)),
                }
            })
            .filter(|t| t.calls > 0)
            .collect()
    }

    /// One line: `lookup=12/3us getattr=40/2us(2 err) ...`: calls, mean time in walfs,
    /// and errors.
    pub fn summary(&self) -> String {
        self.totals()
            .iter()
            .map(|t| {
                let mean_us = t.time.as_micros() as u64 / t.calls.max(1);
                let errors = if t.errors > 0 {
                    format!("({} err)", t.errors)
                } else {
                    String::new()
                };
                format!("{}={}/{mean_us}us{errors}", t.op.name(), t.calls)
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_call_once() {
        let m = Metrics::default();
        m.record(Op::read, true, Duration::from_micros(5));
        m.record(Op::read, true, Duration::from_micros(10));
        m.record(Op::read, false, Duration::from_millis(2));
        m.record(Op::read, true, Duration::from_secs(3));
        let h = m.histograms();
        assert_eq!(h.len(), 1);
        let (t, b) = h[0];
        assert_eq!((t.op, t.calls, t.errors), (Op::read, 4, 1));
        assert_eq!(b[0], 2, "<= 10us");
        assert_eq!(b[5], 1, "<= 5ms");
        assert_eq!(b[NB - 1], 1, "above 1s");
        assert_eq!(b.iter().sum::<u64>(), 4);
    }
}
