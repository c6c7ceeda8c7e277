//! The `walfs` command line.

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
    Mount(MountArgs),
    /// Restore databases from a replica, verified (content checksum where the writer
    /// recorded one, and PRAGMA integrity_check), written atomically.
    Restore(RestoreArgs),
    /// List the databases in a replica with their latest TXID, time and size.
    List(ListArgs),
    /// Restore drill: restore the latest state and a random earlier TXID of each database
    /// into a temporary directory, check the content checksum and PRAGMA integrity_check,
    /// and report. Only reads the replica. Exits non-zero on any problem.
    Verify(VerifyArgs),
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
    let argv = match walfs::config::expand_config(
        &Cli::command(),
        "mount",
        std::env::args_os().collect(),
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
    let result = match &cli.command {
        Command::Mount(args) => walfs::mount::run(&args.options),
        Command::Restore(args) => walfs::restore::restore_command(args),
        Command::List(args) => walfs::restore::list_command(args),
        Command::Verify(args) => walfs::restore::verify_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    use std::time::Duration;

    /// Every flag of the real `walfs mount` works in a config file.
    #[test]
    fn config_file_reaches_every_mount_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walfs.toml");
        std::fs::write(
            &path,
            r#"
backing = "/srv/data"
mountpoint = "/mnt/data"
allow-other = true
read-only = false
threads = 2
cache-ttl = 0.5
replica = ["s3://bucket/prefix?region=eu-west-1", "file:///backup/walfs"]
staging-dir = "/var/lib/walfs/staging"
sync-interval = "250ms"
stage-at-commit = true
"#,
        )
        .unwrap();
        let argv = walfs::config::expand_config(
            &Cli::command(),
            "mount",
            ["walfs", "mount", "--config", path.to_str().unwrap()]
                .map(std::ffi::OsString::from)
                .to_vec(),
            |_| None,
        )
        .unwrap();
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Mount(MountArgs { options: o, .. }) = cli.command else {
            panic!("not a mount");
        };
        let r = &o.replication;
        assert_eq!(o.backing, PathBuf::from("/srv/data"));
        assert_eq!(o.mountpoint, PathBuf::from("/mnt/data"));
        assert!(o.allow_other && !o.read_only && r.stage_at_commit);
        assert_eq!((o.threads, o.cache_ttl), (2, Duration::from_millis(500)));
        assert_eq!(r.replicas.len(), 2);
        assert_eq!(r.staging_dir, Some(PathBuf::from("/var/lib/walfs/staging")));
        assert_eq!(r.sync_interval, Duration::from_millis(250));
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
