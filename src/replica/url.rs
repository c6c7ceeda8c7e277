//! The replica URL: where a replica lives. [`ReplicaUrl`] parses `file:///dir` (or a plain
//! absolute path), `s3://bucket/prefix?...` with Litestream's query keys,
//! `abs://ACCOUNT@CONTAINER/prefix` (Azure Blob Storage, as Litestream spells it) and
//! `gs://bucket/prefix` (Google Cloud Storage); takes credentials, region and endpoint from
//! the environment when the URL does not name them, and redacts secrets from `Debug`,
//! `Display` and error messages.

use std::fmt;
use std::path::PathBuf;

use super::error::StoreError;

/// The region used when neither the URL nor the environment names one (Litestream's
/// `DefaultRegion`).
pub const DEFAULT_REGION: &str = "us-east-1";

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

/// The account name Azurite (the Azure Storage emulator) serves.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's account key, published in Microsoft's documentation of the emulator.
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How an Azure Blob Storage replica authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum AzureCredentials {
    /// The storage account's shared key (`AZURE_STORAGE_ACCOUNT_KEY`).
    AccessKey(Secret),
    /// A shared access signature (`AZURE_STORAGE_SAS_TOKEN`).
    Sas(Secret),
    /// Whatever else `AZURE_*` names (a service principal, workload or managed identity,
    /// the Azure CLI): `object_store`'s own chain reads it when the store opens.
    Environment,
}

impl fmt::Debug for AzureCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AzureCredentials::AccessKey(_) => f.write_str("AccessKey(<redacted>)"),
            AzureCredentials::Sas(_) => f.write_str("Sas(<redacted>)"),
            AzureCredentials::Environment => f.write_str("Environment"),
        }
    }
}

/// An Azure Blob Storage replica: `abs://ACCOUNT@CONTAINER/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsUrl {
    /// The storage account.
    pub account: String,
    /// The container.
    pub container: String,
    /// The blob name prefix, without leading or trailing slashes ("" for the container root).
    pub prefix: String,
    /// The blob service endpoint, e.g. `http://127.0.0.1:10000/devstoreaccount1` for
    /// Azurite (None: `https://ACCOUNT.blob.core.windows.net`).
    pub endpoint: Option<String>,
    /// How requests authenticate.
    pub credentials: AzureCredentials,
}

/// How a Google Cloud Storage replica authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum GcsCredentials {
    /// A service account key file (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_PATH`).
    ServiceAccountFile(PathBuf),
    /// A service account key itself, as JSON (`GOOGLE_SERVICE_ACCOUNT_KEY`).
    ServiceAccountKey(Secret),
    /// Application default credentials: the file `GOOGLE_APPLICATION_CREDENTIALS` names,
    /// gcloud's well-known file, or the metadata server of Google Cloud compute.
    ApplicationDefault(Option<PathBuf>),
    /// Unsigned requests (`GOOGLE_SKIP_SIGNATURE=true`: public buckets, emulators).
    Anonymous,
}

impl fmt::Debug for GcsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcsCredentials::ServiceAccountFile(p) => write!(f, "ServiceAccountFile({p:?})"),
            GcsCredentials::ServiceAccountKey(_) => f.write_str("ServiceAccountKey(<redacted>)"),
            GcsCredentials::ApplicationDefault(p) => write!(f, "ApplicationDefault({p:?})"),
            GcsCredentials::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// A Google Cloud Storage replica: `gs://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsUrl {
    /// The bucket.
    pub bucket: String,
    /// The object name prefix, without leading or trailing slashes ("" for the bucket root).
    pub prefix: String,
    /// A custom base URL of the JSON/XML API, e.g. an emulator's `http://127.0.0.1:4443`
    /// (None: `https://storage.googleapis.com`).
    pub endpoint: Option<String>,
    /// How requests authenticate.
    pub credentials: GcsCredentials,
}

