//! The `stallnet` command: run a role, manage the device identity, check a config, read
//! the status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use stallnet::boot_import::Outcome;
use stallnet::events::Level;
use stallnet::{config_cmd, edge, hub, identity};

mod ctl;
use stallnet_netconf::Role;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "stallnet", version, about = "Bonded uplinks for market stalls")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Print versioned JSON documents (errors as JSON on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Where the running daemon's control socket is (default: the `runtime_dir` of the
    /// config given with `--config`, else /run/stallnet).
    #[arg(long, global = true)]
    runtime_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the role the config names (edge or hub).
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Where a `stallnet.toml` written on a laptop is looked for at start-up.
        #[arg(long, default_value = stallnet::boot_import::BOOT_DIR)]
        boot_dir: PathBuf,
    },
    /// Create this device's key and certificate in the state directory.
    Keygen {
        #[command(flatten)]
        dir: StateDir,
        /// Replace an existing key (changes the identity).
        #[arg(long)]
        force: bool,
    },
    /// Print this device's identity (paste it into the hub's device list or the edge's pin).
    Id {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Join a hub with the one-time code from `stallnet hub invite`: proves the code's
    /// secret to the hub it names, then pins that hub in this box's config (applied as a
    /// new revision; a running edge reloads).
    Enroll {
        /// The code (SN-…; case, spaces and dashes do not matter). `-` reads it from
        /// standard input.
        code: String,
        /// The box's config.
        #[arg(long, short, default_value = config_cmd::LIVE)]
        config: PathBuf,
    },
    /// Validate a config file; every error is printed with file:line:col.
    Check { config: PathBuf },
    /// Print the SHA-256 of a commerce client key (what `commerce.clients` holds).
    HashKey {
        /// The key; read from standard input when absent (keeps it out of shell history).
        key: Option<String>,
    },
    /// Verify receipts offline: a JSON array of receipts (from `GET /v1/receipts`) against
    /// the device's public key (`GET /v1/receipts/public-key`). Exit 1 on any problem.
    VerifyReceipts {
        file: PathBuf,
        #[arg(long)]
        public_key: String,
    },
    /// Configs: validate, diff, apply with a confirmed commit, confirm, rollback,
    /// history, get and set.
    Config {
        #[command(subcommand)]
        cmd: config_cmd::ConfigCmd,
    },
    /// The wall clock of a box without a real-time clock: `save` the time, `restore` it
    /// at boot (forward only), or print whether it can be trusted.
    Clock {
        #[command(subcommand)]
        cmd: ClockCmd,
    },
    #[command(flatten)]
    Ctl(ctl::Ctl),
}

