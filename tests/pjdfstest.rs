//! POSIX conformance: runs the pjdfstest suite (the Rust rewrite, crate `pjdfstest` on
//! crates.io) once on a bare temporary directory and once on a walfs mount, and fails if any
//! test case that passes on the bare directory does not pass through walfs.
//!
//! The binary comes from `$PJDFSTEST` or from where `scripts/install-pjdfstest` puts it.
//! This test never skips: without the binary it fails and says how to install it.
//!
//! Both runs use the same configuration (features, dummy users, secondary file system), so
//! a case the backing file system cannot do is skipped or failed on both sides alike. The
//! suite switches to unprivileged users for permission checks, so it is run as root and
//! every directory above the tested one is made traversable (0755).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Must match VERSION in scripts/install-pjdfstest.
const PJDFSTEST_VERSION: &str = "0.2.2";
/// Upper bound for one run of the whole suite (a bare run takes about 3 s).
const RUN_LIMIT: Duration = Duration::from_secs(240);

fn pjdfstest_bin() -> PathBuf {
    common::installed_tool(
        "PJDFSTEST",
        &format!("pjdfstest-{PJDFSTEST_VERSION}/bin/pjdfstest"),
    )
}

/// The primary group name of `user`, from /etc/passwd and /etc/group.
fn primary_group(user: &str) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let gid = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| f[3].to_string())
    })?;
    let group = std::fs::read_to_string("/etc/group").ok()?;
    group.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == gid).then(|| f[0].to_string())
    })
}

/// pjdfstest needs two unprivileged users, each with its own primary group. Debian has
/// `nobody` (group `nogroup`) and `daemon` (group `daemon`) on every machine, so no user
/// needs to be created.
fn config_toml() -> String {
    let mut entries = Vec::new();
    for user in ["nobody", "daemon"] {
        let group = primary_group(user)
            .unwrap_or_else(|| panic!("pjdfstest needs the user {user:?} with a primary group"));
        entries.push(format!("  [\"{user}\", \"{group}\"],"));
    }
    format!(
        "[features]\n\
         posix_fallocate = {{}}\n\
         utime_now = {{}}\n\
         utimensat = {{}}\n\
         rename_ctime = {{}}\n\
         \n\
         [settings]\n\
         naptime = 0.01\n\
         allow_remount = false\n\
         \n\
         [dummy_auth]\n\
         entries = [\n{}\n]\n",
        entries.join("\n")
    )
}

/// Cases that pass on the bare directory but that the suite *skips* on any FUSE mount, for
/// reasons outside the file system's control. Only a skip is accepted for these; a failure
/// still counts.
const INHERENT_TO_FUSE: &[(&str, &str)] = &[(
    "link::link_count_max",
    "glibc's pathconf(_PC_LINK_MAX) does not know FUSE's f_type and answers 127, \
     which pjdfstest takes for \"limit unknown\"",
)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Skipped,
    ExpectedFailure,
    UnexpectedPass,
}

const STATUSES: [(&str, Status); 5] = [
    ("PASSED UNEXPECTEDLY", Status::UnexpectedPass),
    ("failed as expected", Status::ExpectedFailure),
    ("FAILED", Status::Failed),
    ("skipped", Status::Skipped),
    ("ok", Status::Ok),
];

#[derive(Debug)]
struct Outcome {
    status: Status,
    /// The panic message (or skip reasons), one entry per line.
    message: Vec<String>,
    /// `src/...rs:LINE:COL` frames of the backtrace that lie in pjdfstest's own test code,
    /// innermost first (the crate's source is in ~/.cargo/registry/src/*/pjdfstest-*/).
    location: Vec<String>,
}

impl Outcome {
    fn describe(&self) -> String {
        let mut s = format!("{:?}", self.status);
        for line in &self.message {
            s.push_str("\n        ");
            s.push_str(line.trim());
        }
        if !self.location.is_empty() {
            s.push_str("\n        at ");
            s.push_str(&self.location.join(" <- "));
        }
        s
    }
}

struct Run {
    outcomes: BTreeMap<String, Outcome>,
    summary: String,
    elapsed: Duration,
}

