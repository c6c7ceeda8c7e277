//! The config file of `walfs mount` and `walfs run` (`--config FILE` or `WALFS_CONFIG`): a TOML file whose
//! keys are the subcommand's long flag names and positional names, turned into command-line
//! arguments before clap parses them. Every flag works in the file without code here, since
//! the keys are read off the clap definition; flags on the command line override the file.
//!
//! This file owns [`expand_config`] and [`config_args`].
//!
//! Values: `true` for a switch (`false` leaves it off), a string or number for an option,
//! an array for an option that may be repeated (`replica = ["s3://…", "file:///…"]`).
//! `backing` and `mountpoint` are taken from the file only if the command line gives no
//! positional argument. Unknown keys are refused with a one-line error naming the key.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

use crate::replica::error::write_causes;

/// The option naming the config file, and its environment variable.
pub const CONFIG_FLAG: &str = "config";
pub const CONFIG_ENV: &str = "WALFS_CONFIG";

/// Why a config file cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// The file cannot be read (the source says why).
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid TOML, or a setting is unknown or has the wrong type: one line
    /// that names the file and the setting.
    Invalid(String),
}

/// The result of reading a config file.
pub type ConfigResult<T> = Result<T, ConfigError>;

impl fmt::Display for ConfigError {
    /// One line; with `{:#}`, followed by the cause, joined by ": ".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, .. } => {
                write!(f, "cannot read the config file {}", path.display())?
            }
            ConfigError::Invalid(m) => f.write_str(m)?,
        }
        if f.alternate() {
            write_causes(f, self)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            ConfigError::Invalid(_) => None,
        }
    }
}

fn is_switch(a: &Arg) -> bool {
    matches!(
        a.get_action(),
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
    )
}

fn repeats(a: &Arg) -> bool {
    matches!(a.get_action(), ArgAction::Append)
}

/// The name a config key uses for `a`: its long flag, or the id of a positional.
fn key_of(a: &Arg) -> Option<String> {
    if a.is_positional() {
        Some(a.get_id().as_str().to_string())
    } else {
        a.get_long().map(str::to_string)
    }
}

fn scalar(key: &str, v: &toml::Value, label: &str) -> ConfigResult<String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Boolean(_) | toml::Value::Array(_) | toml::Value::Table(_) => {
            Err(ConfigError::Invalid(format!(
                "{label}: setting {key:?} takes a string or a number, not {}",
                v.type_str()
            )))
        }
    }
}

/// The arguments `text` (a config file, named `label` in errors) stands for, for the
/// subcommand `cmd`: (options, positionals). Options the command line `given` already
/// sets (long names) are left out, so the command line overrides the file.
pub fn config_args(
    cmd: &Command,
    text: &str,
    label: &str,
    given: &[String],
) -> ConfigResult<(Vec<OsString>, Vec<OsString>)> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError::Invalid(format!("{label} is not valid TOML: {}", one_line(&e)))
    })?;
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
        .filter(|a| a.get_long() != Some(CONFIG_FLAG))
        // The command of `walfs run` (after `--`) is not a setting.
        .filter(|a| !a.is_last_set())
        .collect();
    let mut options = Vec::new();
    let mut positionals: Vec<(usize, OsString)> = Vec::new();
    for (key, value) in &table {
        let Some(arg) = args
            .iter()
            .find(|a| key_of(a).as_deref() == Some(key.as_str()))
        else {
            let mut known: Vec<String> = args.iter().filter_map(|a| key_of(a)).collect();
            known.sort();
            return Err(ConfigError::Invalid(format!(
                "{label}: unknown setting {key:?}; the settings are the long flags of `walfs {}`: {}",
                cmd.get_name(),
                known.join(", ")
            )));
        };
        if arg.is_positional() {
            let index = arg.get_index().unwrap_or(usize::MAX);
            positionals.push((index, scalar(key, value, label)?.into()));
            continue;
        }
        if given.iter().any(|g| g == key) {
            continue;
        }
        let flag = format!("--{key}");
        if is_switch(arg) {
            match value {
                toml::Value::Boolean(true) => options.push(flag.into()),
                toml::Value::Boolean(false) => {}
                v => {
                    return Err(ConfigError::Invalid(format!(
                    "{label}: setting {key:?} is a switch: write {key} = true or false, not a {}",
                    v.type_str()
                )))
                }
            }
        } else if let toml::Value::Array(items) = value {
            if !repeats(arg) {
                return Err(ConfigError::Invalid(format!(
                    "{label}: setting {key:?} takes one value, not a list"
                )));
            }
            for item in items {
                options.push(format!("{flag}={}", scalar(key, item, label)?).into());
            }
        } else {
            options.push(format!("{flag}={}", scalar(key, value, label)?).into());
        }
    }
    positionals.sort_by_key(|(i, _)| *i);
    Ok((options, positionals.into_iter().map(|(_, v)| v).collect()))
}

