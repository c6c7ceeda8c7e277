//! The `walfs` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use walfs::mount::MountOptions;
use walfs::restore::{ListArgs, RestoreArgs, VerifyArgs};

#[derive(Parser)]
#[command(
    name = "walfs",
    version,
    about = "A FUSE filesystem that replicates unmodified SQLite programs"
)]
struct Cli {
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter such as
    /// walfs=debug). Overrides RUST_LOG.
    #[arg(long, global = true)]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mirror BACKING at MOUNTPOINT, in the foreground, until unmounted (SIGINT, SIGTERM or
    /// fusermount3 -u).
    Mount(Box<MountArgs>),
    /// Restore databases from a replica, verified (content checksum where the writer
    /// recorded one, and PRAGMA integrity_check), written atomically.
    Restore(RestoreArgs),
    /// List the databases in a replica with their latest TXID, time and size.
    List(ListArgs),
    /// Restore drill: restore the latest state and a random earlier TXID of each database
    /// into a temporary directory, check the content checksum and PRAGMA integrity_check,
    /// and report. Only reads the replica. Exits non-zero on any problem.
    Verify(VerifyArgs),
    /// Show what a running mount replicates: each database's TXID, and per replica the TXID
    /// it holds, its lag, its last upload and last error. Exits 0 when every replica is
    /// within --max-lag, 1 when one is behind longer, 3 when no walfs mount answers at
    /// MOUNTPOINT.
    Status(StatusArgs),
    /// Container entrypoint: restore BACKING from the first replica that holds databases if
    /// BACKING holds none, mount (as `walfs mount`), run CMD once the
    /// mount serves, forward SIGTERM, SIGINT and SIGHUP to it, and when it exits upload
    /// what is pending, unmount and exit with its status.
    Run(Box<RunArgs>),
    /// Wait until MOUNTPOINT is a walfs mount that answers requests; exit non-zero after
    /// the timeout.
    Wait(walfs::ready::WaitArgs),
    /// Follower: mount every database of the replica at URL read-only at MOUNTPOINT, on
    /// any host, kept at the writer's latest upload (new databases appear, deleted ones
    /// go). Each read transaction of an unmodified SQLite reader sees one committed state.
    Follow(Box<walfs::follow::FollowArgs>),
}

/// The arguments of `walfs status`.
#[derive(Args)]
struct StatusArgs {
    /// The mountpoint of a running `walfs mount`.
    mountpoint: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 1 when a replica lacks a commit older than this (10s, 1m, ...).
    #[arg(long, default_value = "60s", value_parser = walfs::flags::duration)]
    max_lag: std::time::Duration,
}

/// The arguments of `walfs run`: those of `walfs mount`, then the command.
#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    mount: MountArgs,
    /// The command to run on the mount, with its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// The arguments of `walfs mount`: the mount's settings, and the file they may come from.