impl Run {
    fn passed(&self) -> BTreeSet<&str> {
        self.outcomes
            .iter()
            .filter(|(_, o)| o.status == Status::Ok)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn count(&self, status: Status) -> usize {
        self.outcomes
            .values()
            .filter(|o| o.status == status)
            .count()
    }
}

/// Parses pjdfstest's stdout: one `NAME   STATUS` line per case, followed by lines that
/// start with whitespace (panic message, skip reasons) and, for failures, a `Backtrace:`
/// block.
fn parse(stdout: &str) -> (BTreeMap<String, Outcome>, Option<String>) {
    let mut outcomes = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut summary = None;
    let mut in_backtrace = false;
    for line in stdout.lines() {
        if line.starts_with("Summary:") {
            summary = Some(line.to_string());
            current = None;
            continue;
        }
        if line.starts_with("Backtrace:") {
            in_backtrace = true;
            continue;
        }
        if !line.is_empty() && !line.starts_with(char::is_whitespace) {
            let trimmed = line.trim_end();
            let parsed = STATUSES.iter().find_map(|(word, status)| {
                let name = trimmed.strip_suffix(word)?;
                if !name.ends_with(char::is_whitespace) {
                    return None;
                }
                let name = name.trim();
                (!name.is_empty() && !name.contains(char::is_whitespace))
                    .then(|| (name.to_string(), *status))
            });
            if let Some((name, status)) = parsed {
                in_backtrace = false;
                outcomes.insert(
                    name.clone(),
                    Outcome {
                        status,
                        message: Vec::new(),
                        location: Vec::new(),
                    },
                );
                current = Some(name);
                continue;
            }
        }
        let Some(o) = current.as_ref().and_then(|n| outcomes.get_mut(n)) else {
            continue;
        };
        if in_backtrace {
            // "             at /root/.cargo/registry/src/.../pjdfstest-0.2.2/src/tests/x.rs:79:9"
            if let Some(at) = line.trim().strip_prefix("at ") {
                if let Some(i) = at.find("/pjdfstest-") {
                    let rest = &at[i + 1..];
                    if let Some(j) = rest.find("/src/") {
                        let loc = &rest[j + 1..];
                        if !loc.starts_with("src/main.rs") && !o.location.iter().any(|l| l == loc) {
                            o.location.push(loc.to_string());
                        }
                    }
                }
            }
        } else if !line.trim().is_empty() {
            o.message.push(line.to_string());
        }
    }
    (outcomes, summary)
}

/// Runs the whole suite in `dir`; panics if pjdfstest does not finish or prints no summary.
fn run_pjdfstest(bin: &Path, config: &Path, secondary: Option<&Path>, dir: &Path) -> Run {
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(config).arg("-p").arg(dir);
    if let Some(s) = secondary {
        cmd.arg("-s").arg(s);
    }
    let start = Instant::now();
    let mut child = cmd
        .env("NO_COLOR", "1")
        .env("CLICOLOR", "0")
        .env("RUST_LIB_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let status = common::wait_timeout(&mut child, RUN_LIMIT);
    let elapsed = start.elapsed();
    if status.is_none() {
        child.kill().ok();
        child.wait().ok();
    }
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        let last: Vec<&str> = stdout
            .lines()
            .filter(|l| !l.starts_with(char::is_whitespace))
            .collect();
        panic!(
            "pjdfstest in {} did not finish within {RUN_LIMIT:?}; it hung in the case after \
             {:?}\nstderr: {stderr}",
            dir.display(),
            last.last()
        );
    };
    let (outcomes, summary) = parse(&stdout);
    let Some(summary) = summary else {
        panic!(
            "pjdfstest in {} exited with {status} without a summary\nstderr: {stderr}\n\
             stdout (tail): {}",
            dir.display(),
            tail(&stdout, 40)
        );
    };
    Run {
        outcomes,
        summary,
        elapsed,
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn chmod_755(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 755 {}: {e}", p.display()));
}

#[test]
fn pjdfstest_passes_on_walfs_wherever_it_passes_on_the_bare_directory() {
    let bin = pjdfstest_bin();
    let work = tempfile::Builder::new()
        .prefix("walfs-pjdfstest-")
        .tempdir()
        .unwrap();
    let config = work.path().join("pjdfstest.toml");
    std::fs::write(&config, config_toml()).unwrap();

    // EXDEV cases need a second file system: tmpfs, distinct from both the bare directory
    // and the mount.
    let secondary = Path::new("/dev/shm")
        .is_dir()
        .then(|| {
            tempfile::Builder::new()
                .prefix("walfs-pjdfstest-")
                .tempdir_in("/dev/shm")
                .ok()
        })
        .flatten();
    let secondary_path = secondary.as_ref().map(|d| d.path());

    // The mount: `--allow-other`, because without it FUSE refuses every request from a
    // user other than the one who mounted (pjdfstest switches to `nobody` and `daemon`).
    // The harness's temp root is 0700; those users must be able to reach the mountpoint.
    let mut m = common::Mount::with_args(&["--allow-other"]);
    chmod_755(m.root.path());
    chmod_755(&m.backing);
    // Drain the daemon's stderr so that a chatty daemon cannot block on a full pipe.
    let mut daemon_err = m.child.as_mut().unwrap().stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        daemon_err.read_to_string(&mut s).ok();
        s
    });

    // 1. The bare directory: a plain directory on the same file system as the backing
    // directory, beside the mountpoint and with a name of the same length, so that cases
    // whose paths depend on the base path's length (ENAMETOOLONG, PATH_MAX) see the same
    // lengths in both runs.
    let bare = m.root.path().join("raw");
    assert_eq!(bare.as_os_str().len(), m.mountpoint.as_os_str().len());
    std::fs::create_dir(&bare).unwrap();
    chmod_755(&bare);
    let bare_run = run_pjdfstest(&bin, &config, secondary_path, &bare);

    // 2. The same suite through walfs.
    let walfs_run = run_pjdfstest(&bin, &config, secondary_path, &m.mountpoint);

    // Stop the daemon ourselves (its stderr was taken, so Mount::stop cannot be used).
    let mut child = m.child.take().unwrap();
    let daemon_exited = child.try_wait().unwrap();
    if daemon_exited.is_none() {
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let stop_status = common::wait_timeout(&mut child, Duration::from_secs(15));
    if stop_status.is_none() {
        child.kill().ok();
        child.wait().ok();
    }
    let still_mounted = common::is_mounted(&m.mountpoint);
    let daemon_stderr = err_reader.join().unwrap_or_default();
    drop(m);

    let bare_pass = bare_run.passed();
    let walfs_pass = walfs_run.passed();
    println!(
        "pjdfstest: bare {} passed, walfs {} passed",
        bare_pass.len(),
        walfs_pass.len()
    );
    println!(
        "pjdfstest bare  ({:.1} s): {}",
        bare_run.elapsed.as_secs_f64(),
        bare_run.summary
    );
    println!(
        "pjdfstest walfs ({:.1} s): {}",
        walfs_run.elapsed.as_secs_f64(),
        walfs_run.summary
    );

    assert!(
        bare_pass.len() > 300,
        "pjdfstest passed only {} cases on the bare directory {}: is this run as root, \
         with the users nobody and daemon?\n{}",
        bare_pass.len(),
        bare.display(),
        bare_run.summary
    );
    let gained: Vec<&&str> = walfs_pass.difference(&bare_pass).collect();
    if !gained.is_empty() {
        println!("pjdfstest: passed on walfs only (not a failure): {gained:?}");
    }

    let mut lost = Vec::new();
    for name in bare_pass.difference(&walfs_pass).copied() {
        let status = walfs_run.outcomes.get(name).map(|o| o.status);
        match INHERENT_TO_FUSE.iter().find(|(n, _)| *n == name) {
            Some((_, why)) if status == Some(Status::Skipped) => {
                println!("pjdfstest: {name} skipped on walfs, accepted: {why}")
            }
            _ => lost.push(name),
        }
    }
    let mut report = String::new();
    for name in &lost {
        let what = walfs_run
            .outcomes
            .get(*name)
            .map(|o| o.describe())
            .unwrap_or_else(|| "not run".to_string());
        report.push_str(&format!("  {name}: {what}\n"));
    }
    let stop_problem = match stop_status {
        Some(st) if daemon_exited.is_some() => {
            Some(format!("walfs exited with {st} during the pjdfstest run"))
        }
        Some(st) if !st.success() => Some(format!("walfs exited with {st} after SIGTERM")),
        Some(_) if still_mounted => Some("still mounted after walfs exited".to_string()),
        Some(_) => None,
        None => Some("walfs did not exit within 15 s of SIGTERM".to_string()),
    };
    assert!(
        lost.is_empty() && stop_problem.is_none(),
        "pjdfstest: {} of the {} cases that pass on a bare directory do not pass on walfs \
         (bare {} passed, walfs {} passed, {} failed, {} skipped){}\n{report}\
         \nwalfs stderr (tail):\n{}",
        lost.len(),
        bare_pass.len(),
        bare_pass.len(),
        walfs_pass.len(),
        walfs_run.count(Status::Failed),
        walfs_run.count(Status::Skipped),
        stop_problem.map(|p| format!("\n{p}")).unwrap_or_default(),
        tail(&daemon_stderr, 40)
    );
}
