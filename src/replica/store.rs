//! The object store of one replica, in Litestream 0.5's object layout.
//!
//! This module owns [`ReplicaStore`]: put, get, head, list and delete of LTX objects on top
//! of `object_store` (`LocalFileSystem` for file replicas, `AmazonS3` for S3 and
//! S3-compatibles, `MicrosoftAzure` for Azure Blob Storage, `GoogleCloudStorage` for GCS),
//! with retries and backoff, and counters of requests by kind. It opens the store a
//! [`ReplicaUrl`] (`super::url`) names.
//!
//! Objects are laid out as [`Layout`] (`super::layout`) says; Azure and GCS replicas use
//! the S3 layout, as Litestream does. Each carries its LTX timestamp as Litestream 0.5
//! writes it: the file's mtime on a file replica, the object metadata
//! `litestream-timestamp` (Go's RFC3339Nano, UTC) on S3 and GCS, `litestreamtimestamp` on
//! Azure (whose metadata names cannot hold a hyphen).
//!
//! With a [`Keyring`] ([`ReplicaStore::with_keyring`], `--encryption-key-file`) the store
//! encrypts the body of every object it puts (LTX objects, verification records and
//! deletion markers; `super::crypt` owns the format) and the verification record in an
//! object's metadata, names the key in the metadata `walfs-key-id` (Azure `walfskeyid`),
//! and decrypts on get, so the code above it sees plaintext only. The lease
//! ([`ReplicaStore::put_if`], [`ReplicaStore::get_with_etag`]) stays plaintext.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, GetResult,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    RetryConfig, UpdateVersion, WriteMultipart,
};

use crate::ltx::parse_ltx_object_name;

use super::crypt::{self, CryptError, Encryptor, Keyring};
use super::error::{StoreError, StoreErrorKind};
use super::layout::{check_db_path, join_key, Layout};
use super::timestamp::{format_rfc3339_nano, parse_rfc3339};
use super::url::{AzureCredentials, GcsCredentials, ReplicaUrl};

/// The S3 and GCS object metadata key that holds an LTX file's timestamp (Litestream's
/// `MetadataKeyTimestamp`).
pub const METADATA_KEY_TIMESTAMP: &str = "litestream-timestamp";
/// S3 and GCS object metadata holding walfs's verification record of the object's max
/// TXID (FORMAT.md); Litestream ignores it.
pub const METADATA_KEY_RECORD: &str = "walfs-record";
/// [`METADATA_KEY_TIMESTAMP`] on Azure, whose metadata names are C# identifiers (Litestream's
/// `abs.MetadataKeyTimestamp`).
pub const AZURE_METADATA_KEY_TIMESTAMP: &str = "litestreamtimestamp";
/// [`METADATA_KEY_RECORD`] on Azure.
pub const AZURE_METADATA_KEY_RECORD: &str = "walfsrecord";
/// S3 and GCS object metadata naming the key an encrypted object was encrypted with (its
/// id, 16 hex digits; the body's header names it too).
pub const METADATA_KEY_KEY_ID: &str = "walfs-key-id";
/// [`METADATA_KEY_KEY_ID`] on Azure.
pub const AZURE_METADATA_KEY_KEY_ID: &str = "walfskeyid";

/// Which service a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A local directory.
    File,
    /// S3 or an S3-compatible service.
    S3,
    /// Azure Blob Storage (or Azurite).
    Azure,
    /// Google Cloud Storage.
    Gcs,
}

impl Backend {
    /// The URL scheme, which also names the store in messages.
    pub fn scheme(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::S3 => "s3",
            Backend::Azure => "abs",
            Backend::Gcs => "gs",
        }
    }

    /// The metadata key of an LTX object's timestamp.
    fn timestamp_key(self) -> &'static str {
        match self {
            Backend::Azure => AZURE_METADATA_KEY_TIMESTAMP,
            _ => METADATA_KEY_TIMESTAMP,
        }
    }

    /// The metadata key of an LTX object's verification record.
    fn record_key(self) -> &'static str {
        match self {
            Backend::Azure => AZURE_METADATA_KEY_RECORD,
            _ => METADATA_KEY_RECORD,
        }
    }

    /// The metadata key of an encrypted object's key id.
    pub fn key_id_key(self) -> &'static str {
        match self {
            Backend::Azure => AZURE_METADATA_KEY_KEY_ID,
            _ => METADATA_KEY_KEY_ID,
        }
    }
}

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
    backend: Backend,
    /// The key prefix inside the store ("" for file replicas, whose store is rooted at the
    /// directory).
    root: String,
    /// How errors name this store, e.g. `s3://bucket`, `abs://account@container` or
    /// `file:///dir`.
    base: String,
    counters: Arc<Counters>,
    /// Closes the store's writes when this mount's lease on the replica lapses
    /// (`super::lease`); none for stores that only read.
    fence: Option<Arc<Fence>>,
    /// Encrypts what is put and decrypts what is got; none for a plaintext replica.
    keyring: Option<Arc<Keyring>>,
}

