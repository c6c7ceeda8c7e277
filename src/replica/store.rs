//! The object store of one replica, in Litestream 0.5's object layout.
//!
//! This module owns:
//! - [`ReplicaUrl`]: parsing of replica URLs (`file:///dir`, `s3://bucket/prefix?...` with
//!   Litestream's query keys), with credentials and endpoint also taken from the environment,
//!   and with secrets redacted from `Debug` and `Display`;
//! - [`ReplicaStore`]: put, get, head, list and delete of LTX objects on top of
//!   `object_store` (`LocalFileSystem` for file replicas, `AmazonS3` for S3 and
//!   S3-compatibles), with retries and backoff, and counters of requests by kind.
//!
//! Layout, as Litestream 0.5 writes it (`file/replica_client.go`, `s3/replica_client.go`,
//! `litestream.go` at v0.5.16):
//! - file replica: `<dir>/<db>/ltx/<level in decimal>/<min %016x>-<max %016x>.ltx`, with the
//!   file's mtime set to the LTX timestamp;
//! - S3: `<prefix>/<db>/<level as %04x>/<min %016x>-<max %016x>.ltx`, with the object
//!   metadata `litestream-timestamp` holding the timestamp in Go's RFC3339Nano, UTC.
//!
//! `<db>` is the database's path relative to a replicated directory, or empty when the
//! replica holds a single database directly at its URL. Litestream itself builds S3 keys of
//! a database at the bucket root as `./0000/...` or `/0000/...` (it joins an empty or `.`
//! path with `/`); walfs writes `0000/...` there, the only form object stores agree on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, GetResult,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};

use crate::ltx::{ltx_object_name, parse_ltx_object_name};

use super::error::{StoreError, StoreErrorKind};

/// The S3 object metadata key that holds an LTX file's timestamp (Litestream's
/// `MetadataKeyTimestamp`).
pub const METADATA_KEY_TIMESTAMP: &str = "litestream-timestamp";
/// S3 object metadata holding walfs's verification record of the object's max TXID
/// (FORMAT.md); Litestream ignores it.
pub const METADATA_KEY_RECORD: &str = "walfs-record";

/// The region used when neither the URL nor the environment names one (Litestream's
/// `DefaultRegion`).
pub const DEFAULT_REGION: &str = "us-east-1";

// ---------------------------------------------------------------------------------------------
// Replica URLs
// ---------------------------------------------------------------------------------------------

/// A secret string (secret key, session token): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for handing to the client library only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Static S3 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key ID (shown only by its first four characters).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: Secret,
    /// The session token of temporary credentials.
    pub session_token: Option<Secret>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.access_key_id.chars().take(4).collect();
        f.debug_struct("S3Credentials")
            .field("access_key_id", &format_args!("{shown}…"))
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .finish()
    }
}

/// A file replica: a directory on a local (or mounted) filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileUrl {
    /// The absolute directory that holds the replica.
    pub dir: PathBuf,
}

/// An S3 (or S3-compatible) replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, without leading or trailing slashes ("" for the bucket root).
    pub prefix: String,
    /// A custom endpoint such as `http://127.0.0.1:9000` (None for AWS itself).
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    pub force_path_style: bool,
    /// Accept invalid TLS certificates.
    pub skip_verify: bool,
    /// Static credentials (None: the environment's other providers, e.g. web identity).
    pub credentials: Option<S3Credentials>,
}

/// Where one replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// `file:///abs/dir`
    File(FileUrl),
    /// `s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true&skipVerify=false`
    S3(S3Url),
}

/// Query keys that Litestream accepts and walfs ignores (with a warning): they tune
/// performance only.
const IGNORED_QUERY_KEYS: &[&str] = &[
    "signPayload",
    "sign-payload",
    "requireContentMD5",
    "require-content-md5",
    "concurrency",
    "partSize",
    "part-size",
    "storageClass",
    "storage-class",
];

impl ReplicaUrl {
    /// Parses a replica URL, taking credentials, region and endpoint defaults from the
    /// process environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`; the URL's query wins).
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Self::parse_with_env(s, |k| std::env::var(k).ok())
    }

    /// [`ReplicaUrl::parse`] with an explicit environment lookup.
    pub fn parse_with_env(
        s: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, StoreError> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let s = s.trim();
        if s.starts_with('/') {
            return Ok(ReplicaUrl::File(FileUrl {
                dir: clean_abs_dir(s, s)?,
            }));
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Err(StoreError::url(format!(
                "replica URL {s:?} has no scheme; use file:///absolute/dir or s3://bucket/prefix"
            )));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => parse_file_url(s),
            "s3" => parse_s3_url(s, &env),
            other => Err(StoreError::url(format!(
                "replica URL scheme {other:?} is not supported; use file:///absolute/dir or s3://bucket/prefix"
            ))),
        }
    }
}

fn clean_abs_dir(path: &str, original: &str) -> Result<PathBuf, StoreError> {
    let mut out = PathBuf::from("/");
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(StoreError::url(format!(
                    "replica URL {original:?} contains '..'; give the directory without it"
                )))
            }
            seg => out.push(seg),
        }
    }
    Ok(out)
}

