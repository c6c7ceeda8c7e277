//! Per-operation counters of the FUSE layer: how many requests of each kind arrived, how
//! many failed, and the time spent serving them. Cheap enough for every request (relaxed
//! atomics), and logged when the filesystem is unmounted.

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

#[derive(Default)]
struct Counter {
    calls: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
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
