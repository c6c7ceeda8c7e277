//! What tests read of a running mount's observability: a scrape of `--metrics-addr`
//! (`/metrics`, OpenMetrics text) and `walfs status`. Shared by tests/metrics.rs and
//! tests/replica_isolation.rs.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{http, WALFS};

/// The samples of one scrape of `/metrics`: (name, labels as written, value).
pub struct Scrape(pub Vec<(String, String, f64)>);

impl Scrape {
    /// Scrapes `127.0.0.1:port/metrics`; panics unless it answers 200 with OpenMetrics
    /// text that ends with `# EOF`.
    pub fn take(port: u16) -> Scrape {
        let (status, head, body) = http(port, "GET", "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("openmetrics-text"),
            "{head}"
        );
        let text = String::from_utf8(body).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("bad sample {l:?}")),
                };
                (name.to_string(), labels.to_string(), value)
            })
            .collect();
        Scrape(samples)
    }

    /// The value of `name` whose labels contain every one of `labels` (`key="value"`).
    pub fn get(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.0
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|want| l.contains(want)))
            .map(|(_, _, v)| *v)
    }

    /// As [`Scrape::get`]; panics (showing the scrape) if there is no such sample.
    pub fn must(&self, name: &str, labels: &[&str]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape:\n{self}"))
    }
}

impl std::fmt::Display for Scrape {
    /// The replication series (not the FUSE histogram).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, l, v) in self
            .0
            .iter()
            .filter(|(n, _, _)| !n.starts_with("walfs_fuse"))
        {
            writeln!(f, "{n}{{{l}}} {v}")?;
        }
        Ok(())
    }
}

/// Scrapes until `ok` holds (or panics after `limit` with the last scrape).
pub fn wait_for(port: u16, limit: Duration, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let start = Instant::now();
    loop {
        let s = Scrape::take(port);
        if ok(&s) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; last scrape:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `walfs status MOUNTPOINT ARGS...`.
pub fn status(mountpoint: &Path, args: &[&str]) -> Output {
    Command::new(WALFS)
        .arg("status")
        .arg(mountpoint)
        .args(args)
        .output()
        .expect("run walfs status")
}

/// The JSON that `walfs status --json` printed; panics (showing its output) if none.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "walfs status printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
