//! Encryption at rest of a replica's objects (`--encryption-key-file`).
//!
//! This module owns the encrypted object format, the keys and their files:
//! - [`Key`], [`KeyId`] and [`Keyring`] (the key that encrypts, then older keys that only
//!   decrypt), and the key file format ([`Key::parse`]);
//! - [`EncryptionArgs`], the flag and environment variables that name the keys;
//! - [`Encryptor`] and [`decrypt`]: the object body format, XChaCha20-Poly1305 in STREAM
//!   segments of 64 KiB, so that a large object is encrypted while it streams and its
//!   first segment (the LTX header) can be read alone ([`decrypt_first_segment`]);
//! - [`seal_text`] and [`open_text`]: the same for short texts kept in object metadata
//!   (walfs's verification records on S3, GCS and Azure).
//!
//! The store (`super::store`) encrypts on put and decrypts on get, so upload,
//! maintenance and restore never see ciphertext. docs/FORMAT.md ("Encryption at rest")
//! describes the format; docs/OPERATIONS.md how to make and rotate keys.
//!
//! Body layout (all integers big-endian):
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 4 | magic `WFSE` |
//! | 4 | 1 | format version, 1 |
//! | 5 | 1 | algorithm, 1 = XChaCha20-Poly1305 STREAM |
//! | 6 | 1 | log2 of the segment size, 16 |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 8 | key id |
//! | 16 | 19 | nonce prefix, random per object |
//! | 35 | ... | segments: each up to 64 KiB of ciphertext and its 16-byte tag |
//!
//! Segment `i` (from 0) is sealed with the nonce `prefix ‖ i as u32 ‖ last`, where `last`
//! is 1 for the final segment and 0 before it, and with the associated data `header ‖
//! context` (the 35 header bytes and the name of what the object is, e.g. `ltx 0
//! 0000000000000001-0000000000000003`). Every segment but the last holds exactly 64 KiB;
//! the last holds the rest (possibly nothing), so an empty object is one empty segment.
//! Reordered, dropped or appended segments, a cut at any byte, a body moved to another
//! object's name, and a changed header all fail authentication.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

/// The first bytes of an encrypted object.
pub const MAGIC: [u8; 4] = *b"WFSE";
/// The format version this build writes and reads.
pub const VERSION: u8 = 1;
/// The algorithm byte: XChaCha20-Poly1305 in the STREAM construction.
pub const ALGORITHM: u8 = 1;
/// log2 of [`SEGMENT`].
pub const SEGMENT_SHIFT: u8 = 16;
/// Plaintext bytes per segment (all segments but the last hold exactly this many).
pub const SEGMENT: usize = 1 << SEGMENT_SHIFT;
/// Bytes of the Poly1305 tag after each segment.
pub const TAG_LEN: usize = 16;
/// Bytes of the random nonce prefix (the nonce is 24 bytes: the prefix, a 4-byte segment
/// counter and a 1-byte last-segment flag).
pub const NONCE_PREFIX_LEN: usize = 19;
/// Bytes of the header before the first segment.
pub const HEADER_LEN: usize = 16 + NONCE_PREFIX_LEN;
/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes a reader needs from the start of an object to decrypt its first segment.
pub const FIRST_SEGMENT_LEN: usize = HEADER_LEN + SEGMENT + TAG_LEN;

/// The environment variable naming key files when no `--encryption-key-file` is given
/// (several separated by `:`, the first one encrypting).
pub const ENV_KEY_FILE: &str = "WALFS_ENCRYPTION_KEY_FILE";
/// The environment variable holding a key itself (64 hex digits or base64), used when no
/// key file is named.
pub const ENV_KEY: &str = "WALFS_ENCRYPTION_KEY";

/// The blake3 `derive_key` context of a key's id.
const KEY_ID_CONTEXT: &str = "walfs 2026-12 encryption key id";
/// The blake3 `derive_key` context of the XChaCha20-Poly1305 key derived from a key.
const CIPHER_KEY_CONTEXT: &str = "walfs 2026-12 object encryption key";
/// What a text sealed by [`seal_text`] starts with.
const TEXT_PREFIX: &str = "wfse1:";

/// How to make a key, for messages.
pub const GENERATE_HINT: &str =
    "generate a key with `head -c 32 /dev/urandom > FILE` (or `openssl rand -hex 32 > FILE`)";

