//! The Prometheus endpoint of `--metrics-addr`: a collector that reads the mount's state at
//! each scrape ([`super::MountView`], the counters of the FUSE layer, capture, uploads and
//! maintenance, the process's RSS) and a small HTTP server (`tiny_http`) that answers
//! `GET /metrics` in the text format (`prometheus-client`'s encoder). docs/OPERATIONS.md
//! lists every series.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::MountView;
use crate::capture::RestartKind;
use crate::fs::metrics::LATENCY_BUCKETS;

/// The content type of the text format `prometheus-client` writes (OpenMetrics 1.0).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound, not yet serving, metrics endpoint: binding comes first, so that a bad address
/// or a port in use stops `walfs mount` before anything is mounted.
pub struct MetricsEndpoint {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
}

/// A serving metrics endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Binds `addr` (HOST:PORT). The error is one line that says what to do.
    pub fn bind(addr: &str) -> Result<MetricsEndpoint, String> {
        let resolved = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                format!("--metrics-addr {addr:?} is not a HOST:PORT address; give one such as 127.0.0.1:9090")
            })?;
        let server = tiny_http::Server::http(resolved).map_err(|e| {
            format!("cannot serve metrics on {addr}: {e}; give a free address with --metrics-addr")
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(resolved);
        Ok(MetricsEndpoint {
            server: Arc::new(server),
            addr,
        })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` from `view` on a thread of its own.
    pub fn serve(self, view: MountView) -> std::io::Result<MetricsServer> {
        self.serve_collector(Box::new(MountCollector(view)))
    }

    /// Serves `GET /metrics` from `collector` (a mount's, or a follower's) on a thread of
    /// its own.
    pub fn serve_collector(
        self,
        collector: Box<dyn prometheus_client::collector::Collector>,
    ) -> std::io::Result<MetricsServer> {
        let mut registry = Registry::default();
        registry.register_collector(collector);
        let server = self.server.clone();
        let thread = std::thread::Builder::new()
            .name("walfs-metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let response = if req.url() == "/metrics" || req.url().starts_with("/metrics?")
                    {
                        let mut body = String::new();
                        match prometheus_client::encoding::text::encode(&mut body, &registry) {
                            Ok(()) => tiny_http::Response::from_string(body).with_header(
                                tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE)
                                    .expect("a valid header"),
                            ),
                            Err(_) => tiny_http::Response::from_string("encoding failed\n")
                                .with_status_code(500),
                        }
                    } else {
                        tiny_http::Response::from_string("walfs: metrics are at /metrics\n")
                            .with_status_code(404)
                    };
                    let _ = req.respond(response);
                }
            })?;
        tracing::info!(addr = %self.addr, "metrics at /metrics");
        Ok(MetricsServer {
            server: self.server,
            thread: Some(thread),
        })
    }
}

impl MetricsServer {
    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads the mount's state at each scrape.
struct MountCollector(MountView);

impl std::fmt::Debug for MountCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountCollector")
    }
}

/// One metric family: a descriptor and its samples, each with its labels.
pub(crate) fn family<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, V)>,
) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeGaugeValue
        + prometheus_client::encoding::EncodeCounterValue,
{
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    let sample = |s: &mut MetricEncoder, v: &V| match kind {
        MetricType::Counter => s.encode_counter::<NoLabelSet, V, f64>(v, None),
        _ => s.encode_gauge(v),
    };
    for (labels, v) in samples {
        if labels.is_empty() {
            sample(&mut m, &v)?;
        } else {
            sample(&mut m.encode_family(&labels)?, &v)?;
        }
    }
    Ok(())
}

/// The resident set size of this process in bytes, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

impl prometheus_client::collector::Collector for MountCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let view = &self.0;
        let status = view.status();
        let db = |d: &super::DatabaseStatus| ("db", d.path.to_string_lossy().into_owned());
        family(
            &mut enc,
            "walfs_database_txid",
            "The last TXID captured of each database.",
            Gauge,
            status.databases.iter().map(|d| (vec![db(d)], d.txid)),
        )?;
        let per_replica = |f: fn(&super::ReplicaStatus) -> f64| {
            status
                .databases
                .iter()
                .flat_map(move |d| {
                    d.replicas
                        .iter()
                        .map(move |r| (vec![db(d), ("replica", r.replica.clone())], f(r)))
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "walfs_replica_txid",
            "The last TXID each replica holds of each database.",
            Gauge,
            per_replica(|r| r.txid as f64),
        )?;
        family(
            &mut enc,
            "walfs_replication_lag_seconds",
            "Age of the oldest commit a replica does not hold yet; 0 when it holds every commit.",
            Gauge,
            per_replica(|r| r.lag_seconds),
        )?;
        family(
            &mut enc,
            "walfs_pending_bytes",
            "Bytes staged for each database that wait for upload.",
            Gauge,
            status
                .databases
                .iter()
                .map(|d| (vec![db(d)], d.pending_bytes)),
        )?;
        family(
            &mut enc,
            "walfs_staging_bytes",
            "Bytes of every file in the staging directory.",
            Gauge,
            [(vec![], status.staging_bytes)],
        )?;
        if let Some(r) = &view.replication {
            let progress = r.fanout.progress();
            let names = progress.names();
            let counter = |f: fn(&crate::replica::progress::ReplicaCounters) -> u64| {
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (vec![("replica", n.clone())], f(progress.counters(i))))
                    .collect::<Vec<_>>()
            };
            family(
                &mut enc,
                "walfs_uploads",
                "Objects uploaded to each replica.",
                Counter,
                counter(|c| c.uploads.load(Ordering::Relaxed)),
            )?;
            family(
                &mut enc,
                "walfs_upload_errors",
                "Failed uploads of a database to each replica.",
                Counter,
                counter(|c| c.upload_errors.load(Ordering::Relaxed)),
            )?;
            family(
                &mut enc,
                "walfs_upload_bytes",
                "Bytes uploaded to each replica.",
                Counter,
                counter(|c| c.upload_bytes.load(Ordering::Relaxed)),
            )?;
            type Stat = fn(&crate::replica::maintain::MaintenanceStats) -> &AtomicU64;
            let maintained: [(&str, &str, Stat); 3] = [
                (
                    "walfs_compactions",
                    "Compactions uploaded to each replica.",
                    |m| &m.compactions,
                ),
                (
                    "walfs_snapshots",
                    "Snapshots uploaded to each replica.",
                    |m| &m.snapshots,
                ),
                (
                    "walfs_retention_deletions",
                    "Objects deleted from each replica by retention.",
                    |m| &m.retention_deletions,
                ),
            ];
            for (name, help, stat) in maintained {
                family(
                    &mut enc,
                    name,
                    help,
                    Counter,
                    names
                        .iter()
                        .zip(&r.maintainers)
                        .map(|(n, m)| {
                            (
                                vec![("replica", n.clone())],
                                stat(m.stats()).load(Ordering::Relaxed),
                            )
                        })
                        .collect::<Vec<_>>(),
                )?;
            }
            if let Some(sync) = &r.sync {
                let st = sync.stats();
                for (name, help, v) in [
                    (
                        "walfs_sync_waits",
                        "Commit barriers that waited for the replicas (--sync-replication).",
                        &st.waits,
                    ),
                    (
                        "walfs_sync_timeouts",
                        "Times a database's synchronous replication timed out (--sync-timeout): each degrade or EIO period counts once.",
                        &st.timeouts,
                    ),
                    (
                        "walfs_sync_degraded_commits",
                        "Commit barriers (fsyncs, journal truncations and unlinks) that returned without the replicas holding their commit, while degraded (--sync-timeout-action degrade).",
                        &st.degraded_commits,
                    ),
                    (
                        "walfs_sync_failed_commits",
                        "Commit barriers failed with EIO (--sync-timeout-action eio); one failed commit may fail more than one.",
                        &st.failed_commits,
                    ),
                ] {
                    family(
                        &mut enc,
                        name,
                        help,
                        Counter,
                        [(vec![], v.load(Ordering::Relaxed))],
                    )?;
                }
                family(
                    &mut enc,
                    "walfs_sync_wait_seconds",
                    "Time commits spent waiting for the replicas, in all.",
                    Counter,
                    [(vec![], st.waited_us.load(Ordering::Relaxed) as f64 / 1e6)],
                )?;
            }
            let stats = r.capture.stats();
            family(
                &mut enc,
                "walfs_capture_restarts",
                "Restarts of a database's history from a snapshot, by what asked for it (follow: capture could not follow the files; staging: staging failed; upload: staged transactions could not be uploaded).",
                Counter,
                RestartKind::ALL.iter().map(|&k| {
                    (
                        vec![("kind", k.name().to_string())],
                        stats.restarts[k as usize].load(Ordering::Relaxed),
                    )
                }),
            )?;
        }
        let ops = view.fs.histograms();
        {
            let mut m = enc.encode_descriptor(
                "walfs_fuse_request_duration_seconds",
                "Time walfs spent serving FUSE requests, by operation.",
                None,
                MetricType::Histogram,
            )?;
            for (t, counts) in &ops {
                let labels = [("op", t.op.name())];
                let mut s = m.encode_family(&labels)?;
                let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                    .iter()
                    .map(|b| b.as_secs_f64())
                    .chain([f64::MAX])
                    .zip(counts.iter().copied())
                    .collect();
                s.encode_histogram::<NoLabelSet>(t.time.as_secs_f64(), t.calls, &buckets, None)?;
            }
        }
        family(
            &mut enc,
            "walfs_fuse_request_errors",
            "FUSE requests answered with an error, by operation.",
            Counter,
            ops.iter()
                .map(|(t, _)| (vec![("op", t.op.name().to_string())], t.errors)),
        )?;
        rss_family(&mut enc)
    }
}

/// `walfs_process_resident_memory_bytes`, of a mount or a follower.
pub(crate) fn rss_family(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    family(
        enc,
        "walfs_process_resident_memory_bytes",
        "Resident set size of the walfs process.",
        MetricType::Gauge,
        [(vec![], rss_bytes())],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_address_is_one_line() {
        let e = MetricsEndpoint::bind("no-port").err().unwrap();
        assert!(e.contains("not a HOST:PORT"), "{e}");
        let taken = MetricsEndpoint::bind("127.0.0.1:0").unwrap();
        let e = MetricsEndpoint::bind(&taken.addr().to_string())
            .err()
            .unwrap();
        assert!(e.starts_with("cannot serve metrics on"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    /// The FUSE histogram is cumulative per operation, ends at +Inf with the call count,
    /// and a mount without replicas exports no replica series.
    #[test]
    fn fuse_histogram_is_exported_cumulatively() {
        use crate::fs::metrics::{Metrics, Op};
        use std::time::Duration;
        let fs = Arc::new(Metrics::default());
        fs.record(Op::lookup, true, Duration::from_micros(3));
        fs.record(Op::lookup, false, Duration::from_micros(70));
        fs.record(Op::lookup, true, Duration::from_secs(2));
        let view = MountView {
            backing: "/b".into(),
            mountpoint: "/m".into(),
            fs,
            replication: None,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(MountCollector(view)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |series: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
            line.rsplit_once(' ').unwrap().1.parse().unwrap()
        };
        let h = "walfs_fuse_request_duration_seconds";
        assert_eq!(value(&format!("{h}_count{{op=\"lookup\"}}")), 3.0);
        assert_eq!(
            value(&format!("{h}_bucket{{le=\"0.00001\",op=\"lookup\"}}")),
            1.0
        );
        assert_eq!(
            value(&format!("{h}_bucket{{le=\"0.0001\",op=\"lookup\"}}")),
            2.0
        );
        assert_eq!(
            value(&format!("{h}_bucket{{le=\"1.0\",op=\"lookup\"}}")),
            2.0
        );
        assert_eq!(
            value(&format!("{h}_bucket{{le=\"+Inf\",op=\"lookup\"}}")),
            3.0
        );
        assert!(value(&format!("{h}_sum{{op=\"lookup\"}}")) > 2.0);
        assert_eq!(value("walfs_fuse_request_errors_total{op=\"lookup\"}"), 1.0);
        assert!(value("walfs_process_resident_memory_bytes") > 0.0);
        assert!(!text.contains("walfs_replica_txid{"), "{text}");
        assert!(!text.contains("walfs_uploads_total"), "{text}");
    }

    #[test]
    fn rss_is_measured() {
        assert!(rss_bytes() > 1 << 20);
    }
}