#[derive(Args)]
struct MountArgs {
    #[command(flatten)]
    options: MountOptions,
    /// Read settings from this TOML file: its keys are the long flags of `walfs mount`
    /// and `backing`/`mountpoint` (e.g. sync-interval = "1s", replica = ["s3://..."],
    /// allow-other = true). Flags on the command line override it.
    // `walfs::config::expand_config` reads the file before clap parses; the value is
    // declared here for `--help` and so that clap accepts the flag.
    #[arg(long = walfs::config::CONFIG_FLAG, value_name = "FILE", env = walfs::config::CONFIG_ENV)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let argv = match walfs::config::expand_config(
        &Cli::command(),
        subcommand_of(&argv),
        argv.clone(),
        |k| std::env::var_os(k),
    ) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("walfs: error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    init_logging(cli.log_level.as_deref());
    if let Command::Status(args) = &cli.command {
        return status(args);
    }
    // Each layer returns its own error type; here they become one report whose `{:#}`
    // prints the chain of causes joined by ": ".
    let result: anyhow::Result<()> = match &cli.command {
        Command::Mount(args) => walfs::mount::run(&args.options).map_err(Into::into),
        Command::Restore(args) => walfs::restore::restore_command(args).map_err(Into::into),
        Command::List(args) => walfs::restore::list_command(args).map_err(Into::into),
        Command::Verify(args) => walfs::restore::verify_command(args).map_err(Into::into),
        Command::Status(_) => unreachable!("answered above"),
        Command::Run(args) => match walfs::run::run_command(&args.mount.options, &args.command) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e.into()),
        },
        Command::Wait(args) => walfs::ready::wait_command(args).map_err(anyhow::Error::msg),
        Command::Follow(args) => walfs::follow::follow_command(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `walfs status`: prints the mount's status and exits with the documented code.
fn status(args: &StatusArgs) -> ExitCode {
    use walfs::observe::status::{query, table, EXIT_BEHIND, EXIT_NOT_RUNNING};
    let status = match query(&args.mountpoint) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("walfs: error: {}", e.0);
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("a status encodes")
        );
    } else {
        print!("{}", table(&status));
    }
    let lag = status.max_lag();
    if lag > args.max_lag.as_secs_f64() {
        eprintln!(
            "walfs: a replica is {lag:.1}s behind, more than --max-lag {:?}",
            args.max_lag
        );
        return ExitCode::from(EXIT_BEHIND);
    }
    ExitCode::SUCCESS
}