fn parse_file_url(s: &str) -> Result<ReplicaUrl, StoreError> {
    // The URL parser resolves '..' itself; refuse it before, as for plain paths.
    let raw_path = s.split(['?', '#']).next().unwrap_or(s);
    if raw_path.split('/').any(|seg| seg == "..") {
        return Err(StoreError::url(format!(
            "replica URL {s:?} contains '..'; give the directory without it: file:///absolute/dir"
        )));
    }
    let u = url::Url::parse(s).map_err(|e| {
        StoreError::url(format!(
            "replica URL {s:?} is malformed ({e}); use file:///absolute/dir"
        ))
    })?;
    if u.host_str()
        .is_some_and(|h| !h.is_empty() && h != "localhost")
    {
        return Err(StoreError::url(format!(
            "replica URL {s:?} names a host; use three slashes for an absolute directory: file:///absolute/dir"
        )));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(StoreError::url(format!(
            "replica URL {s:?} has a query or fragment; a file replica takes none: file:///absolute/dir"
        )));
    }
    let path = u.to_file_path().map_err(|_| {
        StoreError::url(format!(
            "replica URL {s:?} is not a valid local path; use file:///absolute/dir"
        ))
    })?;
    let path_str = path.to_str().ok_or_else(|| {
        StoreError::url(format!(
            "replica URL {s:?} is not UTF-8; rename the directory"
        ))
    })?;
    if path_str == "/" {
        return Err(StoreError::url(format!(
            "replica URL {s:?} is the root directory; name a directory: file:///absolute/dir"
        )));
    }
    Ok(ReplicaUrl::File(FileUrl {
        dir: clean_abs_dir(path_str, s)?,
    }))
}

fn parse_bool(s: &str, key: &str, value: &str) -> Result<bool, StoreError> {
    // Litestream's BoolQueryValue accepts these spellings.
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "t" | "yes" => Ok(true),
        "false" | "0" | "f" | "no" => Ok(false),
        _ => Err(StoreError::url(format!(
            "replica URL {s:?}: {key}={value:?} is not a boolean; use {key}=true or {key}=false"
        ))),
    }
}

fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[');
    host.starts_with("localhost")
        || host.starts_with("127.")
        || host.starts_with("::1")
        || host.starts_with("10.")
        || host.starts_with("192.168.")
}

/// Gives an endpoint a scheme (http for local hosts, https otherwise, as Litestream does)
/// and removes a trailing slash.
fn normalize_endpoint(s: &str, endpoint: &str) -> Result<String, StoreError> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let full = if endpoint.contains("://") {
        endpoint.to_string()
    } else if is_local_host(endpoint) {
        format!("http://{endpoint}")
    } else {
        format!("https://{endpoint}")
    };
    let u = url::Url::parse(&full).map_err(|e| {
        StoreError::url(format!(
            "replica URL {s:?}: endpoint {:?} is malformed ({e}); use e.g. endpoint=http://127.0.0.1:9000",
            redact_userinfo(&full)
        ))
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(StoreError::url(format!(
            "replica URL endpoint {:?} holds credentials; remove them and set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead",
            redact_userinfo(&full)
        )));
    }
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(StoreError::url(format!(
            "replica URL {s:?}: endpoint {:?} must be an http:// or https:// URL with a host",
            redact_userinfo(&full)
        )));
    }
    Ok(full)
}

/// An endpoint URL without any `user:password@` part.
fn redact_userinfo(endpoint: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, tail) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}{tail}"),
                None => endpoint.to_string(),
            }
        }
        None => endpoint.to_string(),
    }
}