/// A key's public name: the first 8 bytes of a blake3 key derivation from it, shown as
/// 16 hex digits. It names the key in object headers, metadata and messages, and reveals
/// nothing about it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// One encryption key. Holds only the cipher derived from the key (zeroed on drop) and
/// the key's id; `Debug` shows the id alone.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    aead: XChaCha20Poly1305,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

impl Key {
    /// The key made of these 32 bytes (not checked for weakness: see [`Key::parse`]).
    pub fn from_bytes(raw: &[u8; KEY_LEN]) -> Key {
        let full = blake3::derive_key(KEY_ID_CONTEXT, raw);
        let mut id = [0u8; 8];
        id.copy_from_slice(&full[..8]);
        let sub = Zeroizing::new(blake3::derive_key(CIPHER_KEY_CONTEXT, raw));
        let aead = XChaCha20Poly1305::new(&(*sub).into());
        Key {
            id: KeyId(id),
            aead,
        }
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Parses the content of a key file: exactly 32 raw bytes, or text holding one key as
    /// 64 hex digits or as base64 of 32 bytes (44 characters), with optional `#` comment
    /// lines and blank lines. Refuses weak keys (fewer than 16 distinct byte values, such
    /// as 32 zero bytes) and 32 bytes of printable text (a passphrase, not a key). The
    /// error says what is wrong, never quoting the content.
    pub fn parse(content: &[u8]) -> Result<Key, String> {
        let raw = parse_key_bytes(content)?;
        let mut seen = [false; 256];
        raw.iter().for_each(|&b| seen[usize::from(b)] = true);
        if seen.iter().filter(|&&s| s).count() < 16 {
            return Err(
                "holds a weak key (fewer than 16 distinct byte values, e.g. zeros): \
                 a key must be 32 random bytes"
                    .into(),
            );
        }
        Ok(Key::from_bytes(&raw))
    }

    /// Reads and parses the key file at `path`; the error is one line that names the file
    /// and says how to make a good one.
    pub fn from_file(path: &Path) -> Result<Key, String> {
        let bad = |what: String| {
            format!(
                "encryption key file {} {what}; {GENERATE_HINT}",
                path.display()
            )
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            format!(
                "cannot read encryption key file {}: {e}; check the path given with \
                 --encryption-key-file or {ENV_KEY_FILE}",
                path.display()
            )
        })?;
        if !meta.is_file() {
            return Err(bad("is not a regular file".into()));
        }
        if meta.len() > 4096 {
            return Err(bad(format!(
                "is {} bytes long: a key file holds 32 raw bytes, or 64 hex digits or 44 \
                 base64 characters of text",
                meta.len()
            )));
        }
        let content = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| format!("cannot read encryption key file {}: {e}", path.display()))?,
        );
        let key = Key::parse(&content).map_err(bad)?;
        {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o004 != 0 {
                tracing::warn!(
                    "encryption key file {} (key id {}) is readable by every user; \
                     chmod 600 it",
                    path.display(),
                    key.id
                );
            }
        }
        Ok(key)
    }
}

/// The 32 key bytes in a key file's content (see [`Key::parse`]).
fn parse_key_bytes(content: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    let mut raw = Zeroizing::new([0u8; KEY_LEN]);
    if content.len() == KEY_LEN {
        if content.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            return Err(
                "holds 32 characters of text, not 32 random bytes (a passphrase is \
                 not a key)"
                    .into(),
            );
        }
        raw.copy_from_slice(content);
        return Ok(raw);
    }
    let shape = "a key file holds 32 raw bytes, or one line of 64 hex digits or 44 base64 \
                 characters (with optional # comment lines)";
    let text = std::str::from_utf8(content)
        .map_err(|_| format!("is {} bytes of binary: {shape}", content.len()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let [token] = lines[..] else {
        return Err(format!(
            "holds {} lines of text that are not comments: {shape}",
            lines.len()
        ));
    };
    if token.len() == 2 * KEY_LEN && token.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, pair) in token.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(pair).map_err(|_| shape.to_string())?;
            raw[i] = u8::from_str_radix(hex, 16).map_err(|_| shape.to_string())?;
        }
        return Ok(raw);
    }
    if token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("holds {} hex digits, not 64: {shape}", token.len()));
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| {
                format!(
                    "holds {} characters that are not a key: {shape}",
                    token.len()
                )
            })?,
    );
    if decoded.len() != KEY_LEN {
        return Err(format!(
            "holds base64 of {} bytes, not 32: {shape}",
            decoded.len()
        ));
    }
    raw.copy_from_slice(&decoded);
    Ok(raw)
}

