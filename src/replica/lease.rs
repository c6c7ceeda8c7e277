//! One writer per replica: the lease a mount holds on each replica it writes.
//!
//! This file owns [`Lease`] and the holder description it stores ([`Holder`]).
//!
//! - S3 (and Azure Blob Storage, GCS, whose stores make the same conditional writes; GCS
//!   on the object's generation): the object `<prefix>/.walfs-lease` names the holder and
//!   when its lease expires.
//!   A mount takes it with a conditional create (`If-None-Match: *`), renews it every
//!   sixth of `--lease-ttl` while it writes the replica with a conditional update on its
//!   ETag (`If-Match`), and deletes it at unmount. An idle mount renews nothing (no
//!   request while idle) and lets the lease expire; its next write waits for a renewal. A lease held by another mount refuses the start, unless it has expired
//!   and `--takeover` is given, or its holder is a process of this host that no longer
//!   runs (a crashed mount restarting). The store's writes are fenced ([`Fence`]): open
//!   for half the TTL after each renewal sent, closed for good once a renewal finds the
//!   lease taken over; so a stale writer (paused, cut off) stops writing before a new
//!   holder may start.
//! - File replicas: an exclusive `flock` on `<dir>/.walfs-lease`, held while the mount
//!   runs (the kernel drops it when the process ends, so a crash frees it); the file
//!   names the holder for the error a second mount prints.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::runtime::Runtime;

use super::error::StoreError;
use super::store::{Conditional, Fence, ReplicaStore};
use super::timestamp::{format_rfc3339_nano, parse_rfc3339};
use super::url::ReplicaUrl;

/// The lease object's name, under the replica's root.
pub const LEASE_NAME: &str = ".walfs-lease";

/// Who holds a lease, as the lease object or file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub mount: String,
    pub since: SystemTime,
    /// None for a file lock, which lasts while its process runs.
    pub expires: Option<SystemTime>,
    /// Given up by a clean unmount: free to take.
    pub released: bool,
    /// What the holder encrypts the replica's objects with: a key id, or `none`
    /// (`--encryption-key-file`); `None` in the lease of a walfs from before encryption,
    /// which wrote plaintext.
    pub encryption: Option<String>,
}