/// A gate on a store's writes (PUT and DELETE): open while this mount holds its lease on
/// the replica (`super::lease`), closed when the lease was lost to another mount, or
/// until a renewal succeeds again after one was due. Reads are never fenced.
#[derive(Debug, Default)]
pub struct Fence {
    /// Milliseconds since the Unix epoch until which writes may go.
    open_until_ms: AtomicU64,
    lost: AtomicBool,
    /// A write was attempted since the lease last looked: it is renewed only while the
    /// replica is written, so an idle mount makes no request.
    demand: AtomicBool,
}

impl Fence {
    /// Opens the gate until `until`.
    pub fn open_until(&self, until: SystemTime) {
        let ms = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.open_until_ms.store(ms, Ordering::Release);
    }

    /// Opens the gate for as long as the process runs (a lock that cannot lapse).
    pub fn open_forever(&self) {
        self.open_until_ms.store(u64::MAX, Ordering::Release);
    }

    /// Closes the gate for good: another mount holds the lease now.
    pub fn close_lost(&self) {
        self.lost.store(true, Ordering::Release);
    }

    /// Whether the lease was lost to another mount.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Whether a write was attempted since the last call.
    pub fn take_demand(&self) -> bool {
        self.demand.swap(false, Ordering::AcqRel)
    }

    /// Whether writes may go now.
    pub fn is_open(&self) -> bool {
        self.closed().is_none()
    }

    /// Why writes may not go now, if they may not.
    fn closed(&self) -> Option<&'static str> {
        if self.is_lost() {
            return Some("another mount took over this replica's lease");
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (now >= self.open_until_ms.load(Ordering::Acquire))
            .then_some("this mount's lease on the replica could not be renewed in time")
    }
}

/// The HTTP client settings of a cloud store.
fn client_options(tuning: &StoreTuning) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(tuning.connect_timeout)
        .with_timeout(tuning.request_timeout)
}

/// The retries of a cloud store.
fn retry_config(tuning: &StoreTuning) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: tuning.init_backoff,
            max_backoff: tuning.max_backoff,
            base: 2.0,
        },
        max_retries: tuning.max_retries,
        retry_timeout: tuning.retry_timeout,
    }
}