/// The keys a command was given: the first encrypts what is written, every one decrypts
/// the objects whose header names its id.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// A keyring of `current` (which encrypts) and `older` keys (which only decrypt).
    /// Keys given twice are kept once.
    pub fn new(current: Key, older: impl IntoIterator<Item = Key>) -> Keyring {
        let mut keys = vec![current];
        for k in older {
            if keys.iter().all(|have| have.id != k.id) {
                keys.push(k);
            }
        }
        Keyring { keys }
    }

    /// The key that encrypts.
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// The key with id `id`, if given.
    pub fn get(&self, id: KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The ids of every key, the encrypting one first.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

/// The encryption flag of `walfs mount`, `run`, `restore`, `list` and `verify` (each
/// field's doc comment is its `--help` text).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct EncryptionArgs {
    /// Encrypt every object written to the replicas with the key in FILE (32 random bytes,
    /// or 64 hex digits; make one with `head -c 32 /dev/urandom > FILE`), and decrypt with
    /// it. May be repeated: the first key encrypts, later ones (older keys) only decrypt.
    /// Default: the files in WALFS_ENCRYPTION_KEY_FILE (separated by ':'), else the key in
    /// WALFS_ENCRYPTION_KEY (hex or base64).
    #[arg(long = "encryption-key-file", value_name = "FILE")]
    pub encryption_key_files: Vec<PathBuf>,
}

impl EncryptionArgs {
    /// The keyring these flags and the process's environment name; `None` when none is
    /// given (objects are written in plaintext). The error is one line.
    pub fn keyring(&self) -> Result<Option<Arc<Keyring>>, String> {
        self.keyring_with_env(|k| std::env::var(k).ok())
    }

    /// [`EncryptionArgs::keyring`] with the environment given by `env`.
    pub fn keyring_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Arc<Keyring>>, String> {
        let files: Vec<PathBuf> = if !self.encryption_key_files.is_empty() {
            self.encryption_key_files.clone()
        } else {
            env(ENV_KEY_FILE)
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.trim().is_empty())
                .map(PathBuf::from)
                .collect()
        };
        let mut keys = Vec::new();
        for f in &files {
            keys.push(Key::from_file(f)?);
        }
        if keys.is_empty() {
            if let Some(text) = env(ENV_KEY).filter(|t| !t.trim().is_empty()) {
                let text = Zeroizing::new(text);
                // 32 bytes in the variable would be text: it holds hex or base64 only.
                if text.len() == KEY_LEN {
                    return Err(format!(
                        "{ENV_KEY} holds 32 characters: it takes a key as 64 hex digits or \
                         base64 of 32 bytes; {GENERATE_HINT} and give it with \
                         --encryption-key-file, or put `openssl rand -hex 32` in {ENV_KEY}"
                    ));
                }
                keys.push(Key::parse(text.as_bytes()).map_err(|m| {
                    format!(
                        "{ENV_KEY} {m}; put `openssl rand -hex 32` in it, or {GENERATE_HINT} \
                         and give it with --encryption-key-file"
                    )
                })?);
            }
        }
        let mut keys = keys.into_iter();
        Ok(keys
            .next()
            .map(|current| Arc::new(Keyring::new(current, keys))))
    }
}

/// Why an object could not be decrypted (or was not encrypted when it had to be). The
/// store wraps it in a one-line error naming the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptError {
    /// The object is encrypted with key `id`, and `have` (possibly none) are the keys
    /// given.
    KeyNeeded { id: KeyId, have: Vec<KeyId> },
    /// A key was given, but the object is plaintext.
    NotEncrypted,
    /// Segment `segment` failed authentication: the body was changed, cut, reordered or
    /// moved from another object.
    Unauthentic { segment: u64 },
    /// The header is not one this build reads.
    Malformed(String),
    /// The operating system gave no random bytes for a nonce.
    Random(String),
}