/// Where one replica lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// `file:///abs/dir`
    File(FileUrl),
    /// `s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true&skipVerify=false`
    S3(S3Url),
    /// `abs://ACCOUNT@CONTAINER/prefix?endpoint=...`
    Abs(AbsUrl),
    /// `gs://bucket/prefix?endpoint=...`
    Gs(GsUrl),
}

/// The URL forms walfs takes, for messages.
const SCHEMES: &str =
    "file:///absolute/dir, s3://bucket/prefix, abs://ACCOUNT@CONTAINER/prefix or gs://bucket/prefix";

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
    /// process environment (S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`; Azure:
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_TOKEN`,
    /// `AZURE_STORAGE_ENDPOINT`, ...; GCS: `GOOGLE_APPLICATION_CREDENTIALS`,
    /// `GOOGLE_SERVICE_ACCOUNT(_PATH|_KEY)`, `GOOGLE_BASE_URL`, ...; the URL wins).
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
                "replica URL {:?} has no scheme; use {SCHEMES}",
                redact_url_text(s)
            )));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => parse_file_url(s),
            "s3" => parse_s3_url(s, &env),
            "abs" => parse_abs_url(s, &env),
            "gs" => parse_gs_url(s, &env),
            other => Err(StoreError::url(format!(
                "replica URL scheme {other:?} is not supported; use {SCHEMES}"
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
        .caused_by(e)
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
    normalize_endpoint_for(
        s,
        endpoint,
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead",
    )
}

/// [`normalize_endpoint`], saying `creds_hint` when the endpoint holds credentials.
fn normalize_endpoint_for(s: &str, endpoint: &str, creds_hint: &str) -> Result<String, StoreError> {
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
            redact_url_text(&full)
        ))
        .caused_by(e)
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(StoreError::url(format!(
            "replica URL endpoint {:?} holds credentials; remove them and {creds_hint}",
            redact_url_text(&full)
        )));
    }
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(StoreError::url(format!(
            "replica URL {s:?}: endpoint {:?} must be an http:// or https:// URL with a host",
            redact_url_text(&full)
        )));
    }
    Ok(full)
}

/// A URL's text for messages: the `user:password@` part of every embedded URL (the replica
/// URL itself and an `endpoint=` in its query) and the value of every query key that walfs
/// does not know (someone may have put a credential there) replaced with `<redacted>`.
/// Raw secrets may hold `/` (AWS secret keys do), so a userinfo part is looked for up to
/// the query, not only up to the path.
fn redact_url_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(['?', '&', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            // An abs:// URL's user part is the storage account, no secret, unless a key
            // was written after it.
            let account = out.ends_with("abs://")
                && rest[..at]
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-');
            if !account {
                out.push_str("<redacted>");
                rest = &rest[at..];
            }
        }
    }
    out.push_str(rest);
    let Some((base, query)) = out.split_once('?') else {
        return out;
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if !SHOWN_QUERY_KEYS.contains(&k) && !IGNORED_QUERY_KEYS.contains(&k) => {
                format!("{k}=<redacted>")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// The query keys whose values messages show.
const SHOWN_QUERY_KEYS: &[&str] = &[
    "endpoint",
    "region",
    "forcePathStyle",
    "force-path-style",
    "skipVerify",
    "skip-verify",
];

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

/// The key prefix a URL's path names: %-decoded, without empty or `.` segments.
fn url_prefix(shown: &str, u: &url::Url) -> Result<String, StoreError> {
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
    Ok(segs.join("/"))
}

fn parse_s3_url(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ReplicaUrl, StoreError> {
    let shown = redact_url_text(s);
    let u = url::Url::parse(s).map_err(|e| {
        StoreError::url(format!(
            "replica URL {shown:?} is malformed ({e}); use s3://bucket/prefix?endpoint=...&region=..."
        ))
        .caused_by(e)
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
    let prefix = url_prefix(&shown, &u)?;

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

/// What the messages about Azure credentials tell the user to set.
const AZURE_CREDS_HINT: &str = "set AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_SAS_TOKEN) instead";

/// `AZURE_*` variables that name a credential `object_store`'s own chain resolves: a
/// bearer token, a service principal, a workload or managed identity, the Azure CLI.
const AZURE_CHAIN_KEYS: &[&str] = &[
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_STORAGE_CLIENT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USE_AZURE_CLI",
    "AZURE_MSI_ENDPOINT",
    "AZURE_IDENTITY_ENDPOINT",
    "AZURE_OBJECT_ID",
    "AZURE_MSI_RESOURCE_ID",
    "AZURE_CREDENTIAL_TYPE",
];

fn parse_abs_url(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ReplicaUrl, StoreError> {
    let shown = redact_url_text(s);
    let u = url::Url::parse(s).map_err(|e| {
        StoreError::url(format!(
            "replica URL {shown:?} is malformed ({e}); use abs://ACCOUNT@CONTAINER/prefix"
        ))
        .caused_by(e)
    })?;
    if u.password().is_some() {
        return Err(StoreError::url(format!(
            "replica URL abs://<redacted>@...: the account key does not belong in the URL; \
             use abs://ACCOUNT@CONTAINER/prefix and {AZURE_CREDS_HINT}"
        )));
    }
    let container = u.host_str().unwrap_or("").to_string();
    if container.is_empty() {
        return Err(StoreError::url(format!(
            "replica URL {shown:?} names no container; use abs://ACCOUNT@CONTAINER/prefix"
        )));
    }
    if u.port().is_some() {
        return Err(StoreError::url(format!(
            "replica URL {shown:?}: the host part is the container name; give a custom server as \
             abs://ACCOUNT@CONTAINER/prefix?endpoint=http://host:port/ACCOUNT"
        )));
    }
    let prefix = url_prefix(&shown, &u)?;
    let mut endpoint = None;
    for (k, v) in u.query_pairs() {
        match k.as_ref() {
            "endpoint" => endpoint = Some(v.into_owned()).filter(|v| !v.is_empty()),
            k => {
                return Err(StoreError::url(format!(
                "replica URL {shown:?}: unknown query key {k:?}; an abs:// URL takes endpoint only"
            )))
            }
        }
    }
    let emulator = env("AZURE_STORAGE_USE_EMULATOR")
        .map(|v| parse_bool(&shown, "AZURE_STORAGE_USE_EMULATOR", &v))
        .transpose()?
        .unwrap_or(false);
    let account = match u.username() {
        "" => env("AZURE_STORAGE_ACCOUNT_NAME")
            .or_else(|| emulator.then(|| AZURITE_ACCOUNT.to_string())),
        name => percent_decode(name),
    };
    let Some(account) = account else {
        return Err(StoreError::url(format!(
            "replica URL {shown:?} names no storage account; use abs://ACCOUNT@CONTAINER/prefix \
             or set AZURE_STORAGE_ACCOUNT_NAME"
        )));
    };
    if account.is_empty() || !account.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(StoreError::url(format!(
            "replica URL {shown:?}: the storage account name must be letters and digits; \
             use abs://ACCOUNT@CONTAINER/prefix"
        )));
    }
    // The URL's query wins over the environment. Azurite serves the account under its
    // address's path: http://127.0.0.1:10000/devstoreaccount1.
    let endpoint = match endpoint
        .or_else(|| env("AZURE_STORAGE_ENDPOINT"))
        .or_else(|| {
            emulator.then(|| {
                let base = env("AZURITE_BLOB_STORAGE_URL")
                    .unwrap_or_else(|| "http://127.0.0.1:10000".to_string());
                format!("{}/{account}", base.trim_end_matches('/'))
            })
        }) {
        Some(e) => Some(normalize_endpoint_for(&shown, &e, AZURE_CREDS_HINT)?),
        None => None,
    };
    let key = env("AZURE_STORAGE_ACCOUNT_KEY")
        .or_else(|| env("AZURE_STORAGE_ACCESS_KEY"))
        .or_else(|| env("AZURE_STORAGE_MASTER_KEY"))
        .or_else(|| env("LITESTREAM_AZURE_ACCOUNT_KEY"));
    let sas = env("AZURE_STORAGE_SAS_TOKEN").or_else(|| env("AZURE_STORAGE_SAS_KEY"));
    let credentials = if let Some(k) = key {
        AzureCredentials::AccessKey(Secret(k))
    } else if let Some(t) = sas {
        AzureCredentials::Sas(Secret(t))
    } else if emulator {
        AzureCredentials::AccessKey(Secret(AZURITE_KEY.to_string()))
    } else if AZURE_CHAIN_KEYS.iter().any(|k| env(k).is_some()) {
        AzureCredentials::Environment
    } else {
        return Err(StoreError::url(format!(
            "replica URL {shown:?} has no Azure credentials; set AZURE_STORAGE_ACCOUNT_KEY or \
             AZURE_STORAGE_SAS_TOKEN (or AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID; \
             or AZURE_CREDENTIAL_TYPE=managed_identity)"
        )));
    };
    Ok(ReplicaUrl::Abs(AbsUrl {
        account,
        container,
        prefix,
        endpoint,
        credentials,
    }))
}

fn parse_gs_url(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ReplicaUrl, StoreError> {
    let shown = redact_url_text(s);
    let u = url::Url::parse(s).map_err(|e| {
        StoreError::url(format!(
            "replica URL {shown:?} is malformed ({e}); use gs://bucket/prefix"
        ))
        .caused_by(e)
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(StoreError::url(
            "replica URL gs://<redacted>@...: credentials do not belong in the URL; \
             set GOOGLE_APPLICATION_CREDENTIALS to a service account key file instead",
        ));
    }
    let bucket = u.host_str().unwrap_or("").to_string();
    if bucket.is_empty() {
        return Err(StoreError::url(format!(
            "replica URL {shown:?} names no bucket; use gs://bucket/prefix"
        )));
    }
    if u.port().is_some() {
        return Err(StoreError::url(format!(
            "replica URL {shown:?}: the host part is the bucket name; give a custom server as \
             gs://bucket/prefix?endpoint=http://host:port"
        )));
    }
    let prefix = url_prefix(&shown, &u)?;
    let mut endpoint = None;
    for (k, v) in u.query_pairs() {
        match k.as_ref() {
            "endpoint" => endpoint = Some(v.into_owned()).filter(|v| !v.is_empty()),
            k => {
                return Err(StoreError::url(format!(
                "replica URL {shown:?}: unknown query key {k:?}; a gs:// URL takes endpoint only"
            )))
            }
        }
    }
    let endpoint = match endpoint.or_else(|| env("GOOGLE_BASE_URL")) {
        Some(e) => Some(normalize_endpoint_for(
            &shown,
            &e,
            "set GOOGLE_APPLICATION_CREDENTIALS instead",
        )?),
        None => None,
    };
    let skip = env("GOOGLE_SKIP_SIGNATURE")
        .map(|v| parse_bool(&shown, "GOOGLE_SKIP_SIGNATURE", &v))
        .transpose()?
        .unwrap_or(false);
    let path = env("GOOGLE_SERVICE_ACCOUNT")
        .or_else(|| env("GOOGLE_SERVICE_ACCOUNT_PATH"))
        .or_else(|| env("SERVICE_ACCOUNT"));
    let credentials = match (path, env("GOOGLE_SERVICE_ACCOUNT_KEY")) {
        _ if skip => GcsCredentials::Anonymous,
        (Some(_), Some(_)) => {
            return Err(StoreError::url(
                "both GOOGLE_SERVICE_ACCOUNT(_PATH) and GOOGLE_SERVICE_ACCOUNT_KEY are set; \
                 unset one of them",
            ))
        }
        (Some(p), None) => GcsCredentials::ServiceAccountFile(PathBuf::from(p)),
        (None, Some(k)) => GcsCredentials::ServiceAccountKey(Secret(k)),
        (None, None) => GcsCredentials::ApplicationDefault(
            env("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from),
        ),
    };
    let file = match &credentials {
        GcsCredentials::ServiceAccountFile(p) => Some(p),
        GcsCredentials::ApplicationDefault(p) => p.as_ref(),
        _ => None,
    };
    if let Some(p) = file.filter(|p| !p.is_file()) {
        return Err(StoreError::url(format!(
            "GCS credentials file {} does not exist; point GOOGLE_APPLICATION_CREDENTIALS \
             (or GOOGLE_SERVICE_ACCOUNT) at a service account key file",
            p.display()
        )));
    }
    Ok(ReplicaUrl::Gs(GsUrl {
        bucket,
        prefix,
        endpoint,
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
                    write!(f, "{sep}endpoint={}", redact_url_text(e))?;
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
            ReplicaUrl::Abs(u) => {
                write!(f, "abs://{}@{}", u.account, u.container)?;
                if !u.prefix.is_empty() {
                    write!(f, "/{}", u.prefix)?;
                }
                if let Some(e) = &u.endpoint {
                    write!(f, "?endpoint={}", redact_url_text(e))?;
                }
                Ok(())
            }
            ReplicaUrl::Gs(u) => {
                write!(f, "gs://{}", u.bucket)?;
                if !u.prefix.is_empty() {
                    write!(f, "/{}", u.prefix)?;
                }
                if let Some(e) = &u.endpoint {
                    write!(f, "?endpoint={}", redact_url_text(e))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::error::StoreErrorKind;
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

    fn abs(u: ReplicaUrl) -> AbsUrl {
        match u {
            ReplicaUrl::Abs(u) => u,
            other => panic!("not abs: {other:?}"),
        }
    }

    fn gs(u: ReplicaUrl) -> GsUrl {
        match u {
            ReplicaUrl::Gs(u) => u,
            other => panic!("not gs: {other:?}"),
        }
    }

    const AZ_KEY: &str = "c2VjcmV0LWF6dXJlLWtleS1mb3ItdGhlLXRlc3Q=";

    #[test]
    fn parses_abs_urls_as_litestream_spells_them() {
        let env = env_of(&[("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY)]);
        let u = abs(ReplicaUrl::parse_with_env("abs://acct@cont/some/prefix/", &env).unwrap());
        assert_eq!(u.account, "acct");
        assert_eq!(u.container, "cont");
        assert_eq!(u.prefix, "some/prefix");
        assert_eq!(u.endpoint, None);
        assert_eq!(
            u.credentials,
            AzureCredentials::AccessKey(Secret::new(AZ_KEY))
        );
        assert_eq!(
            ReplicaUrl::Abs(u.clone()).to_string(),
            "abs://acct@cont/some/prefix"
        );

        // An emulator's endpoint; the account from the environment.
        let env = env_of(&[
            ("AZURE_STORAGE_ACCOUNT_NAME", "fromenv"),
            ("AZURE_STORAGE_SAS_TOKEN", "sv=2021&sig=abc"),
        ]);
        let u = abs(ReplicaUrl::parse_with_env(
            "abs://cont?endpoint=http://127.0.0.1:10000/fromenv",
            &env,
        )
        .unwrap());
        assert_eq!(u.account, "fromenv");
        assert_eq!(u.prefix, "");
        assert_eq!(
            u.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/fromenv")
        );
        assert_eq!(
            u.credentials,
            AzureCredentials::Sas(Secret::new("sv=2021&sig=abc"))
        );

        // AZURE_STORAGE_USE_EMULATOR: Azurite's account, key and address.
        let u = abs(ReplicaUrl::parse_with_env(
            "abs://cont/p",
            env_of(&[("AZURE_STORAGE_USE_EMULATOR", "true")]),
        )
        .unwrap());
        assert_eq!(u.account, AZURITE_ACCOUNT);
        assert_eq!(
            u.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        assert_eq!(
            u.credentials,
            AzureCredentials::AccessKey(Secret::new(AZURITE_KEY))
        );

        // Other AZURE_* credentials are left to object_store's chain.
        let u = abs(ReplicaUrl::parse_with_env(
            "abs://a@c/p",
            env_of(&[("AZURE_CREDENTIAL_TYPE", "managed_identity")]),
        )
        .unwrap());
        assert_eq!(u.credentials, AzureCredentials::Environment);
    }

    #[test]
    fn bad_abs_urls_and_missing_azure_credentials_say_what_to_set() {
        let key = env_of(&[("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY)]);
        for (bad, hint) in [
            ("abs://cont/p", "AZURE_STORAGE_ACCOUNT_NAME"),
            ("abs:///p", "abs://ACCOUNT@CONTAINER/prefix"),
            ("abs://a@cont:99/p", "endpoint=http://host:port/ACCOUNT"),
            ("abs://a@cont/p?region=x", "endpoint only"),
            ("abs://a@cont/p?endpoint=ftp://x", "http://"),
            ("abs://a_b@cont/p", "letters and digits"),
        ] {
            let e = ReplicaUrl::parse_with_env(bad, &key).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::InvalidUrl, "{bad}");
            assert!(e.to_string().contains(hint), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: {e}");
        }
        let e = ReplicaUrl::parse_with_env("abs://a@cont/p", env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
        assert!(e.to_string().contains("abs://a@cont/p"), "{e}");
        // A key in the URL is refused, not echoed.
        let e = ReplicaUrl::parse_with_env(&format!("abs://a:{AZ_KEY}@cont/p"), env_of(&[]))
            .unwrap_err();
        assert!(!e.to_string().contains(AZ_KEY), "{e}");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        assert!(e.to_string().contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
        let u = ReplicaUrl::parse_with_env("abs://a@cont/p", &key).unwrap();
        for shown in [format!("{u:?}"), format!("{u:#?}"), u.to_string()] {
            assert!(!shown.contains(AZ_KEY), "{shown}");
        }
        let u = ReplicaUrl::parse_with_env(
            "abs://a@cont/p",
            env_of(&[("AZURE_STORAGE_SAS_TOKEN", "sig=sAsSeCrEt")]),
        )
        .unwrap();
        assert!(!format!("{u:?}").contains("sAsSeCrEt"));
    }

    #[test]
    fn parses_gs_urls_and_google_credentials() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("sa.json");
        std::fs::write(&file, "{}").unwrap();
        let f = file.to_str().unwrap();

        let env = env_of(&[("GOOGLE_APPLICATION_CREDENTIALS", f)]);
        let u = gs(ReplicaUrl::parse_with_env("gs://bkt/a/b/", &env).unwrap());
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix, "a/b");
        assert_eq!(u.endpoint, None);
        assert_eq!(
            u.credentials,
            GcsCredentials::ApplicationDefault(Some(file.clone()))
        );
        assert_eq!(ReplicaUrl::Gs(u).to_string(), "gs://bkt/a/b");

        let u = gs(ReplicaUrl::parse_with_env(
            "gs://bkt?endpoint=127.0.0.1:4443",
            env_of(&[("GOOGLE_SERVICE_ACCOUNT_PATH", f)]),
        )
        .unwrap());
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(
            u.credentials,
            GcsCredentials::ServiceAccountFile(file.clone())
        );

        let u = gs(ReplicaUrl::parse_with_env(
            "gs://bkt/p",
            env_of(&[(
                "GOOGLE_SERVICE_ACCOUNT_KEY",
                "{\"private_key\": \"gsSeCrEt\"}",
            )]),
        )
        .unwrap());
        assert!(matches!(
            u.credentials,
            GcsCredentials::ServiceAccountKey(_)
        ));
        assert!(!format!("{u:?}").contains("gsSeCrEt"));

        let u = gs(ReplicaUrl::parse_with_env(
            "gs://bkt/p",
            env_of(&[
                ("GOOGLE_SKIP_SIGNATURE", "true"),
                ("GOOGLE_BASE_URL", "http://localhost:9023"),
            ]),
        )
        .unwrap());
        assert_eq!(u.credentials, GcsCredentials::Anonymous);
        assert_eq!(u.endpoint.as_deref(), Some("http://localhost:9023"));

        // Nothing set: application default credentials (gcloud's file or the metadata
        // server), as Litestream's client does.
        let u = gs(ReplicaUrl::parse_with_env("gs://bkt/p", env_of(&[])).unwrap());
        assert_eq!(u.credentials, GcsCredentials::ApplicationDefault(None));
    }

    #[test]
    fn bad_gs_urls_and_credentials_say_what_to_set() {
        for (bad, env, hint) in [
            ("gs:///p", vec![], "gs://bucket/prefix"),
            ("gs://b:1/p", vec![], "endpoint=http://host:port"),
            ("gs://b/p?region=x", vec![], "endpoint only"),
            (
                "gs://key:gsSeCrEt@b/p",
                vec![],
                "GOOGLE_APPLICATION_CREDENTIALS",
            ),
            (
                "gs://b/p",
                vec![("GOOGLE_APPLICATION_CREDENTIALS", "/no/such/file.json")],
                "GOOGLE_APPLICATION_CREDENTIALS",
            ),
            (
                "gs://b/p",
                vec![
                    ("GOOGLE_SERVICE_ACCOUNT", "/x.json"),
                    ("GOOGLE_SERVICE_ACCOUNT_KEY", "{}"),
                ],
                "unset one",
            ),
            (
                "gs://b/p",
                vec![("GOOGLE_SKIP_SIGNATURE", "maybe")],
                "GOOGLE_SKIP_SIGNATURE=true",
            ),
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&env)).unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::InvalidUrl, "{bad}");
            assert!(e.to_string().contains(hint), "{bad}: {e}");
            assert!(!e.to_string().contains("gsSeCrEt"), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: {e}");
        }
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

        let e = ReplicaUrl::parse_with_env("s3://key:secret-in-url@b/p", env_of(&[])).unwrap_err();
        assert!(!e.to_string().contains("secret-in-url"), "{e}");
        // AWS secret keys hold '/' and '+'; a credential may be put in the query too.
        for bad in [
            "s3://AKIAKEY:se/cr+et/in-url@b/p",
            "s3://b/p?endpoint=http://AKIAKEY:se/cr+et/in-url@127.0.0.1:9000",
            "s3://b/p?endpoint=http://127.0.0.1:9000&secret-access-key=se/cr+et/in-url",
            "s3://b/p?access_key_id=AKIAKEY&region=us-east-1",
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&[])).unwrap_err();
            assert!(!e.to_string().contains("cr+et"), "{bad}: {e}");
            assert!(!e.to_string().contains("AKIAKEY"), "{bad}: {e}");
            assert!(e.to_string().contains("<redacted>"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_malformed_url_keeps_its_cause() {
        let e = ReplicaUrl::parse_with_env("s3://b:port/p", env_of(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replica URL \"s3://b:port/p\" is malformed (invalid port number); \
             use s3://bucket/prefix?endpoint=...&region=..."
        );
        let cause = e.cause().and_then(|c| c.downcast_ref::<url::ParseError>());
        assert_eq!(cause, Some(&url::ParseError::InvalidPort));
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
            ("ftp://b/p", "gs://bucket/prefix"),
            ("b/p", "s3://bucket/prefix"),
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&[])).unwrap_err();
            assert!(e.to_string().contains(hint), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: {e}");
        }
    }
}
