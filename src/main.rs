//! The `walfs` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

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
    Mount {
        /// The directory that holds the data.
        backing: PathBuf,
        /// An empty directory where the mirror appears.
        mountpoint: PathBuf,
        /// Let users other than the one running walfs use the mount.
        #[arg(long)]
        allow_other: bool,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Serve file data through walfs instead of kernel passthrough (slower; for
        /// debugging and for comparison).
        #[arg(long)]
        no_passthrough: bool,
        /// Seconds the kernel may cache names and attributes. Changes made through the mount
        /// are always seen at once; this bounds how long a change made directly in BACKING
        /// can go unseen.
        #[arg(long, default_value_t = 1.0)]
        cache_ttl: f64,
        /// Mount even if MOUNTPOINT is not empty (its files are hidden while mounted).
        #[arg(long)]
        allow_nonempty: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Mount {
            backing,
            mountpoint,
            allow_other,
            read_only,
            threads,
            no_passthrough,
            cache_ttl,
            allow_nonempty,
        } => walfs::mount::run(&walfs::mount::MountOptions {
            backing,
            mountpoint,
            allow_other,
            read_only,
            threads,
            passthrough: !no_passthrough,
            cache_ttl: Duration::from_secs_f64(cache_ttl.max(0.0)),
            allow_nonempty,
        }),
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
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