impl fmt::Display for CryptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CryptError::KeyNeeded { id, have } if have.is_empty() => write!(
                f,
                "is encrypted with key id {id}, and no key was given; give that key with \
                 --encryption-key-file FILE (or {ENV_KEY_FILE})"
            ),
            CryptError::KeyNeeded { id, have } => write!(
                f,
                "is encrypted with key id {id}, and the keys given have id {}; give the key \
                 with id {id} too (--encryption-key-file may be repeated: the first \
                 encrypts, the others only decrypt)",
                have.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            CryptError::NotEncrypted => write!(
                f,
                "is not encrypted, but an encryption key was given: walfs reads an \
                 encrypted replica only if every object is encrypted (a plaintext object \
                 may have been put there by someone else); read a plaintext replica \
                 without --encryption-key-file and without {ENV_KEY_FILE} or {ENV_KEY}"
            ),
            CryptError::Unauthentic { segment } => write!(
                f,
                "failed authentication at its segment {segment}: it was modified, cut short \
                 or moved after walfs wrote it"
            ),
            CryptError::Malformed(m) => write!(f, "is not a walfs encrypted object: {m}"),
            CryptError::Random(m) => write!(f, "cannot get random bytes for a nonce: {m}"),
        }
    }
}

impl std::error::Error for CryptError {}

/// Whether `body` starts as an encrypted object does.
pub fn is_encrypted(body: &[u8]) -> bool {
    body.starts_with(&MAGIC)
}

/// The key id in an encrypted object's header, if `body` starts with one.
pub fn key_id_of(body: &[u8]) -> Option<KeyId> {
    if !is_encrypted(body) || body.len() < 16 {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[8..16]);
    Some(KeyId(id))
}

/// The size of the encryption of `plain_len` bytes.
pub fn encrypted_len(plain_len: u64) -> u64 {
    let segments = plain_len.div_ceil(SEGMENT as u64).max(1);
    HEADER_LEN as u64 + plain_len + segments * TAG_LEN as u64
}

fn nonce(prefix: &[u8; NONCE_PREFIX_LEN], counter: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    n[NONCE_PREFIX_LEN..NONCE_PREFIX_LEN + 4].copy_from_slice(&counter.to_be_bytes());
    n[23] = u8::from(last);
    n.into()
}

/// Encrypts one object as it streams: [`Encryptor::header`] first, then what
/// [`Encryptor::push`] and [`Encryptor::finish`] append. A segment is sealed only once the
/// bytes after it arrive, so the caller need not know the size in advance; it holds at
/// most one segment of plaintext.
pub struct Encryptor {
    aead: XChaCha20Poly1305,
    header: [u8; HEADER_LEN],
    aad: Vec<u8>,
    prefix: [u8; NONCE_PREFIX_LEN],
    counter: u32,
    pending: Vec<u8>,
}

impl Encryptor {
    /// Starts an object encrypted with `key`, bound to `context` (what the object is).
    pub fn new(key: &Key, context: &[u8]) -> Result<Encryptor, CryptError> {
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        getrandom::fill(&mut prefix).map_err(|e| CryptError::Random(e.to_string()))?;
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4] = VERSION;
        header[5] = ALGORITHM;
        header[6] = SEGMENT_SHIFT;
        header[8..16].copy_from_slice(&key.id.0);
        header[16..].copy_from_slice(&prefix);
        let mut aad = header.to_vec();
        aad.extend_from_slice(context);
        Ok(Encryptor {
            aead: key.aead.clone(),
            header,
            aad,
            prefix,
            counter: 0,
            pending: Vec::with_capacity(SEGMENT),
        })
    }

    /// The object's first [`HEADER_LEN`] bytes.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Appends to `out` the segments that `plain` completes.
    pub fn push(&mut self, mut plain: &[u8], out: &mut Vec<u8>) -> Result<(), CryptError> {
        while !plain.is_empty() {
            if self.pending.len() == SEGMENT {
                self.seal(out, false)?;
            }
            let take = (SEGMENT - self.pending.len()).min(plain.len());
            self.pending.extend_from_slice(&plain[..take]);
            plain = &plain[take..];
        }
        Ok(())
    }

    /// Appends the last segment to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptError> {
        self.seal(out, true)
    }

    fn seal(&mut self, out: &mut Vec<u8>, last: bool) -> Result<(), CryptError> {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        let tag = self
            .aead
            .encrypt_inout_detached(
                &nonce(&self.prefix, self.counter, last),
                &self.aad,
                (&mut out[start..]).into(),
            )
            .map_err(|_| CryptError::Malformed("a segment is too long".into()))?;
        out.extend_from_slice(&tag);
        self.pending.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| CryptError::Malformed("an object of more than 2^32 segments".into()))?;
        Ok(())
    }
}

