//! Azurite, the Azure Storage emulator (npm `azurite`, which `scripts/test` installs), as
//! the tests run it: `azurite-blob` on a free port of 127.0.0.1 over a temporary directory,
//! killed on drop; and an Azure client independent of walfs's (Python's standard library
//! signing Shared Key requests) to create the container and to read what walfs wrote.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, installed_tool};

/// Azurite's account and its published key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container the tests replicate into.
pub const CONTAINER: &str = "walfs-test";

/// Azurite's account key, as a child's environment.
pub const AZURE_ENV: &[(&str, &str)] = &[("AZURE_STORAGE_ACCOUNT_KEY", KEY)];

/// The `azurite-blob` that `scripts/test` installs (`$AZURITE`, else the cache).
pub fn azurite_path() -> PathBuf {
    installed_tool("AZURITE", "azurite/node_modules/.bin/azurite-blob")
}

/// The Python client: `az(method, path, query, body, headers)` signs a Shared Key request
/// for account `ACCOUNT` with `KEY` at `PORT` and returns (status, headers, body).
const CLIENT: &str = r#"
import base64, hashlib, hmac, json, sys, urllib.request, urllib.parse, urllib.error, email.utils
def az(method, path, query=None, body=b'', headers=None):
    query = dict(query or {})
    headers = dict(headers or {})
    headers['x-ms-date'] = email.utils.formatdate(usegmt=True)
    headers['x-ms-version'] = '2021-08-06'
    if method in ('PUT', 'POST'):
        headers.setdefault('Content-Type', 'application/octet-stream')
    upath = '/' + ACCOUNT + path
    canon_h = ''.join(f'{k}:{headers[k]}\n' for k in sorted(h for h in headers if h.startswith('x-ms-')))
    canon_r = '/' + ACCOUNT + upath + ''.join(f'\n{k}:{query[k]}' for k in sorted(query))
    length = str(len(body)) if body else ''
    sts = '\n'.join([method, '', '', length, '', headers.get('Content-Type', ''), '', '', '', '', '', '']) + '\n' + canon_h + canon_r
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), sts.encode(), hashlib.sha256).digest()).decode()
    headers['Authorization'] = f'SharedKey {ACCOUNT}:{sig}'
    url = f'http://127.0.0.1:{PORT}{urllib.parse.quote(upath)}'
    if query:
        url += '?' + urllib.parse.urlencode(query)
    r = urllib.request.Request(url, data=body if method in ('PUT', 'POST') else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(r) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
"#;

/// A running `azurite-blob` holding container [`CONTAINER`]; killed on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
    /// The storage account it serves, and its key.
    pub account: String,
    pub key: String,
    _dir: tempfile::TempDir,
    log: tempfile::NamedTempFile,
}

impl Azurite {
    /// Azurite with its default account, [`ACCOUNT`] and [`KEY`].
    pub fn start() -> Azurite {
        Azurite::start_with_account(ACCOUNT, KEY)
    }

    /// Azurite serving only `account`, whose key is `key` (base64).
    pub fn start_with_account(account: &str, key: &str) -> Azurite {
        let bin = azurite_path();
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("walfs-azurite-")
            .tempdir()
            .unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .env("AZURITE_ACCOUNTS", format!("{account}:{key}"))
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut az = Azurite {
            child,
            port,
            account: account.to_string(),
            key: key.to_string(),
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !az.log_text().contains("successfully listens") {
            if let Ok(Some(status)) = az.child.try_wait() {
                panic!("azurite-blob exited with {status}: {}", az.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "azurite-blob did not listen on port {port} within 60 s: {}",
                az.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = az.python(&format!(
            "s, h, b = az('PUT', '/{CONTAINER}', {{'restype': 'container'}})\n\
             assert s == 201, (s, b)"
        ));
        assert!(out.status.success(), "create container: {out:?}");
        az
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// The `abs://` URL of `prefix` in the container on this server.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "abs://{}@{CONTAINER}/{prefix}?endpoint=http://127.0.0.1:{}/{}",
            self.account, self.port, self.account
        )
    }

    /// Runs a Python `script` with `az(...)` (see [`CLIENT`]) bound to this server, and
    /// `json`, `sys` imported.
    pub fn python(&self, script: &str) -> std::process::Output {
        let prelude = format!(
            "PORT = {}\nACCOUNT = {:?}\nKEY = {:?}\n{CLIENT}\n",
            self.port, self.account, self.key
        );
        Command::new("python3")
            .arg("-c")
            .arg(prelude + script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3: {e}"))
    }

    /// Every blob under `prefix/`, with its metadata, as the independent client lists it:
    /// (name, [(metadata name, value)]).
    pub fn blobs(&self, prefix: &str) -> Vec<(String, Vec<(String, String)>)> {
        let out = self.python(&format!(
            "import xml.etree.ElementTree as ET\n\
             s, h, b = az('GET', '/{CONTAINER}', {{'restype': 'container', 'comp': 'list', \
             'prefix': '{prefix}/', 'include': 'metadata'}})\n\
             assert s == 200, (s, b)\n\
             for blob in ET.fromstring(b).iter('Blob'):\n\
             \x20   md = blob.find('Metadata')\n\
             \x20   pairs = [m.tag + '=' + (m.text or '') for m in (md if md is not None else [])]\n\
             \x20   print('\\t'.join([blob.find('Name').text] + pairs))"
        ));
        assert!(
            out.status.success(),
            "list blobs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let mut fields = l.split('\t');
                let name = fields.next().unwrap().to_string();
                let md = fields
                    .map(|f| {
                        let (k, v) = f.split_once('=').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name, md)
            })
            .collect()
    }

    /// The text of blob `name`.
    pub fn get_text(&self, name: &str) -> String {
        let out = self.python(&format!(
            "s, h, b = az('GET', '/{CONTAINER}/{name}')\n\
             assert s == 200, (s, b)\n\
             sys.stdout.write(b.decode())"
        ));
        assert!(
            out.status.success(),
            "get {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes blob `name` with `text`, unconditionally.
    pub fn put_text(&self, name: &str, text: &str) {
        let out = self.python(&format!(
            "s, h, b = az('PUT', '/{CONTAINER}/{name}', body={:?}.encode(), \
             headers={{'x-ms-blob-type': 'BlockBlob'}})\n\
             assert s == 201, (s, b)",
            text
        ));
        assert!(
            out.status.success(),
            "put {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