#[derive(Subcommand)]
enum ClockCmd {
    /// Save the current time in the state directory.
    Save {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Move the clock forward to the saved time (or this release's date) if it is
    /// earlier; never backwards. Needs CAP_SYS_TIME.
    Restore {
        #[command(flatten)]
        dir: StateDir,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print `synced`, `unverified` or `wrong`.
    Status,
}

#[derive(clap::Args)]
struct StateDir {
    /// State directory (default: the config's, or /var/lib/stallnet).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Take the state directory from this config.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl StateDir {
    fn resolve(&self) -> Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        if let Some(c) = &self.config {
            return Ok(dirs_of(c)?.0);
        }
        Ok(PathBuf::from("/var/lib/stallnet"))
    }
}

/// The state and runtime directories `config` names, without validating the rest.
fn dirs_of(config: &std::path::Path) -> Result<(PathBuf, PathBuf)> {
    Ok(stallnet_netconf::load::dirs(config)?)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour on a terminal only: the journal and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stallnet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lifts the soft open-file limit to the hard one (at most 65 536): the commerce API
/// takes a quarter of it at most, the rest is the daemon's own.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65_536);
        if want > soft {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                tracing::warn!("raising the open-file limit from {soft}: {e}");
            }
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Run { config, boot_dir } => {
            raise_file_limit();
            let mut notes: Vec<(Level, &'static str, String)> = Vec::new();
            match stallnet::boot_import::import(&boot_dir, &config) {
                Ok(Outcome::Nothing) => {}
                Ok(Outcome::Imported {
                    revision,
                    renamed_to,
                    enroll,
                }) => notes.push((
                    Level::Info,
                    "config_imported",
                    format!(
                        "the config from the SD card is in force (revision {revision}; the file is now {}){}",
                        renamed_to.display(),
                        if enroll { "; its invite code is redeemed once an uplink reaches the hub" } else { "" }
                    ),
                )),
                Ok(Outcome::Enroll { renamed_to }) => notes.push((
                    Level::Info,
                    "enroll_pending",
                    format!(
                        "the SD card's invite code is redeemed once an uplink reaches the hub (the file is now {})",
                        renamed_to.display()
                    ),
                )),
                Ok(Outcome::Refused(why)) => notes.push((
                    Level::Critical,
                    "config_import_failed",
                    format!("the stallnet.toml on the SD card was not used: {why}"),
                )),
                Err(e) => notes.push((
                    Level::Warning,
                    "config_import_failed",
                    format!("the SD card's config could not be read: {e:#}"),
                )),
            }
            let (cfg, rolled_back) = stallnet::confirm::load_at_start(&config)?;
            if let Some(msg) = rolled_back {
                notes.push((Level::Critical, "config_rolled_back", msg));
            }
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            rt.block_on(async {
                let cancel = CancellationToken::new();
                let c = cancel.clone();
                tokio::spawn(async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    c.cancel();
                });
                match cfg.role {
                    Role::Edge => edge::run(cfg, Some(config), notes, cancel).await,
                    Role::Hub => hub::run(cfg, Some(config), notes, cancel).await,
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Clock { cmd } => {
            use stallnet::clock;
            match cmd {
                ClockCmd::Save { dir } => {
                    let dir = dir.resolve()?;
                    if clock::state() == "wrong" {
                        anyhow::bail!("the clock is before this release: not saving it");
                    }
                    clock::save(&dir)?;
                }
                ClockCmd::Restore { dir, dry_run } => {
                    let dir = dir.resolve()?;
                    let (now, saved) = (clock::now(), clock::saved(&dir));
                    match clock::restore_target(now, saved) {
                        None => println!("clock at {now} is not earlier than the saved time: kept"),
                        Some(t) if dry_run => println!("would move the clock from {now} to {t}"),
                        Some(t) => {
                            clock::set(t)?;
                            println!("clock moved forward from {now} to {t}");
                        }
                    }
                }
                ClockCmd::Status => println!("{}", clock::state()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { dir, force } => {
            let d = dir.resolve()?;
            let id = identity::keygen(&d, force)?;
            println!("{}", id.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Id { dir } => {
            let id = identity::load(&dir.resolve()?)?;
            if json {
                println!("{}", serde_json::json!({ "version": 1, "identity": id.id }));
            } else {
                println!("{}", id.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config } => match stallnet_netconf::load_file(&config) {
            Ok(_) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({ "version": 1, "valid": true, "errors": [] })
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(errs) => {
                if json {
                    let list: Vec<_> = errs
                        .0
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "file": e.file, "line": e.line, "col": e.col,
                                "path": e.path, "message": e.message
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({ "version": 1, "valid": false, "errors": list })
                    );
                } else {
                    eprintln!("{errs}");
                }
                Ok(ExitCode::from(2))
            }
        },
        Cmd::HashKey { key } => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut k = String::new();
                    std::io::stdin().read_line(&mut k)?;
                    k
                }
            };
            let key = key.trim();
            anyhow::ensure!(
                key.len() >= 16,
                "a client key should be at least 16 characters"
            );
            println!(
                "{}",
                hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()))
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::VerifyReceipts { file, public_key } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let receipts: Vec<stallnet::commerce::model::Receipt> = serde_json::from_slice(&text)
                .with_context(|| {
                format!("{}: expected a JSON array of receipts", file.display())
            })?;
            let pk = hex::decode(public_key.trim()).context("--public-key: expected hex")?;
            anyhow::ensure!(
                pk.len() == 32,
                "--public-key: expected an Ed25519 public key, 64 hex digits (GET \
                 /v1/receipts/public-key), got {} bytes",
                pk.len()
            );
            let errors = stallnet::commerce::receipt::verify(&pk, &receipts);
            if json {
                let list: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
                println!(
                    "{}",
                    serde_json::json!({ "version": 1, "receipts": receipts.len(), "valid": errors.is_empty(), "errors": list })
                );
            } else if errors.is_empty() {
                println!(
                    "{} receipts: the chain is complete, unforked and unedited",
                    receipts.len()
                );
            } else {
                for e in &errors {
                    eprintln!("{e}");
                }
            }
            Ok(if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Ctl(c) => {
            let dir = match (cli.runtime_dir, &c.at().config) {
                (Some(d), _) => d,
                (None, Some(cfg)) => dirs_of(cfg)?.1,
                (None, None) => PathBuf::from("/run/stallnet"),
            };
            ctl::run(c, dir, json)
        }
        Cmd::Config { cmd } => config_cmd::run(cmd, json),
        Cmd::Enroll { code, config } => enroll(&code, config, json),
    }
}

/// `stallnet enroll`: exit 2 for a code that cannot be read, 1 when the hub refuses it.
fn enroll(code: &str, config: PathBuf, json: bool) -> Result<ExitCode> {
    use stallnet::enroll::code::Code;
    let text = if code == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        code.to_string()
    };
    let fail = |code: u8, kind: &str, msg: String| {
        if json {
            eprintln!(
                "{}",
                serde_json::json!({ "version": 1, "error": { "code": kind, "message": msg } })
            );
        } else {
            eprintln!("stallnet enroll: {msg}");
        }
        Ok(ExitCode::from(code))
    };
    let code = match Code::decode(&text) {
        Ok(c) => c,
        Err(e) => return fail(2, "bad_code", e.to_string()),
    };
    let cfg = stallnet_netconf::load_file(&config)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading {}", config.display()))?;
    if cfg.role != Role::Edge {
        return fail(
            2,
            "not_edge",
            "enroll runs on a box (role = \"edge\")".into(),
        );
    }
    let me = match identity::load(&cfg.state_dir) {
        Ok(me) => me,
        Err(_) => identity::keygen(&cfg.state_dir, false)?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name = match rt.block_on(stallnet::enroll::enroll(&code, &me.id)) {
        Ok(Ok(name)) => name,
        Ok(Err(refusal)) => {
            return fail(1, "refused", format!("the hub refused the code: {refusal}"))
        }
        Err(e) => return fail(1, "unreachable", format!("{e:#}")),
    };
    let assignment = stallnet::enroll::pending::hubs_assignment(&code);
    if !json {
        println!(
            "enrolled as {name} on hub {}; pinning it in {}",
            code.hub_identity,
            config.display()
        );
    }
    config_cmd::set_now(config, assignment, format!("enrolled as {name}"), json)
}