/// The outcome of a conditional PUT ([`ReplicaStore::put_if`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conditional {
    /// Written; the object's new ETag.
    Written(String),
    /// Not written: the object exists (a create) or has changed (an update).
    Conflict,
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
                    .caused_by(e)
                })?;
                let local = LocalFileSystem::new_with_prefix(&u.dir)
                    .map_err(|e| {
                        StoreError::new(
                            StoreErrorKind::Request,
                            format!("cannot open replica directory {}: {e}", u.dir.display()),
                        )
                        .caused_by(e)
                    })?
                    .with_fsync(true);
                let local = Arc::new(local);
                Ok(ReplicaStore {
                    store: local.clone(),
                    local: Some(local),
                    layout: Layout::File,
                    backend: Backend::File,
                    root: String::new(),
                    base: format!("file://{}", u.dir.display()),
                    counters: Arc::default(),
                    fence: None,
                    keyring: None,
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
                    .caused_by(e)
                })?;
                Ok(ReplicaStore {
                    store: Arc::new(s3),
                    local: None,
                    layout: Layout::S3,
                    backend: Backend::S3,
                    root: u.prefix.clone(),
                    base: format!("s3://{}", u.bucket),
                    counters: Arc::default(),
                    fence: None,
                    keyring: None,
                })
            }
            ReplicaUrl::Abs(u) => {
                let mut client = client_options(tuning);
                // The environment's other AZURE_* settings (a service principal, managed
                // identity, ...) first; what the URL names wins.
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_account(&u.account)
                    .with_container_name(&u.container)
                    .with_retry(retry_config(tuning));
                if let Some(e) = &u.endpoint {
                    if e.starts_with("http://") {
                        client = client.with_allow_http(true);
                    }
                    b = b.with_endpoint(e.clone());
                }
                match &u.credentials {
                    AzureCredentials::AccessKey(k) => b = b.with_access_key(k.expose()),
                    AzureCredentials::Sas(t) => {
                        b = b.with_config(object_store::azure::AzureConfigKey::SasKey, t.expose())
                    }
                    AzureCredentials::Environment => {}
                }
                let azure = b.with_client_options(client).build().map_err(|e| {
                    StoreError::url(format!(
                        "cannot configure the Azure client for {url}: {e}; check \
                         AZURE_STORAGE_ACCOUNT_KEY (base64, as the portal shows it) or \
                         AZURE_STORAGE_SAS_TOKEN"
                    ))
                    .caused_by(e)
                })?;
                Ok(ReplicaStore {
                    store: Arc::new(azure),
                    local: None,
                    layout: Layout::S3,
                    backend: Backend::Azure,
                    root: u.prefix.clone(),
                    base: format!("abs://{}@{}", u.account, u.container),
                    counters: Arc::default(),
                    fence: None,
                    keyring: None,
                })
            }
            ReplicaUrl::Gs(u) => {
                let mut client = client_options(tuning);
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&u.bucket)
                    .with_retry(retry_config(tuning));
                if let Some(e) = &u.endpoint {
                    if e.starts_with("http://") {
                        client = client.with_allow_http(true);
                    }
                    b = b.with_base_url(e);
                }
                match &u.credentials {
                    GcsCredentials::ServiceAccountFile(p) => {
                        b = b.with_service_account_path(p.display().to_string())
                    }
                    GcsCredentials::ServiceAccountKey(k) => {
                        b = b.with_service_account_key(k.expose())
                    }
                    GcsCredentials::ApplicationDefault(Some(p)) => {
                        b = b.with_application_credentials(p.display().to_string())
                    }
                    GcsCredentials::ApplicationDefault(None) => {}
                    GcsCredentials::Anonymous => {
                        // object_store 0.14 skips the signature of LISTs only: give every
                        // other request an empty bearer token, not the metadata server's.
                        b = b.with_skip_signature(true).with_credentials(Arc::new(
                            object_store::StaticCredentialProvider::new(
                                object_store::gcp::GcpCredential {
                                    bearer: String::new(),
                                },
                            ),
                        ))
                    }
                }
                let gcs = b.with_client_options(client).build().map_err(|e| {
                    StoreError::url(format!(
                        "cannot configure the GCS client for {url}: {e}; check the service \
                         account key that GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_SERVICE_ACCOUNT \
                         or GOOGLE_SERVICE_ACCOUNT_KEY gives"
                    ))
                    .caused_by(e)
                })?;
                Ok(ReplicaStore {
                    store: Arc::new(gcs),
                    local: None,
                    layout: Layout::S3,
                    backend: Backend::Gcs,
                    root: u.prefix.clone(),
                    base: format!("gs://{}", u.bucket),
                    counters: Arc::default(),
                    fence: None,
                    keyring: None,
                })
            }
        }
    }

    /// The service this store talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The layout this store writes.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether this mount lost its lease on the replica to another mount: it writes
    /// nothing to it any more.
    pub fn lease_lost(&self) -> bool {
        self.fence.as_deref().is_some_and(Fence::is_lost)
    }

    /// This store encrypting what it puts with `keyring`'s current key and decrypting
    /// what it gets with any of its keys; with `None`, a plaintext store that refuses
    /// encrypted objects, naming the key they need.
    pub fn with_keyring(mut self, keyring: Option<Arc<Keyring>>) -> Self {
        self.keyring = keyring;
        self
    }

    /// The keys this store encrypts and decrypts with, if any.
    pub fn keyring(&self) -> Option<&Arc<Keyring>> {
        self.keyring.as_ref()
    }

    /// What an LTX object's encryption is bound to: its level and TXIDs (not its database
    /// path, so that a database's own replica URL reads it too).
    fn ltx_context(level: u8, min_txid: u64, max_txid: u64) -> String {
        format!("ltx {level} {min_txid:016x}-{max_txid:016x}")
    }

    /// What the encryption of an LTX object's verification record (in its metadata) is
    /// bound to.
    fn record_context(level: u8, min_txid: u64, max_txid: u64) -> String {
        format!("record {level} {min_txid:016x}-{max_txid:016x}")
    }

    /// What the encryption of another object (a verification record or deletion marker)
    /// is bound to: its key from the `walfs/` directory on (`walfs/checksums/<txid>`,
    /// `walfs/deleted`), or the whole key.
    fn object_context(key: &str) -> String {
        let tail = key.rfind("walfs/").map_or(key, |i| &key[i..]);
        format!("object {tail}")
    }

    /// The one-line error of an object that could not be decrypted.
    fn crypt_error(&self, key: &str, e: CryptError) -> StoreError {
        let kind = match e {
            CryptError::KeyNeeded { .. } => StoreErrorKind::KeyNeeded,
            CryptError::Random(_) => StoreErrorKind::Request,
            _ => StoreErrorKind::Unauthentic,
        };
        let what = match kind {
            StoreErrorKind::Unauthentic if !matches!(e, CryptError::NotEncrypted) => {
                "; restore an earlier --txid or --timestamp, or from another replica"
            }
            _ => "",
        };
        StoreError::new(kind, format!("object {}/{key} {e}{what}", self.base)).caused_by(e)
    }

    /// Decrypts `body`, the object at `key` bound to `context`: as it is when it is
    /// plaintext and the store has no keys.
    fn open_body(&self, key: &str, context: &str, body: Bytes) -> Result<Bytes, StoreError> {
        match crypt::decrypt(self.keyring.as_deref(), context.as_bytes(), &body) {
            Ok(Some(plain)) => Ok(Bytes::from(plain)),
            Ok(None) => Ok(body),
            Err(e) => Err(self.crypt_error(key, e)),
        }
    }

    /// Encrypts `body` for `key` bound to `context` if the store has keys.
    fn seal_body(&self, key: &str, context: &str, body: Bytes) -> Result<Bytes, StoreError> {
        match &self.keyring {
            None => Ok(body),
            Some(ring) => crypt::encrypt(ring.current(), context.as_bytes(), &body)
                .map(Bytes::from)
                .map_err(|e| self.crypt_error(key, e)),
        }
    }

    /// This store with its writes gated by `fence`.
    pub fn fenced(mut self, fence: Arc<Fence>) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Fails a write to `key` while the fence is closed. The caller keeps what it meant to
    /// write (the uploader retries staged transactions later).
    fn check_fence(&self, op: &str, key: &str) -> Result<(), StoreError> {
        if let Some(f) = &self.fence {
            f.demand.store(true, Ordering::Release);
        }
        match self.fence.as_deref().and_then(Fence::closed) {
            None => Ok(()),
            Some(why) => Err(StoreError::new(
                StoreErrorKind::Fenced,
                format!(
                    "{} {op} of {}/{key} not sent: {why}; what is staged stays staged",
                    self.kind_name(),
                    self.base
                ),
            )),
        }
    }

    /// Downloads the object at `key` with its ETag (on GCS its generation): the tag that
    /// [`ReplicaStore::put_if`] takes.
    pub async fn get_with_etag(&self, key: &str) -> Result<(Bytes, Option<String>), StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.get);
        let res = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.request_error("GET", key, e))?;
        // GCS makes conditional writes on the object's generation, not its ETag.
        let etag = match self.backend {
            Backend::Gcs => res.meta.version.clone(),
            _ => res.meta.e_tag.clone(),
        };
        let bytes = res
            .bytes()
            .await
            .map_err(|e| self.request_error("GET", key, e))?;
        Ok((bytes, etag))
    }

    /// Writes `bytes` to `key` only if the object does not exist (`expected` None: S3's and
    /// Azure's `If-None-Match: *`, GCS's generation 0) or still has the tag `expected` (the
    /// ETag with `If-Match`; on GCS the generation). Not fenced: the lease itself is
    /// written with it.
    pub async fn put_if(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&str>,
    ) -> Result<Conditional, StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.put);
        let mode = match expected {
            None => PutMode::Create,
            Some(e) if self.backend == Backend::Gcs => PutMode::Update(UpdateVersion {
                e_tag: None,
                version: Some(e.to_string()),
            }),
            Some(e) => PutMode::Update(UpdateVersion {
                e_tag: Some(e.to_string()),
                version: None,
            }),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(r) => Ok(Conditional::Written(
                match self.backend {
                    Backend::Gcs => r.version,
                    _ => r.e_tag,
                }
                .unwrap_or_default(),
            )),
            // Every backend's "precondition failed" (S3 and Azure 412, Azurite 409, GCS 412
            // on its generation match) arrives as one of these two.
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(Conditional::Conflict),
            Err(e) => Err(self.request_error("PUT", key, e)),
        }
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
            .caused_by(e)
        })
    }

    fn kind_name(&self) -> &'static str {
        self.backend.scheme()
    }

    fn hint(&self) -> &'static str {
        match self.backend {
            Backend::File => "check that the replica directory exists and is writable",
            Backend::S3 => "check the credentials, endpoint, region and bucket",
            Backend::Azure => {
                "check AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN), the account, \
                 the endpoint and that the container exists"
            }
            Backend::Gcs => {
                "check GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT), the endpoint \
                 and the bucket"
            }
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
        .caused_by(e)
    }

    /// The S3 prefix of the replica ("" for file replicas, whose directory is the root).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Uploads `bytes` to `key` (relative to the bucket or replica directory) atomically.
    /// For objects that are not LTX files, such as walfs's verification records.
    /// With keys, the body is encrypted ([`ReplicaStore::with_keyring`]).
    pub async fn put_object(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.object_path(key)?;
        self.check_fence("PUT", key)?;
        let bytes = self.seal_body(key, &Self::object_context(key), bytes)?;
        let opts = PutOptions {
            attributes: self.key_id_attributes(),
            ..PutOptions::default()
        };
        Counters::bump(&self.counters.put);
        self.store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
            .map(drop)
            .map_err(|e| self.request_error("PUT", key, e))
    }

    /// Downloads the object at `key` (put by [`ReplicaStore::put_object`]), decrypted; an
    /// error of kind NotFound if there is none.
    pub async fn get_object(&self, key: &str) -> Result<Bytes, StoreError> {
        let (bytes, _) = self.get_with_etag(key).await?;
        self.open_body(key, &Self::object_context(key), bytes)
    }

    /// Downloads the object at `key`, decrypted, with its ETag, unless its ETag is still
    /// `etag` (a conditional GET: `None` when it has not changed, at the cost of one
    /// request and no body). An error of kind NotFound if there is none.
    pub async fn get_object_if_changed(
        &self,
        key: &str,
        etag: Option<&str>,
    ) -> Result<Option<(Bytes, Option<String>)>, StoreError> {
        let path = self.object_path(key)?;
        Counters::bump(&self.counters.get);
        let opts = GetOptions {
            if_none_match: etag.map(str::to_string),
            ..GetOptions::default()
        };
        let res = match self.store.get_opts(&path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotModified { .. }) => return Ok(None),
            Err(e) => return Err(self.request_error("GET", key, e)),
        };
        let tag = res.meta.e_tag.clone();
        let bytes = res
            .bytes()
            .await
            .map_err(|e| self.request_error("GET", key, e))?;
        // A store that ignores If-None-Match sends the body again: unchanged all the same.
        if tag.is_some() && tag.as_deref() == etag {
            return Ok(None);
        }
        let plain = self.open_body(key, &Self::object_context(key), bytes)?;
        Ok(Some((plain, tag)))
    }

    /// The metadata naming the key an object is encrypted with (none without keys, or on
    /// a file replica, whose bodies' headers name it).
    fn key_id_attributes(&self) -> Attributes {
        let mut attrs = Attributes::new();
        if let (Some(ring), Layout::S3) = (&self.keyring, self.layout) {
            attrs.insert(
                Attribute::Metadata(self.backend.key_id_key().into()),
                AttributeValue::from(ring.current().id().to_string()),
            );
        }
        attrs
    }

    /// The replica's address without credentials, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The replica's name for metrics and `walfs status`: `s3://bucket/prefix` or
    /// `file:///dir`, without query parameters or credentials.
    pub fn name(&self) -> String {
        match self.root.trim_matches('/') {
            "" => self.base.clone(),
            root => format!("{}/{root}", self.base.trim_end_matches('/')),
        }
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
        let (key, res) = self.head(db_path, level, min_txid, max_txid).await?;
        let Some(value) = res
            .attributes
            .get(&Attribute::Metadata(self.backend.record_key().into()))
        else {
            return Ok(None);
        };
        let context = Self::record_context(level, min_txid, max_txid);
        crypt::open_text(self.keyring.as_deref(), context.as_bytes(), value.as_ref())
            .map(Some)
            .map_err(|e| {
                self.crypt_error(
                    &format!("{key} (its metadata {})", self.backend.record_key()),
                    e,
                )
            })
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
            .caused_by(e)
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
        self.check_fence("PUT", &key)?;
        let mut attrs = self.key_id_attributes();
        if self.layout == Layout::S3 {
            attrs.insert(
                Attribute::Metadata(self.backend.timestamp_key().into()),
                AttributeValue::from(format_rfc3339_nano(timestamp)),
            );
            if let Some(r) = record {
                let r = match &self.keyring {
                    None => r,
                    Some(ring) => crypt::seal_text(
                        ring.current(),
                        Self::record_context(level, min_txid, max_txid).as_bytes(),
                        &r,
                    )
                    .map_err(|e| self.crypt_error(&key, e))?,
                };
                attrs.insert(
                    Attribute::Metadata(self.backend.record_key().into()),
                    AttributeValue::from(r),
                );
            }
        }
        let context = Self::ltx_context(level, min_txid, max_txid);
        Counters::bump(&self.counters.put);
        let size = match source {
            LtxSource::Bytes(bytes) => {
                let bytes = self.seal_body(&key, &context, bytes)?;
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
            LtxSource::File(file, plain_size) => {
                let mut encryptor = match &self.keyring {
                    None => None,
                    Some(ring) => Some(
                        Encryptor::new(ring.current(), context.as_bytes())
                            .map_err(|e| self.crypt_error(&key, e))?,
                    ),
                };
                let size = match encryptor {
                    None => plain_size,
                    Some(_) => crypt::encrypted_len(plain_size),
                };
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
                    // The ciphertext of one buffer (a buffer and its tags).
                    let mut sealed = Vec::new();
                    if let Some(e) = &encryptor {
                        w.write(e.header());
                    }
                    loop {
                        w.wait_for_capacity(MULTIPART_IN_FLIGHT)
                            .await
                            .map_err(|e| self.request_error("PUT", &key, e))?;
                        let n = std::io::Read::read(&mut f, &mut buf).map_err(staged_err)?;
                        match encryptor.as_mut() {
                            None if n == 0 => return Ok(()),
                            None => w.write(&buf[..n]),
                            Some(_) if n == 0 => {
                                let e = encryptor.take().expect("matched Some");
                                sealed.clear();
                                e.finish(&mut sealed)
                                    .map_err(|e| self.crypt_error(&key, e))?;
                                w.write(&sealed);
                                return Ok(());
                            }
                            Some(e) => {
                                sealed.clear();
                                e.push(&buf[..n], &mut sealed)
                                    .map_err(|e| self.crypt_error(&key, e))?;
                                w.write(&sealed);
                            }
                        }
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
            let mtime_err = |e: &dyn std::fmt::Display| {
                StoreError::new(
                    StoreErrorKind::Request,
                    format!(
                        "file PUT of {}/{key}: setting its mtime failed: {e}; {}",
                        self.base,
                        self.hint()
                    ),
                )
            };
            let res = tokio::task::spawn_blocking(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&file)?;
                f.set_times(
                    std::fs::FileTimes::new()
                        .set_modified(timestamp)
                        .set_accessed(timestamp),
                )
            })
            .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(mtime_err(&e).caused_by(e)),
                // The blocking task panicked or was cancelled.
                Err(e) => return Err(mtime_err(&e).caused_by(e)),
            }
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
        self.get_ltx_with_record(db_path, level, min_txid, max_txid)
            .await
            .map(|(body, _)| body)
    }

    /// Downloads an LTX object like [`ReplicaStore::get_ltx`], with the verification
    /// record its metadata holds (S3, Azure and GCS; a file replica keeps records beside
    /// the objects), from the same request.
    pub async fn get_ltx_with_record(
        &self,
        db_path: &str,
        level: u8,
        min_txid: u64,
        max_txid: u64,
    ) -> Result<(Bytes, Option<String>), StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        Counters::bump(&self.counters.get);
        let res = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.request_error("GET", &key, e))?;
        let record = match res
            .attributes
            .get(&Attribute::Metadata(self.backend.record_key().into()))
        {
            Some(value) if self.holds_records() => {
                let context = Self::record_context(level, min_txid, max_txid);
                Some(
                    crypt::open_text(self.keyring.as_deref(), context.as_bytes(), value.as_ref())
                        .map_err(|e| {
                        self.crypt_error(
                            &format!("{key} (its metadata {})", self.backend.record_key()),
                            e,
                        )
                    })?,
                )
            }
            _ => None,
        };
        let body = res
            .bytes()
            .await
            .map_err(|e| self.request_error("GET", &key, e))?;
        let body = self.open_body(&key, &Self::ltx_context(level, min_txid, max_txid), body)?;
        Ok((body, record))
    }

    /// Downloads the first `n` bytes of an LTX object's content (its header, say) with one
    /// ranged GET. On an encrypted replica that GET reads the object's first segment (64
    /// KiB) and decrypts it; `n` must not exceed that.
    pub async fn get_ltx_head(
        &self,
        db_path: &str,
        level: u8,
        (min_txid, max_txid): (u64, u64),
        n: usize,
    ) -> Result<Bytes, StoreError> {
        check_db_path(db_path)?;
        let key = self.ltx_key(db_path, level, min_txid, max_txid);
        let path = self.object_path(&key)?;
        // Without keys, enough for the content or for an encrypted header that names
        // the key it needs.
        let want = match self.keyring {
            Some(_) => crypt::FIRST_SEGMENT_LEN.max(n),
            None => n.max(crypt::HEADER_LEN),
        };
        Counters::bump(&self.counters.get);
        let opts = GetOptions {
            range: Some((0..want as u64).into()),
            ..GetOptions::default()
        };
        let res = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| self.request_error("GET", &key, e))?;
        let total = res.meta.size;
        let start = res
            .bytes()
            .await
            .map_err(|e| self.request_error("GET", &key, e))?;
        let context = Self::ltx_context(level, min_txid, max_txid);
        let plain = match crypt::decrypt_first_segment(
            self.keyring.as_deref(),
            context.as_bytes(),
            &start,
            total,
        ) {
            Ok(Some(plain)) => Bytes::from(plain),
            Ok(None) => start,
            Err(e) => return Err(self.crypt_error(&key, e)),
        };
        Ok(plain.slice(..n.min(plain.len())))
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
            .get(&Attribute::Metadata(self.backend.timestamp_key().into()))
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
        self.check_fence("DELETE", &key)?;
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
        self.check_fence("DELETE", key)?;
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

    #[test]
    fn a_store_shows_no_secrets() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKIAEXAMPLEKEY".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("very-secret-value".to_string()),
            "AWS_SESSION_TOKEN" => Some("session-token-value".to_string()),
            _ => None,
        };
        let u = ReplicaUrl::parse_with_env("s3://b/p?endpoint=http://127.0.0.1:9000", env).unwrap();
        let store = ReplicaStore::open(&u).unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("very-secret-value"), "{shown}");
        assert!(!shown.contains("session-token-value"), "{shown}");
    }

    #[test]
    fn azure_and_gcs_stores_use_the_s3_layout_and_show_no_secrets() {
        let key = "c2VjcmV0LWF6dXJlLWtleS1mb3ItdGhlLXN0b3JlLXRlc3Q=";
        let env = |k: &str| (k == "AZURE_STORAGE_ACCOUNT_KEY").then(|| key.to_string());
        let u = ReplicaUrl::parse_with_env(
            "abs://acct@cont/pre/fix?endpoint=http://127.0.0.1:10000/acct",
            env,
        )
        .unwrap();
        let store = ReplicaStore::open(&u).unwrap();
        assert_eq!(store.backend(), Backend::Azure);
        assert_eq!(store.layout(), Layout::S3);
        assert!(store.holds_records());
        assert_eq!(store.base(), "abs://acct@cont");
        assert_eq!(
            store.ltx_key("app.db", 1, 1, 2),
            "pre/fix/app.db/0001/0000000000000001-0000000000000002.ltx"
        );
        // Azure metadata names are C# identifiers: no hyphen (as Litestream's abs client).
        assert_eq!(Backend::Azure.timestamp_key(), "litestreamtimestamp");
        assert_eq!(Backend::Azure.record_key(), "walfsrecord");
        let shown = format!("{store:?}");
        assert!(!shown.contains(key), "{shown}");

        let u = ReplicaUrl::parse_with_env("gs://bkt/p?endpoint=http://127.0.0.1:4443", |k| {
            (k == "GOOGLE_SKIP_SIGNATURE").then(|| "true".to_string())
        })
        .unwrap();
        let store = ReplicaStore::open(&u).unwrap();
        assert_eq!(store.backend(), Backend::Gcs);
        assert_eq!(store.layout(), Layout::S3);
        assert_eq!(store.base(), "gs://bkt");
        assert_eq!(Backend::Gcs.timestamp_key(), METADATA_KEY_TIMESTAMP);
        assert_eq!(Backend::Gcs.record_key(), METADATA_KEY_RECORD);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn keyring(seeds: &[u8]) -> Option<Arc<Keyring>> {
        let mut keys = seeds.iter().map(|&seed| {
            let raw: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(29) ^ seed).collect();
            crypt::Key::parse(&raw).unwrap()
        });
        let first = keys.next().unwrap();
        Some(Arc::new(Keyring::new(first, keys)))
    }

    #[test]
    fn an_encrypted_file_replica_round_trips_and_refuses_missing_or_wrong_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("replica");
        let url = ReplicaUrl::parse(&format!("file://{}", dir.display())).unwrap();
        let plain = ReplicaStore::open(&url).unwrap();
        let k1 = plain.clone().with_keyring(keyring(&[1]));
        let id1 = k1.keyring().unwrap().current().id().to_string();
        let ts = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // A body larger than the multipart threshold streams through the encryptor.
        let big: Vec<u8> = (0..MULTIPART_THRESHOLD as usize + 100_000)
            .map(|i| (i % 253) as u8)
            .collect();
        let staged = tmp.path().join("big.ltx");
        std::fs::write(&staged, &big).unwrap();
        rt().block_on(async {
            let mut body = b"LTX1".to_vec();
            body.extend_from_slice(&[7u8; 200]);
            let info = k1
                .put_ltx("a.db", 0, 1, 2, Bytes::from(body.clone()), ts)
                .await
                .unwrap();
            assert_eq!(info.size, crypt::encrypted_len(body.len() as u64));
            let on_disk = std::fs::read(dir.join(&info.key)).unwrap();
            assert!(crypt::is_encrypted(&on_disk));
            assert!(!on_disk.windows(4).any(|w| w == b"LTX1"));
            assert_eq!(k1.get_ltx("a.db", 0, 1, 2).await.unwrap(), body);
            assert_eq!(
                k1.get_ltx_head("a.db", 0, (1, 2), 100).await.unwrap(),
                body[..100]
            );
            let big_info = k1
                .put_ltx_file("a.db", 9, (1, 2), &staged, ts, None)
                .await
                .unwrap();
            let stored = std::fs::metadata(dir.join(&big_info.key)).unwrap().len();
            assert_eq!(stored, crypt::encrypted_len(big.len() as u64));
            assert_eq!(big_info.size, stored);
            assert_eq!(k1.get_ltx("a.db", 9, 1, 2).await.unwrap(), big);
            assert_eq!(
                k1.get_ltx_head("a.db", 9, (1, 2), 100).await.unwrap(),
                big[..100]
            );
            // Records and markers are encrypted too.
            k1.put_object("a.db/walfs/deleted", Bytes::from_static(b"txid=2"))
                .await
                .unwrap();
            let raw = std::fs::read(dir.join("a.db/walfs/deleted")).unwrap();
            assert!(crypt::is_encrypted(&raw));
            assert_eq!(
                k1.get_object("a.db/walfs/deleted").await.unwrap(),
                &b"txid=2"[..]
            );

            // No key: one line naming the key id needed, on every kind of read.
            for e in [
                plain.get_ltx("a.db", 0, 1, 2).await.unwrap_err(),
                plain
                    .get_ltx_head("a.db", 9, (1, 2), 100)
                    .await
                    .unwrap_err(),
                plain.get_object("a.db/walfs/deleted").await.unwrap_err(),
            ] {
                assert_eq!(e.kind(), StoreErrorKind::KeyNeeded, "{e}");
                let m = e.to_string();
                assert!(m.contains(&id1) && m.contains("no key was given"), "{m}");
                assert!(m.contains("a.db/"), "{m}");
                assert!(!m.contains('\n'));
            }
            // A wrong key names both; with the old key given too, it reads.
            let k2 = plain.clone().with_keyring(keyring(&[2]));
            let e = k2.get_ltx("a.db", 0, 1, 2).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::KeyNeeded);
            let id2 = k2.keyring().unwrap().current().id().to_string();
            assert!(
                e.to_string().contains(&id1) && e.to_string().contains(&id2),
                "{e}"
            );
            let k21 = plain.clone().with_keyring(keyring(&[2, 1]));
            assert_eq!(k21.get_ltx("a.db", 0, 1, 2).await.unwrap(), body);

            // A bit flipped on disk fails authentication and names the object.
            let path = dir.join(&info.key);
            let mut bad = std::fs::read(&path).unwrap();
            bad[60] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            let e = k1.get_ltx("a.db", 0, 1, 2).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Unauthentic);
            assert!(e.to_string().contains(&info.key), "{e}");
            // A body moved to another object's name fails too.
            std::fs::copy(
                dir.join(&big_info.key),
                dir.join(k1.ltx_key("a.db", 9, 1, 3)),
            )
            .unwrap();
            let e = k1.get_ltx("a.db", 9, 1, 3).await.unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::Unauthentic, "{e}");
            // A plaintext object where a key is given is refused.
            plain
                .put_ltx("a.db", 0, 3, 3, Bytes::from_static(b"LTX1 plain"), ts)
                .await
                .unwrap();
            let e = k1.get_ltx("a.db", 0, 3, 3).await.unwrap_err();
            assert!(e.to_string().contains("is not encrypted"), "{e}");
        });
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
            // The cause is kept as it was; the message quotes it, so it is not the source.
            let cause = missing
                .cause()
                .and_then(|c| c.downcast_ref::<object_store::Error>());
            assert!(
                matches!(cause, Some(object_store::Error::NotFound { .. })),
                "{cause:?}"
            );
            assert!(std::error::Error::source(&missing).is_none());
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