/// The subcommand named on the command line `argv` (the first argument that is not the
/// global `--log-level` or its value), or "".
fn subcommand_of(argv: &[OsString]) -> &str {
    let mut args = argv.iter().skip(1).map(|a| a.to_str().unwrap_or(""));
    while let Some(a) = args.next() {
        match a {
            "--log-level" => {
                args.next();
            }
            a if a.starts_with("--log-level=") => {}
            a => return a,
        }
    }
    ""
}

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(walfs::fs::log_filter::StaleReplyFilter)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::time::Duration;
    use walfs::mount::DatabaseIo;
    use walfs::replica::maintain::MaintenanceOptions;
    use walfs::replica::sync::{SyncOptions, SyncTimeoutAction};
    use walfs::replicate::ReplicationOptions;

    /// Every argument of `walfs mount` that a config file may set, each with a value other
    /// than its default: (config key, TOML value, the same on the command line).
    /// `every_mount_argument_has_a_setting` fails when a flag is missing here.
    const SETTINGS: &[(&str, &str, &[&str])] = &[
        ("backing", r#""/srv/data""#, &["/srv/data"]),
        ("mountpoint", r#""/mnt/data""#, &["/mnt/data"]),
        ("allow-other", "true", &["--allow-other"]),
        ("read-only", "true", &["--read-only"]),
        ("threads", "2", &["--threads", "2"]),
        ("no-passthrough", "true", &["--no-passthrough"]),
        ("database-io", r#""cached""#, &["--database-io", "cached"]),
        ("cache-ttl", "0.5", &["--cache-ttl", "0.5"]),
        ("allow-nonempty", "true", &["--allow-nonempty"]),
        (
            "metrics-addr",
            r#""127.0.0.1:9090""#,
            &["--metrics-addr", "127.0.0.1:9090"],
        ),
        (
            "ready-file",
            r#""/run/walfs.ready""#,
            &["--ready-file", "/run/walfs.ready"],
        ),
        (
            "replica",
            r#"["s3://bucket/prefix?region=eu-west-1", "file:///backup/walfs"]"#,
            &[
                "--replica",
                "s3://bucket/prefix?region=eu-west-1",
                "--replica",
                "file:///backup/walfs",
            ],
        ),
        (
            "staging-dir",
            r#""/var/lib/walfs/staging""#,
            &["--staging-dir", "/var/lib/walfs/staging"],
        ),
        ("sync-interval", r#""250ms""#, &["--sync-interval", "250ms"]),
        ("stage-at-commit", "true", &["--stage-at-commit"]),
        ("takeover", "true", &["--takeover"]),
        ("no-follower-feed", "true", &["--no-follower-feed"]),
        ("lease-ttl", r#""10s""#, &["--lease-ttl", "10s"]),
        ("sync-replication", "true", &["--sync-replication"]),
        (
            "sync-database",
            r#"["orders.db", "tenants/*.db"]"#,
            &[
                "--sync-database",
                "orders.db",
                "--sync-database",
                "tenants/*.db",
            ],
        ),
        ("sync-timeout", r#""2s""#, &["--sync-timeout", "2s"]),
        (
            "sync-timeout-action",
            r#""eio""#,
            &["--sync-timeout-action", "eio"],
        ),
        ("max-staging", r#""1.5G""#, &["--max-staging", "1.5G"]),
        (
            "compaction-intervals",
            r#""10s,1m""#,
            &["--compaction-intervals", "10s,1m"],
        ),
        (
            "snapshot-interval",
            r#""12h""#,
            &["--snapshot-interval", "12h"],
        ),
        ("retention", "3600", &["--retention", "3600"]),
        ("l0-retention", r#""1m""#, &["--l0-retention", "1m"]),
        (
            "encryption-key-file",
            r#"["/etc/walfs/new.key", "/etc/walfs/old.key"]"#,
            &[
                "--encryption-key-file",
                "/etc/walfs/new.key",
                "--encryption-key-file",
                "/etc/walfs/old.key",
            ],
        ),
    ];

    /// What `SETTINGS`, all together, mean.
    fn every_setting() -> MountOptions {
        MountOptions {
            backing: "/srv/data".into(),
            mountpoint: "/mnt/data".into(),
            allow_other: true,
            read_only: true,
            threads: 2,
            no_passthrough: true,
            database_io: DatabaseIo::Cached,
            cache_ttl: Duration::from_millis(500),
            allow_nonempty: true,
            metrics_addr: Some("127.0.0.1:9090".into()),
            ready_file: Some("/run/walfs.ready".into()),
            replication: ReplicationOptions {
                replicas: vec![
                    "s3://bucket/prefix?region=eu-west-1".into(),
                    "file:///backup/walfs".into(),
                ],
                staging_dir: Some("/var/lib/walfs/staging".into()),
                sync_interval: Duration::from_millis(250),
                stage_at_commit: true,
                takeover: true,
                no_follower_feed: true,
                lease_ttl: Duration::from_secs(10),
                sync: SyncOptions {
                    sync_replication: true,
                    sync_databases: vec!["orders.db".into(), "tenants/*.db".into()],
                    sync_timeout: Duration::from_secs(2),
                    sync_timeout_action: SyncTimeoutAction::Eio,
                },
                max_staging: Some(3 << 29),
                maintenance: MaintenanceOptions {
                    compaction_intervals: vec![Duration::from_secs(10), Duration::from_secs(60)],
                    snapshot_interval: Duration::from_secs(12 * 3600),
                    retention: Duration::from_secs(3600),
                    l0_retention: Duration::from_secs(60),
                },
                encryption: walfs::replica::crypt::EncryptionArgs {
                    encryption_key_files: vec![
                        "/etc/walfs/new.key".into(),
                        "/etc/walfs/old.key".into(),
                    ],
                },
            },
        }
    }

    /// `walfs mount ARGS`, with `config` (a TOML text) as its config file if given, as
    /// `main` parses it; the error of the first step that refuses it.
    fn parse_mount(args: &[&str], config: Option<&str>) -> Result<MountOptions, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walfs.toml");
        let mut argv: Vec<OsString> = ["walfs", "mount"].map(OsString::from).to_vec();
        argv.extend(args.iter().map(OsString::from));
        if let Some(text) = config {
            std::fs::write(&path, text).unwrap();
            argv.extend(["--config".into(), path.clone().into_os_string()]);
        }
        let argv = walfs::config::expand_config(&Cli::command(), "mount", argv, |_| None)
            .map_err(|e| format!("{e:#}"))?;
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Mount(m) => Ok(m.options),
            _ => panic!("not a mount"),
        }
    }

    /// `walfs run ARGS -- CMD...`, with `config` as its config file if given, as `main`
    /// parses it: its mount options and its command.
    fn parse_run(
        args: &[&str],
        config: Option<&str>,
        cmd: &[&str],
    ) -> Result<(MountOptions, Vec<OsString>), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walfs.toml");
        let mut argv: Vec<OsString> = ["walfs", "--log-level", "debug", "run"]
            .map(OsString::from)
            .to_vec();
        argv.extend(args.iter().map(OsString::from));
        if let Some(text) = config {
            std::fs::write(&path, text).unwrap();
            argv.extend(["--config".into(), path.clone().into_os_string()]);
        }
        argv.push("--".into());
        argv.extend(cmd.iter().map(OsString::from));
        let sub = subcommand_of(&argv).to_string();
        let argv = walfs::config::expand_config(&Cli::command(), &sub, argv, |_| None)
            .map_err(|e| format!("{e:#}"))?;
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run(r) => Ok((r.mount.options, r.command)),
            _ => panic!("not a run"),
        }
    }

    /// `walfs run` takes every setting of `walfs mount`, on the command line and in a
    /// config file, and the command after `--` is the command's, even when it looks like
    /// walfs's own flags or subcommands.
    #[test]
    fn run_takes_every_mount_setting_and_a_command() {
        let cmd = ["sh", "-c", "exit 3", "--replica", "mount"];
        let argv: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|(_, _, a)| a.iter().copied())
            .collect();
        let (opts, command) = parse_run(&argv, None, &cmd).unwrap();
        assert_eq!(opts, every_setting());
        assert_eq!(command, cmd.map(OsString::from).to_vec());
        let text: String = SETTINGS
            .iter()
            .map(|(key, toml, _)| format!("{key} = {toml}\n"))
            .collect();
        let (opts, command) = parse_run(&[], Some(&text), &cmd).unwrap();
        assert_eq!(opts, every_setting());
        assert_eq!(command, cmd.map(OsString::from).to_vec());
        // No command: refused.
        assert!(parse_run(&["/b", "/m"], None, &[]).is_err());
    }

    fn is_positional(key: &str) -> bool {
        ["backing", "mountpoint"].contains(&key)
    }

    /// The config keys of `walfs mount` are read off clap's definition (src/config.rs):
    /// each of them, so each flag, has an entry in `SETTINGS`, which the tests below
    /// check on the command line and in a config file.
    #[test]
    fn every_mount_argument_has_a_setting() {
        let cli = Cli::command();
        let mount = cli.find_subcommand("mount").unwrap();
        let mut keys: Vec<String> = mount
            .get_arguments()
            .filter(|a| !matches!(a.get_action(), clap::ArgAction::Help))
            .filter(|a| a.get_long() != Some(walfs::config::CONFIG_FLAG))
            .map(|a| match a.get_long() {
                Some(long) => long.to_string(),
                None => a.get_id().to_string(),
            })
            .collect();
        keys.sort();
        let mut covered: Vec<String> = SETTINGS.iter().map(|(k, _, _)| k.to_string()).collect();
        covered.sort();
        assert_eq!(
            keys, covered,
            "every argument of `walfs mount` needs an entry in SETTINGS"
        );
        assert_eq!(
            keys.len(),
            28,
            "26 flags besides --config, and 2 positionals"
        );
    }

    /// Every setting of `walfs mount` works on the command line: each one alone changes
    /// the options, and all together give what they say.
    #[test]
    fn command_line_reaches_every_mount_setting() {
        let base = parse_mount(&["/srv/data", "/mnt/data"], None).unwrap();
        // The flags' defaults are the ones the maintenance code assumes.
        assert_eq!(base.replication.maintenance, MaintenanceOptions::default());
        assert_eq!(base.replication.sync, SyncOptions::default());
        for (key, _, args) in SETTINGS.iter().filter(|(k, _, _)| !is_positional(k)) {
            let mut argv = vec!["/srv/data", "/mnt/data"];
            argv.extend_from_slice(args);
            let one = parse_mount(&argv, None).unwrap();
            assert_ne!(one, base, "{key} changed nothing");
        }
        let argv: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|(_, _, a)| a.iter().copied())
            .collect();
        assert_eq!(parse_mount(&argv, None).unwrap(), every_setting());
    }

    /// Every setting of `walfs mount` works in a config file, alone and all together, as
    /// it does on the command line.
    #[test]
    fn config_file_reaches_every_mount_setting() {
        for (key, toml, args) in SETTINGS.iter().filter(|(k, _, _)| !is_positional(k)) {
            let positionals = ["/srv/data", "/mnt/data"];
            let from_file = parse_mount(&positionals, Some(&format!("{key} = {toml}\n"))).unwrap();
            let mut argv = positionals.to_vec();
            argv.extend_from_slice(args);
            assert_eq!(from_file, parse_mount(&argv, None).unwrap(), "{key}");
        }
        let text: String = SETTINGS
            .iter()
            .map(|(key, toml, _)| format!("{key} = {toml}\n"))
            .collect();
        assert_eq!(parse_mount(&[], Some(&text)).unwrap(), every_setting());
    }

    /// Seconds that `Duration` cannot hold (or that mean nothing) are refused with one
    /// line, on the command line and in a config file, instead of a panic.
    #[test]
    fn cache_ttl_out_of_range_is_refused() {
        for bad in ["inf", "NaN", "-1", "1e10", "1e300"] {
            let e = parse_mount(&["/b", "/m", &format!("--cache-ttl={bad}")], None).unwrap_err();
            assert!(
                e.contains(&format!(
                    "{bad:?} is not a number of seconds from 0 to 1000000000"
                )),
                "{e}"
            );
        }
        for bad in ["inf", "nan", "-1.0", "1e300"] {
            let e = parse_mount(&["/b", "/m"], Some(&format!("cache-ttl = {bad}"))).unwrap_err();
            assert!(e.contains("is not a number of seconds"), "{e}");
        }
        let e = parse_mount(&["/b", "/m", "--retention=99999999999h"], None).unwrap_err();
        assert!(e.contains("is too long"), "{e}");
    }

    /// A thread count of 0 is refused with one line (it used to mean 1, silently).
    #[test]
    fn threads_out_of_range_are_refused() {
        for bad in ["0", "257", "-1", "many"] {
            let e = parse_mount(&["/b", "/m", &format!("--threads={bad}")], None).unwrap_err();
            assert!(e.contains("--threads"), "{e}");
        }
        let e = parse_mount(&["/b", "/m"], Some("threads = 0")).unwrap_err();
        assert!(e.contains("threads"), "{e}");
        assert_eq!(
            parse_mount(&["/b", "/m", "--threads=1"], None)
                .unwrap()
                .threads,
            1
        );
    }

    #[test]
    fn txid_spellings_on_the_command_line() {
        let txid = |t: &str| -> Result<u64, String> {
            match Cli::try_parse_from(["walfs", "restore", "file:///r", "-o", "o", "--txid", t])
                .map_err(|e| e.to_string())?
                .command
            {
                Command::Restore(r) => Ok(r.txid.unwrap()),
                _ => panic!("not a restore"),
            }
        };
        assert_eq!(txid("42"), Ok(42));
        assert_eq!(txid("1234567890123456"), Ok(1_234_567_890_123_456));
        assert_eq!(txid("000000000000002a"), Ok(42));
        assert_eq!(txid("0000000000000010"), Ok(16));
        assert_eq!(txid("0x10"), Ok(16));
        let e = txid("a00000000000002a").unwrap_err();
        assert!(e.contains("\"a00000000000002a\" is not a TXID"), "{e}");
    }
}