impl Holder {
    /// This process, holding since now.
    pub fn this_process(mount: &Path, expires: Option<SystemTime>, encryption: &str) -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            mount: mount.display().to_string(),
            since: SystemTime::now(),
            expires,
            released: false,
            encryption: Some(encryption.to_string()),
        }
    }

    fn encode(&self) -> String {
        let mut s = format!(
            "walfs-lease 1\nhost {}\npid {}\nmount {}\nsince {}\n",
            self.host,
            self.pid,
            self.mount,
            format_rfc3339_nano(self.since)
        );
        if let Some(e) = self.expires {
            s.push_str(&format!("expires {}\n", format_rfc3339_nano(e)));
        }
        if self.released {
            s.push_str("released 1\n");
        }
        if let Some(e) = &self.encryption {
            s.push_str(&format!("encryption {e}\n"));
        }
        s
    }

    fn decode(text: &str) -> Option<Holder> {
        let mut lines = text.lines();
        if lines.next()? != "walfs-lease 1" {
            return None;
        }
        let (mut host, mut pid, mut mount, mut since, mut expires) = (None, None, None, None, None);
        let mut released = false;
        let mut encryption = None;
        for line in lines {
            let (k, v) = line.split_once(' ')?;
            match k {
                "host" => host = Some(v.to_string()),
                "pid" => pid = v.parse().ok(),
                "mount" => mount = Some(v.to_string()),
                "since" => since = parse_rfc3339(v),
                "expires" => expires = parse_rfc3339(v),
                "released" => released = v == "1",
                "encryption" => encryption = Some(v.to_string()),
                _ => {}
            }
        }
        Some(Holder {
            host: host?,
            pid: pid?,
            mount: mount?,
            since: since?,
            expires,
            released,
            encryption,
        })
    }

    /// "host H, pid P, mount M, since S" and, for S3, the expiry.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "host {}, pid {}, mount {}, since {}",
            self.host,
            self.pid,
            self.mount,
            format_rfc3339_nano(self.since)
        );
        if let Some(e) = self.expires {
            s.push_str(&format!(", lease expires {}", format_rfc3339_nano(e)));
        }
        s
    }

    /// A process of this host that no longer runs: a mount that crashed.
    fn is_dead_here(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        self.host == hostname()
            && self.pid != std::process::id()
            && unsafe { libc::kill(self.pid as libc::pid_t, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
}

/// This host's name.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Why a lease could not be taken.
#[derive(Debug)]
pub enum LeaseError {
    /// Another mount holds it: the message names the holder and says what to do.
    Held(String),
    /// The store failed.
    Store(StoreError),
    /// The lock file failed.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The replica was written encrypted and this mount has no key, or the reverse: the
    /// message says what to do.
    Encryption(String),
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Held(m) | LeaseError::Encryption(m) => f.write_str(m),
            LeaseError::Store(e) => write!(f, "cannot take the replica's lease: {e}"),
            LeaseError::Io { path, source } => {
                write!(f, "cannot lock {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for LeaseError {}

/// A lease this mount holds on one replica.
pub struct Lease {
    kind: Kind,
    fence: Arc<Fence>,
    base: String,
}

enum Kind {
    S3(Box<S3Lease>),
    File { _lock: File },
}

/// An S3 lease: the object, and what its next renewal writes.
struct S3Lease {
    store: ReplicaStore,
    /// What this mount encrypts with (a key id, or `none`), for the lease object.
    encryption: String,
    key: String,
    ttl: Duration,
    mount: PathBuf,
    since: SystemTime,
    /// The ETag of the lease object as this mount last wrote it.
    etag: Mutex<Option<String>>,
    /// When the lease object was last written.
    written: Mutex<std::time::Instant>,
    /// `--takeover`, for a lease taken after the start (the store was unreachable then).
    takeover: bool,
    /// Not taken yet: the store could not be reached at the start. Until it is, the fence
    /// stays closed and each tick tries again.
    pending: std::sync::atomic::AtomicBool,
}

impl Lease {
    /// Takes the lease on the replica `url` (whose store is `store`) for the mount at
    /// `mount`, or says who holds it.
    pub fn acquire(
        rt: &Runtime,
        url: &ReplicaUrl,
        store: &ReplicaStore,
        mount: &Path,
        ttl: Duration,
        takeover: bool,
    ) -> Result<Lease, LeaseError> {
        let base = url.to_string();
        let encryption = store
            .keyring()
            .map_or_else(|| "none".to_string(), |k| k.current().id().to_string());
        match url {
            ReplicaUrl::File(u) => {
                Self::lock_file(&u.dir.join(LEASE_NAME), mount, base, &encryption, store)
            }
            ReplicaUrl::S3(_) | ReplicaUrl::Abs(_) | ReplicaUrl::Gs(_) => {
                let key = format!("{}{LEASE_NAME}", prefix_of(store.root()));
                let fence = Arc::new(Fence::default());
                let lease = Lease {
                    kind: Kind::S3(Box::new(S3Lease {
                        store: store.clone(),
                        encryption,
                        key,
                        ttl,
                        mount: mount.to_path_buf(),
                        since: SystemTime::now(),
                        etag: Mutex::new(None),
                        written: Mutex::new(std::time::Instant::now()),
                        takeover,
                        pending: std::sync::atomic::AtomicBool::new(false),
                    })),
                    fence,
                    base,
                };
                match rt.block_on(lease.take(takeover)) {
                    Ok(()) => Ok(lease),
                    // An unreachable store must not keep the application from its data:
                    // mount, capture into staging, and take the lease once the store
                    // answers (uploads wait for it).
                    Err(LeaseError::Store(e)) => {
                        tracing::warn!(
                            replica = %lease.base,
                            "cannot reach the replica to take its lease ({e}); mounting anyway: uploads to it wait until the lease is taken"
                        );
                        if let Kind::S3(l) = &lease.kind {
                            l.pending.store(true, std::sync::atomic::Ordering::Release);
                        }
                        Ok(lease)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    fn lock_file(
        path: &Path,
        mount: &Path,
        base: String,
        encryption: &str,
        store: &ReplicaStore,
    ) -> Result<Lease, LeaseError> {
        let io = |source| LeaseError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let who = Holder::decode(&text).map_or_else(
                || "a process that has not written its name yet".into(),
                |h| h.describe(),
            );
            return Err(LeaseError::Held(format!(
                "replica {base} is in use by another mount ({who}); stop that mount first: one replica takes one writer"
            )));
        }
        let mut before = String::new();
        let _ = f.read_to_string(&mut before);
        check_encryption(Holder::decode(&before).as_ref(), store, &base)?;
        let me = Holder::this_process(mount, None, encryption);
        f.set_len(0).map_err(io)?;
        f.rewind().map_err(io)?;
        f.write_all(me.encode().as_bytes()).map_err(io)?;
        let fence = Arc::new(Fence::default());
        fence.open_forever();
        Ok(Lease {
            kind: Kind::File { _lock: f },
            fence,
            base,
        })
    }

    /// The fence that this lease keeps open; gate the replica's writing stores with it.
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// How often [`Lease::tick`] should run; None for a file lock, which needs none.
    pub fn tick_every(&self) -> Option<Duration> {
        match &self.kind {
            Kind::S3(l) => Some((l.ttl / 6).min(Duration::from_secs(1))),
            Kind::File { .. } => None,
        }
    }

    /// Renews an S3 lease if the replica is being written (the fence saw a write since the
    /// last tick) and a renewal is due (every sixth of the TTL) or the fence has closed.
    /// An idle mount lets its lease expire and makes no request; its next write closes
    /// the fence until this renews it, and finds out then whether another mount took over.
    pub async fn tick(&self) {
        let Kind::S3(l) = &self.kind else {
            return;
        };
        if l.pending.load(std::sync::atomic::Ordering::Acquire) {
            // Taken late: the store was unreachable at the start. Every few seconds.
            if l.written.lock().elapsed() < Duration::from_secs(5) {
                return;
            }
            *l.written.lock() = std::time::Instant::now();
            match self.take(l.takeover).await {
                Ok(()) => l.pending.store(false, std::sync::atomic::Ordering::Release),
                Err(LeaseError::Held(m) | LeaseError::Encryption(m)) => {
                    l.pending.store(false, std::sync::atomic::Ordering::Release);
                    self.fence.close_lost();
                    tracing::error!(
                        replica = %self.base,
                        "{m}; this mount does not write to it, and what it captures stays in staging"
                    );
                }
                Err(e) => tracing::debug!(replica = %self.base, "still cannot take the lease: {e}"),
            }
            return;
        }
        if !self.fence.take_demand() || self.fence.is_lost() {
            return;
        }
        if l.written.lock().elapsed() >= l.ttl / 6 || !self.fence.is_open() {
            self.renew().await;
        }
    }

    fn holder(&self, now: SystemTime) -> Option<Holder> {
        match &self.kind {
            Kind::S3(l) => Some(Holder {
                since: l.since,
                ..Holder::this_process(&l.mount, Some(now + l.ttl), &l.encryption)
            }),
            Kind::File { .. } => None,
        }
    }

    async fn take(&self, takeover: bool) -> Result<(), LeaseError> {
        let Kind::S3(l) = &self.kind else {
            return Ok(());
        };
        let (store, key, etag) = (&l.store, &l.key, &l.etag);
        for _ in 0..3 {
            let current = match store.get_with_etag(key).await {
                Ok((bytes, tag)) => Some((bytes, tag)),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(LeaseError::Store(e)),
            };
            let expected = match &current {
                None => None,
                Some((bytes, tag)) => {
                    let held = Holder::decode(&String::from_utf8_lossy(bytes));
                    let now = SystemTime::now();
                    let expired = held
                        .as_ref()
                        .is_some_and(|h| h.expires.is_some_and(|e| e <= now));
                    let crashed_here = held.as_ref().is_some_and(Holder::is_dead_here);
                    let released = held.as_ref().is_some_and(|h| h.released);
                    check_encryption(held.as_ref(), store, &self.base)?;
                    if !(released || crashed_here || (expired && takeover)) {
                        let who = held.as_ref().map_or_else(
                            || "a lease object walfs cannot read".to_string(),
                            Holder::describe,
                        );
                        let what = if expired {
                            "it has expired: start this mount with --takeover to take it over"
                        } else {
                            "stop that mount, or once its lease has expired start this one with --takeover"
                        };
                        return Err(LeaseError::Held(format!(
                            "replica {} is in use by another mount ({who}); {what}",
                            self.base
                        )));
                    }
                    if let Some(h) = held.as_ref().filter(|h| !h.released) {
                        tracing::warn!(
                            replica = %self.base,
                            "taking over the replica's lease from {} ({})",
                            h.describe(),
                            if crashed_here { "its process no longer runs" } else { "it expired; --takeover" }
                        );
                    }
                    tag.clone()
                }
            };
            let now = SystemTime::now();
            let body = self.holder(now).expect("an S3 lease").encode();
            match store
                .put_if(key, Bytes::from(body), expected.as_deref())
                .await
                .map_err(LeaseError::Store)?
            {
                Conditional::Written(tag) => {
                    *etag.lock() = Some(tag);
                    self.opened_at(now);
                    tracing::info!(replica = %self.base, "took the replica's lease");
                    return Ok(());
                }
                // Another mount wrote it meanwhile: look again.
                Conditional::Conflict => continue,
            }
        }
        Err(LeaseError::Held(format!(
            "replica {} is in use by another mount: its lease changed three times while this mount tried to take it",
            self.base
        )))
    }

    fn opened_at(&self, sent: SystemTime) {
        if let Kind::S3(l) = &self.kind {
            self.fence.open_until(sent + l.ttl / 2);
        }
    }

    /// Renews an S3 lease now. A renewal that finds the lease taken over closes the fence for
    /// good and says so once; a failed request leaves the fence to close on its own when
    /// its time runs out, and the next renewal tries again.
    async fn renew(&self) {
        let Kind::S3(l) = &self.kind else {
            return;
        };
        let (store, key, etag) = (&l.store, &l.key, &l.etag);
        if self.fence.is_lost() {
            return;
        }
        let now = SystemTime::now();
        let body = self.holder(now).expect("an S3 lease").encode();
        let expected = etag.lock().clone();
        match store
            .put_if(key, Bytes::from(body), expected.as_deref())
            .await
        {
            Ok(Conditional::Written(tag)) => {
                *etag.lock() = Some(tag);
                *l.written.lock() = std::time::Instant::now();
                self.opened_at(now);
            }
            Ok(Conditional::Conflict) => {
                self.fence.close_lost();
                let who = match store.get_with_etag(key).await {
                    Ok((bytes, _)) => Holder::decode(&String::from_utf8_lossy(&bytes))
                        .map_or_else(|| "unknown".into(), |h| h.describe()),
                    Err(_) => "unknown".into(),
                };
                tracing::error!(
                    replica = %self.base,
                    "lost the replica's lease to another mount ({who}): this mount no longer writes to it; what it captures stays in staging. Unmount it, or remount it with --takeover once the other mount is stopped"
                );
            }
            Err(e) => tracing::warn!(
                replica = %self.base,
                "cannot renew the replica's lease ({e}); uploads pause when it lapses, and the next renewal retries"
            ),
        }
    }

    /// Gives the lease up (unmount): marks an S3 lease object released, if it is still
    /// this mount's (one conditional PUT); a file lock goes with its descriptor.
    pub async fn release(&self) {
        let Kind::S3(l) = &self.kind else {
            return;
        };
        if self.fence.is_lost() {
            return;
        }
        let Some(mine) = l.etag.lock().clone() else {
            return;
        };
        let mut me = self.holder(SystemTime::now()).expect("an S3 lease");
        me.expires = Some(SystemTime::now());
        me.released = true;
        match l
            .store
            .put_if(&l.key, Bytes::from(me.encode()), Some(&mine))
            .await
        {
            Ok(Conditional::Written(_)) => {}
            // Another mount holds it now: it stays theirs.
            Ok(Conditional::Conflict) => {}
            Err(e) => tracing::warn!(
                replica = %self.base,
                "cannot give up the replica's lease ({e}); it expires on its own"
            ),
        }
    }
}

/// Refuses to write a replica whose last writer (`before`, its lease) encrypted it when
/// `store` has no key, or wrote it in plaintext (or was a walfs from before encryption)
/// when `store` has one: one replica never mixes plaintext and encrypted objects, which no
/// restore could read together. A rotation (another key) is allowed; a previous key that
/// is not among the store's keys gets a warning.
fn check_encryption(
    before: Option<&Holder>,
    store: &ReplicaStore,
    base: &str,
) -> Result<(), LeaseError> {
    let Some(before) = before else {
        return Ok(());
    };
    let theirs = before.encryption.as_deref().unwrap_or("none");
    match (theirs, store.keyring()) {
        ("none", None) => Ok(()),
        ("none", Some(_)) => Err(LeaseError::Encryption(format!(
            "replica {base} was written without encryption (its last mount's lease says so), \
             and one replica never mixes plaintext and encrypted objects: give encrypted \
             objects a new replica (another prefix or directory), or mount without \
             --encryption-key-file"
        ))),
        (id, None) => Err(LeaseError::Encryption(format!(
            "replica {base} is encrypted (its last mount wrote with key id {id}); give this \
             mount the key with --encryption-key-file FILE (or WALFS_ENCRYPTION_KEY_FILE)"
        ))),
        (id, Some(ring)) => {
            if !ring.ids().iter().any(|k| k.to_string() == id) {
                tracing::warn!(
                    replica = %base,
                    "the replica's last mount encrypted with key id {id}, which is not among \
                     this mount's keys ({}): what it wrote restores only with that key, so \
                     keep its file and give it to restores",
                    ring.ids()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Ok(())
        }
    }
}

/// `prefix/`, or "" for the bucket's root.
fn prefix_of(root: &str) -> String {
    let root = root.trim_matches('/');
    if root.is_empty() {
        String::new()
    } else {
        format!("{root}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip_and_describe_themselves() {
        let h = Holder {
            host: "db-1".into(),
            pid: 4242,
            mount: "/srv/app data".into(),
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            expires: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_030)),
            released: false,
            encryption: Some("0011223344556677".into()),
        };
        assert_eq!(Holder::decode(&h.encode()), Some(h.clone()));
        let released = Holder {
            released: true,
            ..h.clone()
        };
        assert_eq!(Holder::decode(&released.encode()), Some(released));
        let d = h.describe();
        assert!(
            d.contains("host db-1") && d.contains("pid 4242") && d.contains("/srv/app data"),
            "{d}"
        );
        assert!(d.contains("lease expires"), "{d}");
        assert_eq!(Holder::decode("not a lease"), None);
        let me = Holder::this_process(Path::new("/m"), None, "none");
        assert_eq!(Holder::decode(&me.encode()), Some(me.clone()));
        // A lease from before encryption has no such line.
        let old = "walfs-lease 1\nhost h\npid 1\nmount /m\nsince 2026-12-04T21:00:00Z\n";
        assert_eq!(Holder::decode(old).unwrap().encryption, None);
        assert!(!me.is_dead_here(), "this process runs");
    }
}