/// A URL's text with the `user:password@` part of every embedded URL (the replica URL
/// itself and an `endpoint=` in its query) replaced, for error messages.
fn redact_url_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(['/', '?', '&', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push_str("<redacted>");
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_s3_url(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ReplicaUrl, StoreError> {
    let shown = redact_url_text(s);
    let u = url::Url::parse(s).map_err(|e| {
        StoreError::url(format!(
            "replica URL {shown:?} is malformed ({e}); use s3://bucket/prefix?endpoint=...&region=..."
        ))
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(StoreError::url(
            "replica URL s3://<redacted>@...: credentials do not belong in the URL; \
             set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead",
        ));
    }
    let bucket = u.host_str().unwrap_or("").to_string();
    if bucket.is_empty() {
        return Err(StoreError::url(format!(
            "replica URL {shown:?} names no bucket; use s3://bucket/prefix"
        )));
    }
    if u.port().is_some() || bucket.contains(':') {
        return Err(StoreError::url(format!(
            "replica URL {shown:?}: the host part is the bucket name; give a custom server as \
             s3://bucket/prefix?endpoint=http://host:port"
        )));
    }
    let raw_path = percent_decode(u.path()).ok_or_else(|| {
        StoreError::url(format!(
            "replica URL {shown:?} has a malformed %-escape in its path; fix the escape"
        ))
    })?;
    let mut segs = Vec::new();
    for seg in raw_path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(StoreError::url(format!(
                    "replica URL {shown:?} contains '..' in its prefix; give the prefix without it"
                )))
            }
            seg => segs.push(seg),
        }
    }
    let prefix = segs.join("/");

    let mut endpoint: Option<String> = None;
    let mut region: Option<String> = None;
    let mut force_path_style: Option<bool> = None;
    let mut skip_verify = false;
    for (k, v) in u.query_pairs() {
        match k.as_ref() {
            "endpoint" => endpoint = Some(v.into_owned()).filter(|v| !v.is_empty()),
            "region" => region = Some(v.into_owned()).filter(|v| !v.is_empty()),
            "forcePathStyle" | "force-path-style" => {
                force_path_style = Some(parse_bool(&shown, &k, &v)?)
            }
            "skipVerify" | "skip-verify" => skip_verify = parse_bool(&shown, &k, &v)?,
            k if IGNORED_QUERY_KEYS.contains(&k) => {
                tracing::warn!(key = k, "replica URL query key is ignored by walfs");
            }
            k if k.starts_with("sse") => return Err(StoreError::url(format!(
                "replica URL {shown:?}: server-side encryption ({k}) is not supported yet; remove it"
            ))),
            k => {
                return Err(StoreError::url(format!(
                    "replica URL {shown:?}: unknown query key {k:?}; known keys are endpoint, region, \
                     forcePathStyle and skipVerify"
                )))
            }
        }
    }

    // The URL's query wins over the environment.
    let endpoint =
        match endpoint.or_else(|| env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"))) {
            Some(e) => Some(normalize_endpoint(&shown, &e)?),
            None => None,
        };
    let region = region
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    // As in Litestream: custom endpoints default to path style unless told otherwise.
    let force_path_style = force_path_style.unwrap_or(endpoint.is_some());

    let key_id = env("AWS_ACCESS_KEY_ID").or_else(|| env("LITESTREAM_ACCESS_KEY_ID"));
    let secret = env("AWS_SECRET_ACCESS_KEY").or_else(|| env("LITESTREAM_SECRET_ACCESS_KEY"));
    let credentials =
        match (key_id, secret) {
            (Some(access_key_id), Some(secret)) => Some(S3Credentials {
                access_key_id,
                secret_access_key: Secret(secret),
                session_token: env("AWS_SESSION_TOKEN").map(Secret),
            }),
            (None, None) => None,
            (Some(_), None) => return Err(StoreError::url(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both or neither",
            )),
            (None, Some(_)) => return Err(StoreError::url(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both or neither",
            )),
        };

    Ok(ReplicaUrl::S3(S3Url {
        bucket,
        prefix,
        endpoint,
        region,
        force_path_style,
        skip_verify,
        credentials,
    }))
}

impl fmt::Display for ReplicaUrl {
    /// The canonical URL, without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaUrl::File(u) => write!(f, "file://{}", u.dir.display()),
            ReplicaUrl::S3(u) => {
                write!(f, "s3://{}", u.bucket)?;
                if !u.prefix.is_empty() {
                    write!(f, "/{}", u.prefix)?;
                }
                let mut sep = '?';
                if let Some(e) = &u.endpoint {
                    write!(f, "{sep}endpoint={}", redact_userinfo(e))?;
                    sep = '&';
                }
                write!(f, "{sep}region={}", u.region)?;
                if u.force_path_style {
                    write!(f, "&forcePathStyle=true")?;
                }
                if u.skip_verify {
                    write!(f, "&skipVerify=true")?;
                }
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

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

fn join_key(parts: &[&str]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks a database path relative to the replica root: "" or `a/b/c.db` with no empty, `.`
/// or `..` segments.
fn check_db_path(db_path: &str) -> Result<(), StoreError> {
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

// ---------------------------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------------------------

/// Formats a time as Go's `time.RFC3339Nano` in UTC: fractional seconds with trailing zeros
/// removed (none at all when zero), then `Z`.
pub fn format_rfc3339_nano(t: SystemTime) -> String {
    let dt: DateTime<Utc> = t.into();
    let mut s = dt.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = dt.timestamp_subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Parses an RFC 3339 timestamp (any offset, any fractional precision).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|dt| SystemTime::from(dt.with_timezone(&Utc)))
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// One LTX object in a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LtxObjectInfo {
    /// The compaction level (0 new transactions, 1 to 3 compactions, 9 snapshots).
    pub level: u8,
    /// The first transaction ID the file holds.
    pub min_txid: u64,
    /// The last transaction ID the file holds.
    pub max_txid: u64,
    /// The object's size in bytes.
    pub size: u64,
    /// When the LTX file was created: the file's mtime, the S3 metadata
    /// `litestream-timestamp` (from [`ReplicaStore::head_ltx`]) or the object's
    /// Last-Modified (from [`ReplicaStore::list_ltx`] on S3).
    pub timestamp: SystemTime,
    /// The object's key, relative to the bucket (S3) or the replica directory (file).
    pub key: String,
}

impl LtxObjectInfo {
    /// An object as a listing shows it: dated by its Last-Modified (the upload time on S3,
    /// the mtime, which is the commit time, on a file replica).
    fn listed(
        level: u8,
        min_txid: u64,
        max_txid: u64,
        key: String,
        m: &object_store::ObjectMeta,
    ) -> LtxObjectInfo {
        LtxObjectInfo {
            level,
            min_txid,
            max_txid,
            size: m.size,
            timestamp: m.last_modified.into(),
            key,
        }
    }
}

/// Uploads larger than this are streamed in parts rather than read into memory.
pub const MULTIPART_THRESHOLD: u64 = 32 * 1024 * 1024;
/// The size of one part of a multipart upload.
const MULTIPART_PART: usize = 16 * 1024 * 1024;
/// How many parts may be in flight at once (memory: this many parts).
const MULTIPART_IN_FLIGHT: usize = 2;

/// What an LTX upload reads from.
enum LtxSource {
    Bytes(Bytes),
    /// A file and its size.
    File(PathBuf, u64),
}

/// How hard a store retries and how long it waits.
#[derive(Debug, Clone)]
pub struct StoreTuning {
    /// Retries of one failed request (0 disables retries).
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// The first backoff delay; later ones grow up to `max_backoff`.
    pub init_backoff: Duration,
    /// The largest backoff delay.
    pub max_backoff: Duration,
    /// The limit on establishing a connection.
    pub connect_timeout: Duration,
    /// The limit on one whole request (large uploads need a generous one).
    pub request_timeout: Duration,
}

impl Default for StoreTuning {
    fn default() -> Self {
        StoreTuning {
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// Requests made to a store since it was opened, by kind. A LIST counts once per call
/// (S3 pages beyond the first, 1000 keys each, are not counted separately); retries made
/// inside the client are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// PUT requests.
    pub put: u64,
    /// GET requests.
    pub get: u64,
    /// HEAD requests.
    pub head: u64,
    /// LIST requests.
    pub list: u64,
    /// DELETE requests.
    pub delete: u64,
}

impl RequestCounts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete
    }
}

#[derive(Debug, Default)]
struct Counters {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The object store of one replica. Cheap to clone (clones share the client and counters).
#[derive(Debug, Clone)]
pub struct ReplicaStore {
    store: Arc<dyn ObjectStore>,
    /// Set for file replicas, to set file mtimes.
    local: Option<Arc<LocalFileSystem>>,
    layout: Layout,
    /// The key prefix inside the store ("" for file replicas, whose store is rooted at the
    /// directory).
    root: String,
    /// How errors name this store, e.g. `s3://bucket` or `file:///dir`.
    base: String,
    counters: Arc<Counters>,
}

impl ReplicaStore {
    /// Opens the store of a replica with default retries and timeouts. Makes no request;
    /// creates a file replica's directory.
    pub fn open(url: &ReplicaUrl) -> Result<Self, StoreError> {
        Self::open_with(url, &StoreTuning::default())
    }

    /// Opens the store of a replica.
    pub fn open_with(url: &ReplicaUrl, tuning: &StoreTuning) -> Result<Self, StoreError> {
        match url {
            ReplicaUrl::File(u) => {
                std::fs::create_dir_all(&u.dir).map_err(|e| {
                    StoreError::new(
                        StoreErrorKind::Request,
                        format!(
                            "cannot create replica directory {}: {e}; check its parent's permissions",
                            u.dir.display()
                        ),
                    )
                })?;
                let local = LocalFileSystem::new_with_prefix(&u.dir)
                    .map_err(|e| {
                        StoreError::new(
                            StoreErrorKind::Request,
                            format!("cannot open replica directory {}: {e}", u.dir.display()),
                        )
                    })?
                    .with_fsync(true);
                let local = Arc::new(local);
                Ok(ReplicaStore {
                    store: local.clone(),
                    local: Some(local),
                    layout: Layout::File,
                    root: String::new(),
                    base: format!("file://{}", u.dir.display()),
                    counters: Arc::default(),
                })
            }
            ReplicaUrl::S3(u) => {
                let mut client = ClientOptions::new()
                    .with_connect_timeout(tuning.connect_timeout)
                    .with_timeout(tuning.request_timeout)
                    .with_allow_invalid_certificates(u.skip_verify);
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(&u.bucket)
                    .with_region(&u.region)
                    .with_virtual_hosted_style_request(!u.force_path_style)
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: tuning.init_backoff,
                            max_backoff: tuning.max_backoff,
                            base: 2.0,
                        },
                        max_retries: tuning.max_retries,
                        retry_timeout: tuning.retry_timeout,
                    });
                if let Some(e) = &u.endpoint {
                    if e.starts_with("http://") {
                        client = client.with_allow_http(true);
                    }
                    b = b.with_endpoint(e);
                }
                match &u.credentials {
                    Some(c) => {
                        b = b
                            .with_access_key_id(&c.access_key_id)
                            .with_secret_access_key(c.secret_access_key.expose());
                        if let Some(t) = &c.session_token {
                            b = b.with_token(t.expose());
                        }
                    }
                    None => {
                        // No static keys: let the client use the environment's other
                        // providers (web identity, container credentials, instance metadata).
                        for key in [
                            "AWS_WEB_IDENTITY_TOKEN_FILE",
                            "AWS_ROLE_ARN",
                            "AWS_ROLE_SESSION_NAME",
                            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                        ] {
                            if let (Ok(v), Ok(k)) = (
                                std::env::var(key),
                                key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>(),
                            ) {
                                b = b.with_config(k, v);
                            }
                        }
                    }
                }
                let s3 = b.with_client_options(client).build().map_err(|e| {
                    StoreError::url(format!(
                        "cannot configure S3 client for {url}: {e}; check the replica URL"
                    ))
                })?;
                Ok(ReplicaStore {
                    store: Arc::new(s3),
                    local: None,
                    layout: Layout::S3,
                    root: u.prefix.clone(),
                    base: format!("s3://{}", u.bucket),
                    counters: Arc::default(),
                })
            }
        }
    }

    /// The layout this store writes.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Requests made so far, by kind.
    pub fn requests(&self) -> RequestCounts {
        let c = &self.counters;
        RequestCounts {
            put: c.put.load(Ordering::Relaxed),
            get: c.get.load(Ordering::Relaxed),
            head: c.head.load(Ordering::Relaxed),
            list: c.list.load(Ordering::Relaxed),
            delete: c.delete.load(Ordering::Relaxed),
        }
    }

    /// The key of an LTX object (relative to the bucket or replica directory).
    pub fn ltx_key(&self, db_path: &str, level: u8, min_txid: u64, max_txid: u64) -> String {
        self.layout
            .ltx_key(&self.root, db_path, level, min_txid, max_txid)
    }

    fn object_path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        ObjectPath::parse(key).map_err(|e| {
            StoreError::new(
                StoreErrorKind::InvalidPath,
                format!(
                    "{}/{key} is not a valid object key ({e}); rename the database",
                    self.base
                ),
            )
        })
    }

    fn kind_name(&self) -> &'static str {
        match self.layout {
            Layout::File => "file",
            Layout::S3 => "s3",
        }
    }

    fn hint(&self) -> &'static str {
        match self.layout {
            Layout::File => "check that the replica directory exists and is writable",
            Layout::S3 => "check the credentials, endpoint, region and bucket",
        }
    }

    fn request_error(&self, op: &str, key: &str, e: object_store::Error) -> StoreError {
        let kind = match e {
            object_store::Error::NotFound { .. } => StoreErrorKind::NotFound,
            _ => StoreErrorKind::Request,
        };
        let what = if kind == StoreErrorKind::NotFound {
            "the object does not exist; list the replica to see what it holds".to_string()
        } else {
            self.hint().to_string()
        };
        StoreError::new(
            kind,
            format!(
                "{} {op} of {}/{key} failed: {e}; {what}",
                self.kind_name(),
                self.base
            ),
        )
    }

    /// The S3 prefix of the replica ("" for file replicas, whose directory is the root).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Uploads `bytes` to `key` (relative to the bucket or replica directory) atomically.
    /// For objects that are not LTX files, such as walfs's verification records.
    pub async fn put_object(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.put);
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(|e| self.request_error("PUT", key, e))
    }

    /// Downloads the object at `key`; an error of kind NotFound if there is none.
    pub async fn get_object(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.get);
        let res = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.request_error("GET", key, e))?;
        res.bytes()
            .await
            .map_err(|e| self.request_error("GET", key, e))
    }

    /// Downloads bytes `range` of the object at `key`.
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.get);
        self.store
            .get_range(&path, range)
            .await
            .map_err(|e| self.request_error("GET", key, e))
    }

    /// The replica's address without credentials, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Uploads an LTX object atomically (readers see all of it or none), with its timestamp
    /// as the file mtime or the `litestream-timestamp` metadata.
    pub async fn put_ltx(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
        bytes: Bytes,
        timestamp: SystemTime,
    ) -> Result<LtxObjectInfo, StoreError> {
        self.put_ltx_from(
            db_path,
            level,
            (min_txid, max_txid),
            LtxSource::Bytes(bytes),
            timestamp,
            None,
        )
        .await
    }

    /// Like [`ReplicaStore::put_ltx`], with walfs's verification record of `max_txid` in the
    /// object's metadata (S3; ignored on file replicas, see [`ReplicaStore::holds_records`]).
    pub async fn put_ltx_with_record(
        &self,
        db_path: &str,
        level: u8,
        txids: (u64, u64),
        bytes: Bytes,
        timestamp: SystemTime,
        record: Option<String>,
    ) -> Result<LtxObjectInfo, StoreError> {
        self.put_ltx_from(
            db_path,
            level,
            txids,
            LtxSource::Bytes(bytes),
            timestamp,
            record,
        )
        .await
    }

    /// Whether LTX objects can carry a verification record in their metadata (S3 can; a
    /// file replica keeps records as separate files).
    pub fn holds_records(&self) -> bool {
        self.layout == Layout::S3
    }

    /// The verification record in an LTX object's metadata, if it has one.
    pub async fn head_ltx_record(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<Option<String>, StoreError> {
        if !self.holds_records() {
            return Ok(None);
        }
        let (_, res) = self.head(db_path, level, min_txid, max_txid).await?;
        Ok(res
            .attributes
            .get(&Attribute::Metadata(METADATA_KEY_RECORD.into()))
            .map(|v| v.as_ref().to_string()))
    }

    /// Uploads the LTX file at `file` like [`ReplicaStore::put_ltx`]. Files larger than
    /// [`MULTIPART_THRESHOLD`] are streamed as a multipart upload with a bounded number of
    /// parts in flight, so a large snapshot never sits in memory whole.
    pub async fn put_ltx_file(
        &self,
        db_path: &str,
        level: u8,
        (min_txid, max_txid): (u64, u64),
        file: &Path,
        timestamp: SystemTime,
        record: Option<String>,
    ) -> Result<LtxObjectInfo, StoreError> {
        let read_err = |e: std::io::Error| {
            StoreError::new(
                StoreErrorKind::Request,
                format!("cannot read staged file {}: {e}", file.display()),
            )
        };
        let size = std::fs::metadata(file).map_err(read_err)?.len();
        let source = if size <= MULTIPART_THRESHOLD {
            LtxSource::Bytes(Bytes::from(std::fs::read(file).map_err(read_err)?))
        } else {
            LtxSource::File(file.to_path_buf(), size)
        };
        self.put_ltx_from(
            db_path,
            level,
            (min_txid, max_txid),
            source,
            timestamp,
            record,
        )
        .await
    }

    async fn put_ltx_from(
        &self,
        db_path: &str,
        level: u8,
        (min_txid, max_txid): (u64, u64),
        source: LtxSource,
        timestamp: SystemTime,
        record: Option<String>,
    ) -> Result<LtxObjectInfo, StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        let mut attrs = Attributes::new();
        if self.layout == Layout::S3 {
            attrs.insert(
                Attribute::Metadata(METADATA_KEY_TIMESTAMP.into()),
                AttributeValue::from(format_rfc3339_nano(timestamp)),
            );
            if let Some(r) = record {
                attrs.insert(
                    Attribute::Metadata(METADATA_KEY_RECORD.into()),
                    AttributeValue::from(r),
                );
            }
        }
        Counters::bump(&self.counters.put);
        let size = match source {
            LtxSource::Bytes(bytes) => {
                let size = bytes.len() as u64;
                let opts = PutOptions {
                    attributes: attrs,
                    ..PutOptions::default()
                };
                self.store
                    .put_opts(&path, PutPayload::from_bytes(bytes), opts)
                    .await
                    .map_err(|e| self.request_error("PUT", &key, e))?;
                size
            }
            LtxSource::File(file, size) => {
                let opts = PutMultipartOptions {
                    attributes: attrs,
                    ..PutMultipartOptions::default()
                };
                let upload = self
                    .store
                    .put_multipart_opts(&path, opts)
                    .await
                    .map_err(|e| self.request_error("PUT", &key, e))?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
                let staged_err = |e: std::io::Error| {
                    let source = Box::new(e);
                    self.request_error(
                        "PUT",
                        &key,
                        object_store::Error::Generic {
                            store: "staging",
                            source,
                        },
                    )
                };
                let res: Result<(), StoreError> = async {
                    let mut f = std::fs::File::open(&file).map_err(staged_err)?;
                    let mut buf = vec![0u8; MULTIPART_PART];
                    loop {
                        w.wait_for_capacity(MULTIPART_IN_FLIGHT)
                            .await
                            .map_err(|e| self.request_error("PUT", &key, e))?;
                        let n = std::io::Read::read(&mut f, &mut buf).map_err(staged_err)?;
                        if n == 0 {
                            return Ok(());
                        }
                        w.write(&buf[..n]);
                    }
                }
                .await;
                match res {
                    Ok(()) => {
                        w.finish()
                            .await
                            .map_err(|e| self.request_error("PUT", &key, e))?;
                    }
                    Err(e) => {
                        let _ = w.abort().await;
                        return Err(e);
                    }
                }
                size
            }
        };
        if let Some(local) = &self.local {
            let file = local
                .path_to_filesystem(&path)
                .map_err(|e| self.request_error("PUT", &key, e))?;
            let res = tokio::task::spawn_blocking(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&file)?;
                f.set_times(
                    std::fs::FileTimes::new()
                        .set_modified(timestamp)
                        .set_accessed(timestamp),
                )
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            res.map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Request,
                    format!(
                        "file PUT of {}/{key}: setting its mtime failed: {e}; {}",
                        self.base,
                        self.hint()
                    ),
                )
            })?;
        }
        Ok(LtxObjectInfo {
            level,
            min_txid,
            max_txid,
            size,
            timestamp,
            key,
        })
    }

    /// Downloads a whole LTX object.
    pub async fn get_ltx(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<Bytes, StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        Counters::bump(&self.counters.get);
        let res = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.request_error("GET", &key, e))?;
        res.bytes()
            .await
            .map_err(|e| self.request_error("GET", &key, e))
    }

    /// HEADs one LTX object: its key and the response (metadata, attributes).
    async fn head(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<(String, GetResult), StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        Counters::bump(&self.counters.head);
        let opts = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let res = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| self.request_error("HEAD", &key, e))?;
        Ok((key, res))
    }

    /// Reads one LTX object's size and timestamp (the `litestream-timestamp` metadata on S3,
    /// falling back to Last-Modified; the mtime on file replicas).
    pub async fn head_ltx(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<LtxObjectInfo, StoreError> {
        let (key, res) = self.head(db_path, level, min_txid, max_txid).await?;
        let timestamp = res
            .attributes
            .get(&Attribute::Metadata(METADATA_KEY_TIMESTAMP.into()))
            .and_then(|v| parse_rfc3339(v.as_ref()))
            .unwrap_or_else(|| res.meta.last_modified.into());
        Ok(LtxObjectInfo {
            level,
            min_txid,
            max_txid,
            size: res.meta.size,
            timestamp,
            key,
        })
    }

    /// Lists a database's LTX objects at one level, in ascending order of min TXID. On S3 the
    /// timestamps are Last-Modified (one LIST, no HEADs); use [`ReplicaStore::head_ltx`] for
    /// the `litestream-timestamp` metadata.
    pub async fn list_ltx(
        &self,
        db_path: &str,
        level: u8,
    ) -> Result<Vec<LtxObjectInfo>, StoreError> {
        check_db_path(db_path)?;
        let dir = self.layout.level_key(&self.root, db_path, level);
        let prefix = self.object_path(&dir)?;
        let metas = self.list_all(&dir, &prefix).await?;
        let mut out: Vec<LtxObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string();
                let name = key.strip_prefix(&dir)?.strip_prefix('/')?;
                let (min_txid, max_txid) = parse_ltx_object_name(name)?;
                Some(LtxObjectInfo::listed(level, min_txid, max_txid, key, &m))
            })
            .collect();
        out.sort_by_key(|i| (i.min_txid, i.max_txid));
        Ok(out)
    }

    async fn list_all(
        &self,
        what: &str,
        prefix: &ObjectPath,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        Counters::bump(&self.counters.list);
        let prefix = if prefix.as_ref().is_empty() {
            None
        } else {
            Some(prefix)
        };
        let res: Result<Vec<ObjectMeta>, _> = self.store.list(prefix).try_collect().await;
        match res {
            Ok(v) => Ok(v),
            // A file replica whose directory does not exist yet holds nothing.
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.request_error("LIST", &format!("{what}/"), e)),
        }
    }

    /// Deletes an LTX object. Deleting a missing object succeeds.
    pub async fn delete_ltx(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<(), StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        Counters::bump(&self.counters.delete);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.request_error("DELETE", &key, e)),
        }
    }

    /// Lists a database's LTX objects at every level with one LIST request, sorted by level
    /// and TXIDs. Timestamps are as in [`ReplicaStore::list_ltx`] (Last-Modified on S3).
    pub async fn list_db_ltx(&self, db_path: &str) -> Result<Vec<LtxObjectInfo>, StoreError> {
        check_db_path(db_path)?;
        let dir = join_key(&[&self.root, db_path]);
        let prefix = self.object_path(&dir)?;
        let metas = self.list_all(&dir, &prefix).await?;
        let mut out: Vec<LtxObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.to_string();
                let rel = if dir.is_empty() {
                    key.as_str()
                } else {
                    key.strip_prefix(&dir)?.strip_prefix('/')?
                };
                let (db, level, min_txid, max_txid) = self.layout.parse_key(rel)?;
                if !db.is_empty() {
                    return None;
                }
                Some(LtxObjectInfo::listed(level, min_txid, max_txid, key, &m))
            })
            .collect();
        out.sort_by_key(|i| (i.level, i.min_txid, i.max_txid));
        Ok(out)
    }

    /// Deletes the object at `key` (relative to the bucket or replica directory), such as a
    /// verification record. Deleting a missing object succeeds.
    pub async fn delete_object(&self, key: &str) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.delete);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.request_error("DELETE", key, e)),
        }
    }

    /// The database paths (relative to the replica root; "" for a single database at the
    /// root) that hold at least one LTX object, sorted.
    pub async fn list_databases(&self) -> Result<Vec<String>, StoreError> {
        let root = self.object_path(&self.root)?;
        let metas = self.list_all(&self.root, &root).await?;
        let mut dbs: Vec<String> = metas
            .iter()
            .filter_map(|m| {
                let key = m.location.as_ref();
                let rel = if self.root.is_empty() {
                    key
                } else {
                    key.strip_prefix(&self.root)?.strip_prefix('/')?
                };
                self.layout.parse_key(rel).map(|(db, ..)| db)
            })
            .collect();
        dbs.sort();
        dbs.dedup();
        Ok(dbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn s3(u: ReplicaUrl) -> S3Url {
        match u {
            ReplicaUrl::S3(u) => u,
            other => panic!("not s3: {other:?}"),
        }
    }

    #[test]
    fn parses_file_urls() {
        let u = ReplicaUrl::parse_with_env("file:///var/lib/replica/", env_of(&[])).unwrap();
        assert_eq!(
            u,
            ReplicaUrl::File(FileUrl {
                dir: PathBuf::from("/var/lib/replica")
            })
        );
        assert_eq!(u.to_string(), "file:///var/lib/replica");
        let u = ReplicaUrl::parse_with_env("/srv/r", env_of(&[])).unwrap();
        assert_eq!(u.to_string(), "file:///srv/r");
        for bad in [
            "file://relative/dir",
            "file:///",
            "file:///a?x=1",
            "file:///a/../b",
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&[])).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::InvalidUrl, "{bad}");
            assert!(!e.to_string().contains('\n'));
            assert!(e.to_string().contains("file:///"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_s3_urls_with_litestream_query_keys() {
        let u = s3(ReplicaUrl::parse_with_env(
            "s3://bkt/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-west-3&forcePathStyle=true",
            env_of(&[]),
        )
        .unwrap());
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix, "some/prefix");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region, "eu-west-3");
        assert!(u.force_path_style);
        assert!(!u.skip_verify);
        assert!(u.credentials.is_none());

        // Defaults: AWS itself, us-east-1, virtual-hosted style.
        let u = s3(ReplicaUrl::parse_with_env("s3://bkt", env_of(&[])).unwrap());
        assert_eq!(u.prefix, "");
        assert_eq!(u.endpoint, None);
        assert_eq!(u.region, DEFAULT_REGION);
        assert!(!u.force_path_style);

        // A custom endpoint defaults to path style, unless told otherwise (as Litestream).
        let u = s3(
            ReplicaUrl::parse_with_env("s3://b/p?endpoint=localhost:9000", env_of(&[])).unwrap(),
        );
        assert_eq!(u.endpoint.as_deref(), Some("http://localhost:9000"));
        assert!(u.force_path_style);
        let u = s3(ReplicaUrl::parse_with_env(
            "s3://b/p?endpoint=minio.example.com&force-path-style=false&skip-verify=yes",
            env_of(&[]),
        )
        .unwrap());
        assert_eq!(u.endpoint.as_deref(), Some("https://minio.example.com"));
        assert!(!u.force_path_style);
        assert!(u.skip_verify);

        // Performance-only Litestream keys are accepted.
        ReplicaUrl::parse_with_env("s3://b/p?concurrency=4&partSize=5242880", env_of(&[])).unwrap();
    }

    #[test]
    fn s3_settings_come_from_env_and_query_wins() {
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
            ("AWS_SESSION_TOKEN", "session-token-value"),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1111"),
        ]);
        let u = s3(ReplicaUrl::parse_with_env("s3://b/p", &env).unwrap());
        assert_eq!(u.region, "ap-south-1");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:1111"));
        assert!(u.force_path_style);
        let c = u.credentials.clone().unwrap();
        assert_eq!(c.access_key_id, "AKIAEXAMPLEKEY");
        assert_eq!(c.secret_access_key.expose(), "very-secret-value");

        let u2 = s3(ReplicaUrl::parse_with_env(
            "s3://b/p?endpoint=http://127.0.0.1:2222&region=us-west-2",
            &env,
        )
        .unwrap());
        assert_eq!(u2.region, "us-west-2");
        assert_eq!(u2.endpoint.as_deref(), Some("http://127.0.0.1:2222"));

        let e = ReplicaUrl::parse_with_env("s3://b/p", env_of(&[("AWS_ACCESS_KEY_ID", "x")]))
            .unwrap_err();
        assert!(e.to_string().contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    }

    #[test]
    fn secrets_are_redacted() {
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
            ("AWS_SESSION_TOKEN", "session-token-value"),
        ]);
        let u =
            ReplicaUrl::parse_with_env("s3://b/p?endpoint=http://127.0.0.1:9000", &env).unwrap();
        for shown in [format!("{u:?}"), format!("{u:#?}"), u.to_string()] {
            assert!(!shown.contains("very-secret-value"), "{shown}");
            assert!(!shown.contains("session-token-value"), "{shown}");
            assert!(!shown.contains("EXAMPLEKEY"), "{shown}");
        }
        // Credentials inside the endpoint are refused, and errors never echo them.
        for bad in [
            "s3://b/p?endpoint=http://user:endpoint-password@127.0.0.1:9000",
            "s3://b/p?endpoint=http://user:endpoint-password@127.0.0.1:9000&bogus=1",
            "s3://b/p?endpoint=http://user:endpoint-password@127.0.0.1:9000&skipVerify=2",
        ] {
            let e = ReplicaUrl::parse_with_env(bad, &env).unwrap_err();
            assert!(!e.to_string().contains("endpoint-password"), "{e}");
            assert!(e.to_string().contains("<redacted>"), "{e}");
        }
        assert!(format!("{u:?}").contains("<redacted>"));
        let store = ReplicaStore::open(&u).unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("session-token-value"), "{shown}");

        let e = ReplicaUrl::parse_with_env("s3://key:secret-in-url@b/p", env_of(&[])).unwrap_err();
        assert!(!e.to_string().contains("secret-in-url"), "{e}");
    }

    #[test]
    fn bad_s3_urls_say_what_to_do() {
        for (bad, hint) in [
            ("s3:///prefix", "s3://bucket/prefix"),
            ("s3://b/p?endpoint=ftp://x", "http://"),
            ("s3://b/p?forcePathStyle=maybe", "forcePathStyle=true"),
            ("s3://b/p?regoin=us-east-1", "known keys"),
            ("s3://b/p?sseKmsKeyId=abc", "remove it"),
            ("s3://b:9000/p", "endpoint="),
            ("gs://b/p", "s3://bucket/prefix"),
            ("b/p", "s3://bucket/prefix"),
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&[])).unwrap_err();
            assert!(e.to_string().contains(hint), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: {e}");
        }
    }

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
    fn rfc3339_nano_matches_go() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(format_rfc3339_nano(t), "2023-11-14T22:13:20.123Z");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_rfc3339_nano(t0), "2023-11-14T22:13:20Z");
        let t1 = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(format_rfc3339_nano(t1), "2023-11-14T22:13:20.12Z");
        let tn = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 1);
        assert_eq!(format_rfc3339_nano(tn), "2023-11-14T22:13:20.000000001Z");
        for t in [t, t0, t1, tn] {
            assert_eq!(parse_rfc3339(&format_rfc3339_nano(t)), Some(t));
        }
        assert_eq!(parse_rfc3339("2023-11-14T23:13:20.123+01:00"), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
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

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn file_replica_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("replica");
        let url = ReplicaUrl::parse(&format!("file://{}", dir.display())).unwrap();
        let store = ReplicaStore::open(&url).unwrap();
        assert_eq!(store.requests(), RequestCounts::default());
        rt().block_on(async {
            // An empty replica lists nothing.
            assert!(store.list_ltx("", 0).await.unwrap().is_empty());
            assert!(store.list_databases().await.unwrap().is_empty());

            let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
            let body = Bytes::from_static(b"LTX1 not really an ltx file");
            let info = store.put_ltx("", 0, 1, 1, body.clone(), ts).await.unwrap();
            assert_eq!(info.key, "ltx/0/0000000000000001-0000000000000001.ltx");
            store
                .put_ltx("", 0, 2, 3, Bytes::from_static(b"second"), ts)
                .await
                .unwrap();
            store
                .put_ltx("", 9, 1, 3, Bytes::from_static(b"snapshot"), ts)
                .await
                .unwrap();
            store
                .put_ltx("sub dir/app.db", 1, 5, 7, Bytes::from_static(b"nested"), ts)
                .await
                .unwrap();

            // The layout on disk is Litestream's, with the mtime as the timestamp.
            let on_disk = dir.join("ltx/0/0000000000000001-0000000000000001.ltx");
            assert_eq!(std::fs::read(&on_disk).unwrap(), body.as_ref());
            assert_eq!(std::fs::metadata(&on_disk).unwrap().modified().unwrap(), ts);
            assert!(dir
                .join("sub dir/app.db/ltx/1/0000000000000005-0000000000000007.ltx")
                .is_file());
            // Nothing but the objects (no temporary files left).
            let names: Vec<_> = std::fs::read_dir(dir.join("ltx/0"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");

            let l0 = store.list_ltx("", 0).await.unwrap();
            assert_eq!(
                l0.iter()
                    .map(|i| (i.min_txid, i.max_txid))
                    .collect::<Vec<_>>(),
                vec![(1, 1), (2, 3)]
            );
            assert_eq!(l0[0].size, body.len() as u64);
            assert_eq!(l0[0].timestamp, ts);
            assert_eq!(l0[0].level, 0);
            assert_eq!(l0[1].key, "ltx/0/0000000000000002-0000000000000003.ltx");
            assert_eq!(store.list_ltx("", 9).await.unwrap().len(), 1);
            assert_eq!(store.list_ltx("sub dir/app.db", 1).await.unwrap().len(), 1);
            assert!(store.list_ltx("", 1).await.unwrap().is_empty());

            assert_eq!(
                store.list_databases().await.unwrap(),
                vec![String::new(), "sub dir/app.db".to_string()]
            );

            assert_eq!(store.get_ltx("", 0, 1, 1).await.unwrap(), body);
            let head = store.head_ltx("", 0, 1, 1).await.unwrap();
            assert_eq!(head, l0[0]);

            let missing = store.get_ltx("", 0, 4, 4).await.unwrap_err();
            assert!(missing.is_not_found(), "{missing}");
            assert!(
                missing
                    .to_string()
                    .contains("ltx/0/0000000000000004-0000000000000004.ltx"),
                "{missing}"
            );

            store.delete_ltx("", 0, 1, 1).await.unwrap();
            store.delete_ltx("", 0, 1, 1).await.unwrap(); // idempotent
            assert_eq!(store.list_ltx("", 0).await.unwrap().len(), 1);
            assert!(store.get_ltx("", 0, 1, 1).await.unwrap_err().is_not_found());

            let c = store.requests();
            assert_eq!(c.put, 4);
            assert_eq!(c.delete, 2);
            assert_eq!(c.get, 3);
            assert_eq!(c.head, 1);
            assert_eq!(c.list, 8);
        });
    }
}