/// Encrypts `plain` whole with `key`, bound to `context`.
pub fn encrypt(key: &Key, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, CryptError> {
    let mut e = Encryptor::new(key, context)?;
    let mut out = Vec::with_capacity(encrypted_len(plain.len() as u64) as usize);
    out.extend_from_slice(e.header());
    e.push(plain, &mut out)?;
    e.finish(&mut out)?;
    Ok(out)
}

/// The key and nonce prefix an object's header names, checked against `ring`.
fn open_header<'k>(
    ring: Option<&'k Keyring>,
    body: &[u8],
) -> Result<(&'k Key, [u8; NONCE_PREFIX_LEN]), CryptError> {
    if body.len() < HEADER_LEN {
        return Err(CryptError::Malformed(format!(
            "{} bytes, shorter than its {HEADER_LEN}-byte header",
            body.len()
        )));
    }
    if body[4] != VERSION || body[5] != ALGORITHM || body[6] != SEGMENT_SHIFT {
        return Err(CryptError::Malformed(format!(
            "version {}, algorithm {}, segment shift {} (this walfs reads {VERSION}, \
             {ALGORITHM}, {SEGMENT_SHIFT}; a newer walfs may read it)",
            body[4], body[5], body[6]
        )));
    }
    let id = key_id_of(body).expect("checked above");
    let have = ring.map(Keyring::ids).unwrap_or_default();
    let key = ring
        .and_then(|r| r.get(id))
        .ok_or(CryptError::KeyNeeded { id, have })?;
    let mut prefix = [0u8; NONCE_PREFIX_LEN];
    prefix.copy_from_slice(&body[16..HEADER_LEN]);
    Ok((key, prefix))
}

