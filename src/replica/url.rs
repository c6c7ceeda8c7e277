//! The replica URL: where a replica lives. [`ReplicaUrl`] parses `file:///dir` (or a plain
//! absolute path) and `s3://bucket/prefix?...` with Litestream's query keys, takes S3
//! credentials, region and endpoint from the environment when the URL does not name them,
//! and redacts secrets from `Debug`, `Display` and error messages.

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
            "replica URL endpoint {:?} holds credentials; remove them and set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead",
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
            out.push_str("<redacted>");
            rest = &rest[at..];
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
            ("gs://b/p", "s3://bucket/prefix"),
            ("b/p", "s3://bucket/prefix"),
        ] {
            let e = ReplicaUrl::parse_with_env(bad, env_of(&[])).unwrap_err();
            assert!(e.to_string().contains(hint), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'), "{bad}: {e}");
        }
    }
}