fn one_line(e: &toml::de::Error) -> String {
    let mut s = e.message().to_string();
    if let Some(span) = e.span() {
        s.push_str(&format!(" (at byte {})", span.start));
    }
    s
}

/// Rewrites the command line `argv` of `root` (the whole CLI): if its subcommand
/// `subcommand` is given with `--config FILE` (or `CONFIG_ENV` is set in `env`), the file's
/// settings are inserted after the subcommand's name, less those the command line sets.
pub fn expand_config(
    root: &Command,
    subcommand: &str,
    argv: Vec<OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> ConfigResult<Vec<OsString>> {
    let Some(cmd) = root.find_subcommand(subcommand) else {
        return Ok(argv);
    };
    let Some(at) = argv
        .iter()
        .skip(1)
        .position(|a| a == subcommand)
        .map(|i| i + 1)
    else {
        return Ok(argv);
    };
    let takes_value = |long: &str| {
        cmd.get_arguments()
            .chain(root.get_arguments())
            .find(|a| a.get_long() == Some(long))
            .is_some_and(|a| !a.is_positional() && !is_switch(a))
    };
    // Scan the subcommand's arguments: the long flags given, the config file, positionals.
    let mut given = Vec::new();
    let mut config: Option<OsString> = None;
    let mut positionals = 0usize;
    let rest = &argv[at + 1..];
    let mut i = 0;
    while i < rest.len() {
        let a = rest[i].to_string_lossy();
        if a == "--" {
            // After `--`: positionals, or the command of `walfs run` (a `last` argument).
            if !cmd.get_arguments().any(|a| a.is_last_set()) {
                positionals += rest.len() - i - 1;
            }
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (long.to_string(), None),
            };
            let value = match inline {
                Some(v) => Some(OsString::from(v)),
                None if takes_value(&name) => {
                    i += 1;
                    rest.get(i).cloned()
                }
                None => None,
            };
            if name == CONFIG_FLAG {
                config = value;
            }
            given.push(name);
        } else if !a.starts_with('-') || a == "-" {
            positionals += 1;
        }
        i += 1;
    }
    let path = match config.or_else(|| env(CONFIG_ENV).filter(|v| !v.is_empty())) {
        Some(p) => p,
        None => return Ok(argv),
    };
    let path = Path::new(&path);
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let label = format!("config file {}", path.display());
    let (options, file_positionals) = config_args(cmd, &text, &label, &given)?;
    let mut out: Vec<OsString> = argv[..=at].to_vec();
    out.extend(options);
    if positionals == 0 {
        out.extend(file_positionals);
    }
    out.extend(rest.iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("walfs")
            .arg(Arg::new("log-level").long("log-level").global(true))
            .subcommand(
                Command::new("mount")
                    .arg(Arg::new("backing").required(true))
                    .arg(Arg::new("mountpoint").required(true))
                    .arg(
                        Arg::new("allow-other")
                            .long("allow-other")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(
                        Arg::new("replica")
                            .long("replica")
                            .action(ArgAction::Append),
                    )
                    .arg(Arg::new("sync-interval").long("sync-interval"))
                    .arg(Arg::new("threads").long("threads"))
                    .arg(Arg::new("config").long("config")),
            )
            .subcommand(Command::new("list").arg(Arg::new("url")))
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    const FULL: &str = r#"
backing = "/data"
mountpoint = "/mnt/data"
allow-other = true
replica = ["s3://b/p?region=x", "file:///backup"]
sync-interval = "500ms"
threads = 8
"#;

    #[test]
    fn settings_become_arguments() {
        let f = file(FULL);
        let p = f.path().to_str().unwrap();
        let out = expand_config(
            &cli(),
            "mount",
            os(&["walfs", "mount", "--config", p]),
            |_| None,
        )
        .unwrap();
        assert_eq!(
            strs(&out),
            [
                "walfs",
                "mount",
                "--allow-other",
                "--replica=s3://b/p?region=x",
                "--replica=file:///backup",
                "--sync-interval=500ms",
                "--threads=8",
                "/data",
                "/mnt/data",
                "--config",
                p
            ]
        );
        // The result parses.
        let m = cli().try_get_matches_from(&out).unwrap();
        let m = m.subcommand_matches("mount").unwrap();
        assert_eq!(m.get_one::<String>("backing").unwrap(), "/data");
        assert_eq!(m.get_many::<String>("replica").unwrap().count(), 2);
    }

    #[test]
    fn command_line_overrides_the_file() {
        let f = file(FULL);
        let p = f.path().to_str().unwrap().to_string();
        let argv = os(&[
            "walfs",
            "--log-level",
            "debug",
            "mount",
            "/b",
            "/m",
            "--sync-interval",
            "0",
            "--replica=file:///other",
        ]);
        let out = expand_config(&cli(), "mount", argv, |k| {
            (k == CONFIG_ENV).then(|| OsString::from(&p))
        })
        .unwrap();
        let m = cli().try_get_matches_from(&out).unwrap();
        assert_eq!(m.get_one::<String>("log-level").unwrap(), "debug");
        let m = m.subcommand_matches("mount").unwrap();
        assert_eq!(m.get_one::<String>("backing").unwrap(), "/b");
        assert_eq!(m.get_one::<String>("mountpoint").unwrap(), "/m");
        assert_eq!(m.get_one::<String>("sync-interval").unwrap(), "0");
        assert_eq!(
            m.get_many::<String>("replica").unwrap().collect::<Vec<_>>(),
            ["file:///other"]
        );
        assert_eq!(m.get_one::<String>("threads").unwrap(), "8");
        assert!(m.get_flag("allow-other"));
    }

    #[test]
    fn no_config_leaves_the_command_line_alone() {
        let argv = os(&["walfs", "mount", "/b", "/m"]);
        assert_eq!(
            expand_config(&cli(), "mount", argv.clone(), |_| None).unwrap(),
            argv
        );
        let argv = os(&["walfs", "list", "u"]);
        assert_eq!(
            expand_config(&cli(), "mount", argv.clone(), |_| Some("x".into())).unwrap(),
            argv
        );
    }

    #[test]
    fn bad_settings_are_one_line_errors() {
        let cmd = cli();
        let mount = cmd.find_subcommand("mount").unwrap();
        let err = |text: &str| {
            config_args(mount, text, "config file c.toml", &[])
                .unwrap_err()
                .to_string()
        };
        let e = err("sync_interval = \"1s\"");
        assert!(
            e.starts_with("config file c.toml: unknown setting \"sync_interval\"")
                && e.contains("sync-interval"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert!(err("config = \"x\"").contains("unknown setting \"config\""));
        assert!(err("allow-other = \"yes\"").contains("is a switch"));
        assert!(err("threads = [1, 2]").contains("takes one value, not a list"));
        assert!(err("replica = [true]").contains("takes a string or a number"));
        let e = err("threads = ");
        assert!(e.starts_with("config file c.toml is not valid TOML"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