fn open_segment(
    key: &Key,
    aad: &[u8],
    prefix: &[u8; NONCE_PREFIX_LEN],
    index: u64,
    last: bool,
    sealed: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CryptError> {
    let bad = CryptError::Unauthentic { segment: index };
    let counter = u32::try_from(index).map_err(|_| bad.clone())?;
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let tag = Tag::try_from(tag).map_err(|_| bad.clone())?;
    let start = out.len();
    out.extend_from_slice(ct);
    key.aead
        .decrypt_inout_detached(
            &nonce(prefix, counter, last),
            aad,
            (&mut out[start..]).into(),
            &tag,
        )
        .map_err(|_| {
            out.truncate(start);
            bad
        })
}

/// Decrypts an object's body with the key its header names. `Ok(None)` when `body` is
/// plaintext and no keyring is given (the caller uses it as it is); a plaintext body
/// with a keyring is [`CryptError::NotEncrypted`].
pub fn decrypt(
    ring: Option<&Keyring>,
    context: &[u8],
    body: &[u8],
) -> Result<Option<Vec<u8>>, CryptError> {
    if !is_encrypted(body) {
        return match ring {
            Some(_) => Err(CryptError::NotEncrypted),
            None => Ok(None),
        };
    }
    let (key, prefix) = open_header(ring, body)?;
    let mut aad = body[..HEADER_LEN].to_vec();
    aad.extend_from_slice(context);
    let mut rest = &body[HEADER_LEN..];
    let mut out = Vec::with_capacity(rest.len());
    let mut index = 0u64;
    loop {
        if rest.len() < TAG_LEN {
            return Err(CryptError::Unauthentic { segment: index });
        }
        let last = rest.len() <= SEGMENT + TAG_LEN;
        let n = if last { rest.len() } else { SEGMENT + TAG_LEN };
        open_segment(key, &aad, &prefix, index, last, &rest[..n], &mut out)?;
        rest = &rest[n..];
        index += 1;
        if last {
            return Ok(Some(out));
        }
    }
}

/// Decrypts only the first segment of an object of `total_len` bytes, from `start`: its
/// first [`FIRST_SEGMENT_LEN`] bytes (or all of it, if shorter). For reading the header
/// of a large object without fetching it whole. `Ok(None)` as [`decrypt`].
pub fn decrypt_first_segment(
    ring: Option<&Keyring>,
    context: &[u8],
    start: &[u8],
    total_len: u64,
) -> Result<Option<Vec<u8>>, CryptError> {
    if !is_encrypted(start) {
        return match ring {
            Some(_) => Err(CryptError::NotEncrypted),
            None => Ok(None),
        };
    }
    let (key, prefix) = open_header(ring, start)?;
    let mut aad = start[..HEADER_LEN].to_vec();
    aad.extend_from_slice(context);
    let rest = total_len.saturating_sub(HEADER_LEN as u64);
    let last = rest <= (SEGMENT + TAG_LEN) as u64;
    let n = rest.min((SEGMENT + TAG_LEN) as u64) as usize;
    if n < TAG_LEN || start.len() < HEADER_LEN + n {
        return Err(CryptError::Unauthentic { segment: 0 });
    }
    let mut out = Vec::with_capacity(n);
    open_segment(
        key,
        &aad,
        &prefix,
        0,
        last,
        &start[HEADER_LEN..HEADER_LEN + n],
        &mut out,
    )?;
    Ok(Some(out))
}

/// Encrypts a short text for object metadata: `wfse1:` and the base64 of its encryption.
pub fn seal_text(key: &Key, context: &[u8], text: &str) -> Result<String, CryptError> {
    let body = encrypt(key, context, text.as_bytes())?;
    Ok(format!(
        "{TEXT_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(body)
    ))
}

/// The text in metadata `value` ([`seal_text`]); plaintext as [`decrypt`] treats it.
pub fn open_text(
    ring: Option<&Keyring>,
    context: &[u8],
    value: &str,
) -> Result<String, CryptError> {
    let Some(b64) = value.strip_prefix(TEXT_PREFIX) else {
        return match ring {
            Some(_) => Err(CryptError::NotEncrypted),
            None => Ok(value.to_string()),
        };
    };
    let body = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| CryptError::Malformed("metadata that is not base64".into()))?;
    let plain = decrypt(ring, context, &body)?
        .ok_or_else(|| CryptError::Malformed("metadata without a header".into()))?;
    String::from_utf8(plain).map_err(|_| CryptError::Malformed("metadata that is not text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Key {
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8 * 7 + 1);
        }
        Key::parse(&raw).unwrap()
    }

    fn ring(keys: &[u8]) -> Keyring {
        let mut it = keys.iter().map(|&s| key(s));
        Keyring::new(it.next().unwrap(), it)
    }

    fn plain(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 131 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_segment_boundary() {
        let r = ring(&[1]);
        for len in [
            0,
            1,
            100,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 17,
        ] {
            let p = plain(len);
            let body = encrypt(r.current(), b"ltx 0 a", &p).unwrap();
            assert_eq!(body.len() as u64, encrypted_len(len as u64), "{len}");
            assert!(is_encrypted(&body));
            assert_eq!(key_id_of(&body), Some(r.current().id()));
            assert_eq!(decrypt(Some(&r), b"ltx 0 a", &body).unwrap().unwrap(), p);
            // The first segment alone (a header read).
            let first = decrypt_first_segment(
                Some(&r),
                b"ltx 0 a",
                &body[..body.len().min(FIRST_SEGMENT_LEN)],
                body.len() as u64,
            )
            .unwrap()
            .unwrap();
            assert_eq!(first, p[..len.min(SEGMENT)]);
            // Streaming in odd pieces gives a body that decrypts the same.
            let mut e = Encryptor::new(r.current(), b"ltx 0 a").unwrap();
            let mut out = e.header().to_vec();
            for piece in p.chunks(7919) {
                e.push(piece, &mut out).unwrap();
            }
            e.finish(&mut out).unwrap();
            assert_eq!(out.len(), body.len());
            assert_eq!(decrypt(Some(&r), b"ltx 0 a", &out).unwrap().unwrap(), p);
        }
    }

    #[test]
    fn no_plaintext_shows_and_nonces_differ() {
        let r = ring(&[1]);
        let mut p = b"SQLite format 3\0".repeat(100);
        p.extend_from_slice(b"LTX1");
        let a = encrypt(r.current(), b"x", &p).unwrap();
        let b = encrypt(r.current(), b"x", &p).unwrap();
        assert_ne!(a, b, "a fresh nonce per object");
        for body in [&a, &b] {
            assert!(!body.windows(6).any(|w| w == b"SQLite"));
            assert!(!body.windows(4).any(|w| w == b"LTX1"));
        }
    }

    #[test]
    fn a_missing_or_wrong_key_names_the_key_needed() {
        let body = encrypt(&key(1), b"c", b"data").unwrap();
        let id = key(1).id();
        match decrypt(None, b"c", &body).unwrap_err() {
            CryptError::KeyNeeded { id: got, have } => {
                assert_eq!(got, id);
                assert!(have.is_empty());
            }
            e => panic!("{e}"),
        }
        let e = decrypt(Some(&ring(&[2, 3])), b"c", &body).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&id.to_string()), "{text}");
        assert!(text.contains(&key(2).id().to_string()), "{text}");
        assert!(!text.contains('\n'));
        // Rotation: an older key given after the current one decrypts.
        assert_eq!(
            decrypt(Some(&ring(&[2, 1])), b"c", &body).unwrap().unwrap(),
            b"data"
        );
        // Plaintext passes without a key and is refused with one.
        assert_eq!(decrypt(None, b"c", b"LTX1 plain").unwrap(), None);
        assert_eq!(
            decrypt(Some(&ring(&[1])), b"c", b"LTX1 plain").unwrap_err(),
            CryptError::NotEncrypted
        );
    }

    #[test]
    fn tampering_truncation_reordering_and_moving_fail() {
        let r = ring(&[1]);
        let p = plain(3 * SEGMENT + 100);
        let body = encrypt(r.current(), b"ltx 0 a", &p).unwrap();
        let seg = SEGMENT + TAG_LEN;
        let unauthentic = |b: &[u8], ctx: &[u8]| decrypt(Some(&r), ctx, b).unwrap_err();
        // A bit flip in each segment, and in the header's nonce prefix.
        for (at, segment) in [
            (HEADER_LEN + 5, 0),
            (HEADER_LEN + seg + 9, 1),
            (body.len() - 1, 3),
            (20, 0),
        ] {
            let mut bad = body.clone();
            bad[at] ^= 0x10;
            assert_eq!(
                unauthentic(&bad, b"ltx 0 a"),
                CryptError::Unauthentic { segment },
                "flip at {at}"
            );
        }
        // Cut at a segment boundary (the new last segment was not sealed as last), and
        // within a segment.
        for cut in [HEADER_LEN + 2 * seg, HEADER_LEN + seg + 100, HEADER_LEN + 3] {
            assert!(
                matches!(
                    unauthentic(&body[..cut], b"ltx 0 a"),
                    CryptError::Unauthentic { .. }
                ),
                "cut at {cut}"
            );
        }
        // Two segments swapped.
        let mut swapped = body[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&body[HEADER_LEN + seg..HEADER_LEN + 2 * seg]);
        swapped.extend_from_slice(&body[HEADER_LEN..HEADER_LEN + seg]);
        swapped.extend_from_slice(&body[HEADER_LEN + 2 * seg..]);
        assert_eq!(
            unauthentic(&swapped, b"ltx 0 a"),
            CryptError::Unauthentic { segment: 0 }
        );
        // A segment appended (a copy of the last one).
        let mut longer = body.clone();
        longer.extend_from_slice(&body[HEADER_LEN + 3 * seg..]);
        assert!(matches!(
            unauthentic(&longer, b"ltx 0 a"),
            CryptError::Unauthentic { .. }
        ));
        // The body under another object's name.
        assert_eq!(
            unauthentic(&body, b"ltx 0 b"),
            CryptError::Unauthentic { segment: 0 }
        );
        // A header the format does not know.
        let mut newer = body.clone();
        newer[4] = 9;
        assert!(matches!(
            unauthentic(&newer, b"ltx 0 a"),
            CryptError::Malformed(_)
        ));
    }

    #[test]
    fn texts_in_metadata_round_trip() {
        let r = ring(&[1]);
        let sealed = seal_text(r.current(), b"record", "txid=01 blake3=00").unwrap();
        assert!(sealed.is_ascii() && !sealed.contains("txid"));
        assert_eq!(
            open_text(Some(&r), b"record", &sealed).unwrap(),
            "txid=01 blake3=00"
        );
        assert!(matches!(
            open_text(None, b"record", &sealed).unwrap_err(),
            CryptError::KeyNeeded { .. }
        ));
        assert_eq!(open_text(None, b"record", "txid=01").unwrap(), "txid=01");
        assert_eq!(
            open_text(Some(&r), b"record", "txid=01").unwrap_err(),
            CryptError::NotEncrypted
        );
    }

    #[test]
    fn key_files_hold_raw_hex_or_base64_keys_and_weak_ones_are_refused() {
        let raw: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(200))
            .collect();
        let id = Key::parse(&raw).unwrap().id();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        for text in [
            format!("{hex}\n"),
            format!("# made 2026-12-05\n\n  {}  \n", hex.to_uppercase()),
            format!("{b64}\n"),
        ] {
            assert_eq!(Key::parse(text.as_bytes()).unwrap().id(), id, "{text}");
        }
        for (bad, want) in [
            (vec![0u8; 32], "weak"),
            (b"correct horse battery staple 123".to_vec(), "passphrase"),
            (vec![0xffu8; 31], "binary"),
            (format!("{hex}\n{hex}\n").into_bytes(), "2 lines"),
            (hex.as_bytes()[..60].to_vec(), "60 hex digits"),
            (b"not/a key!".to_vec(), "not a key"),
            (b"c2hvcnQ=".to_vec(), "base64 of 5 bytes"),
            (b"# only a comment\n".to_vec(), "0 lines"),
        ] {
            let e = Key::parse(&bad).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'));
        }
        // The id is 16 hex digits and the key never shows.
        let k = Key::parse(&raw).unwrap();
        assert_eq!(k.id().to_string().len(), 16);
        assert!(!format!("{k:?}").contains(&hex[..8]));
    }

    #[test]
    fn keys_come_from_flags_then_files_then_the_key_variable() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, seed: u8| {
            let p = dir.path().join(name);
            let raw: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(53) ^ seed).collect();
            std::fs::write(&p, &raw).unwrap();
            (p, Key::parse(&raw).unwrap().id())
        };
        let (a, id_a) = write("a.key", 1);
        let (b, id_b) = write("b.key", 2);
        let none = |_: &str| None;
        assert!(EncryptionArgs::default()
            .keyring_with_env(none)
            .unwrap()
            .is_none());
        let flags = EncryptionArgs {
            encryption_key_files: vec![b.clone(), a.clone(), b.clone()],
        };
        let r = flags.keyring_with_env(none).unwrap().unwrap();
        assert_eq!(r.ids(), vec![id_b, id_a]);
        let files = format!("{}:{}", a.display(), b.display());
        let env = |k: &str| match k {
            ENV_KEY_FILE => Some(files.clone()),
            ENV_KEY => Some("00".repeat(32)),
            _ => None,
        };
        let r = EncryptionArgs::default()
            .keyring_with_env(env)
            .unwrap()
            .unwrap();
        assert_eq!(r.ids(), vec![id_a, id_b]);
        // The flags win over the environment.
        let r = flags.keyring_with_env(env).unwrap().unwrap();
        assert_eq!(r.current().id(), id_b);
        let hex: String = (0..32u8).map(|i| format!("{:02x}", i * 3 + 1)).collect();
        let r = EncryptionArgs::default()
            .keyring_with_env(|k| (k == ENV_KEY).then(|| hex.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(r.ids().len(), 1);
        let e = EncryptionArgs::default()
            .keyring_with_env(|k| (k == ENV_KEY).then(|| "00".repeat(32)))
            .unwrap_err();
        assert!(e.contains(ENV_KEY) && e.contains("weak"), "{e}");
        let e = EncryptionArgs {
            encryption_key_files: vec![dir.path().join("missing.key")],
        }
        .keyring_with_env(none)
        .unwrap_err();
        assert!(e.contains("missing.key"), "{e}");
        std::fs::write(dir.path().join("short.key"), b"abc\n").unwrap();
        let e = EncryptionArgs {
            encryption_key_files: vec![dir.path().join("short.key")],
        }
        .keyring_with_env(none)
        .unwrap_err();
        assert!(e.contains("short.key") && e.contains("head -c 32"), "{e}");
    }
}
