//! `stallnet config …`: validate files, show what would change, apply with a confirmed
//! commit (rolled back unless `confirm` comes in time — by the daemon, across restarts),
//! confirm, roll back, list the history, and read or change single fields from scripts.
//!
//! Exit codes: 0 success; 1 the config is invalid or the action was refused (nothing was
//! changed); 2 bad usage; 3 the revision store or the config file cannot be read or
//! written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::control_client::{Client, Method};
use anyhow::{Context, Result};
use serde_json::json;
use stallnet_netconf::edit;
use stallnet_netconf::revisions::{self, Pending, Store};

/// The file the daemon runs with.
pub const LIVE: &str = "/etc/stallnet/stallnet.toml";

#[derive(clap::Subcommand)]
pub enum ConfigCmd {
    /// Check files: every error with file:line:col, the field and what was expected.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What FILE would change against the running revision (field by field).
    Diff {
        file: PathBuf,
        #[command(flatten)]
        live: Live,
    },
    /// Store FILE as a new revision and apply it; unless `stallnet config confirm` comes
    /// within --confirm seconds, the previous revision is restored.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        opts: ApplyOpts,
    },
    /// Keep the revision applied last.
    Confirm {
        #[command(flatten)]
        live: Live,
    },
    /// Go back to revision REV (default: the one before the running one).
    Rollback {
        rev: Option<u64>,
        #[command(flatten)]
        live: Live,
    },
    /// The last 50 revisions: number, time, author, message.
    History {
        #[command(flatten)]
        live: Live,
    },
    /// Print the value at PATH (e.g. edge.uplinks[1].metered) of the running config.
    Get {
        path: String,
        #[command(flatten)]
        live: Live,
    },
    /// Print the config's JSON Schema (for editors).
    Schema,
    /// Print the field-by-field reference (docs/CONFIG.md).
    Docs,
    /// Change fields (PATH=VALUE …) of the running config, validate, and apply it.
    Set {
        #[arg(required = true)]
        assignments: Vec<String>,
        #[command(flatten)]
        opts: ApplyOpts,
    },
}

#[derive(clap::Args)]
pub struct Live {
    /// The config file the daemon runs with.
    #[arg(long, short, default_value = LIVE)]
    config: PathBuf,
}

#[derive(clap::Args)]
pub struct ApplyOpts {
    #[command(flatten)]
    live: Live,
    /// Seconds to confirm in before the previous revision comes back (0: no confirmation).
    #[arg(long, default_value_t = 120)]
    confirm: u64,
    /// Why (kept in the history).
    #[arg(long, short, default_value = "")]
    message: String,
    /// Who (default: $SUDO_USER, $USER).
    #[arg(long)]
    author: Option<String>,
}

/// An outcome for people and for `--json`.
struct Out {
    code: u8,
    human: String,
    doc: serde_json::Value,
}

fn ok(human: String, doc: serde_json::Value) -> Out {
    Out {
        code: 0,
        human,
        doc,
    }
}

fn refused(code: &str, message: String) -> Out {
    Out {
        code: 1,
        human: message.clone(),
        doc: json!({ "version": 1, "error": { "code": code, "message": message } }),
    }
}

/// Sets one field of the live config and applies it without a confirmation window
/// (`stallnet enroll` pins the hub this way).
pub fn set_now(
    live: PathBuf,
    assignment: String,
    message: String,
    json_out: bool,
) -> Result<ExitCode> {
    run(
        ConfigCmd::Set {
            assignments: vec![assignment],
            opts: ApplyOpts {
                live: Live { config: live },
                confirm: 0,
                message,
                author: None,
            },
        },
        json_out,
    )
}

/// [`set_now`] for the daemon itself: what the command said, or why it failed (nothing
/// printed).
pub fn set_quietly(live: PathBuf, assignment: String, message: String) -> Result<String, String> {
    let out = exec(ConfigCmd::Set {
        assignments: vec![assignment],
        opts: ApplyOpts {
            live: Live { config: live },
            confirm: 0,
            message,
            author: Some("stallnet".into()),
        },
    })
    .map_err(|e| format!("{e:#}"))?;
    if out.code == 0 {
        Ok(out.human)
    } else {
        Err(out.human)
    }
}

pub fn run(cmd: ConfigCmd, json_out: bool) -> Result<ExitCode> {
    let out = match exec(cmd) {
        Ok(o) => o,
        Err(e) => Out {
            code: 3,
            human: format!("{e:#}"),
            doc: json!({ "version": 1, "error": { "code": "io", "message": format!("{e:#}") } }),
        },
    };
    let failed = out.code != 0;
    // A validation result is the command's document even when the file is invalid;
    // errors of the command itself go to stderr.
    let is_error = out.doc.get("error").is_some();
    match (json_out, failed) {
        (true, false) => println!("{}", serde_json::to_string_pretty(&out.doc)?),
        (true, true) if !is_error => println!("{}", serde_json::to_string_pretty(&out.doc)?),
        (true, true) => eprintln!("{}", out.doc),
        (false, false) => {
            if !out.human.is_empty() {
                println!("{}", out.human.trim_end());
            }
        }
        (false, true) => eprintln!("stallnet config: {}", out.human.trim_end()),
    }
    Ok(ExitCode::from(out.code))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn author(opt: &Option<String>) -> String {
    opt.clone()
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn errors_doc(e: &stallnet_netconf::ConfigErrors) -> Vec<serde_json::Value> {
    e.0.iter()
        .map(|e| {
            json!({ "file": e.file, "line": e.line, "col": e.col, "path": e.path,
                    "message": e.message })
        })
        .collect()
}

/// The running config's revision store (from the live file's state_dir).
fn store_of(live: &Path) -> Result<(Store, stallnet_netconf::Config)> {
    let cfg = stallnet_netconf::load_file(live).map_err(|e| {
        anyhow::anyhow!("the running config {} does not load:\n{e}", live.display())
    })?;
    let store = Store::open(&Store::dir_for(&cfg.state_dir))?;
    Ok((store, cfg))
}

/// Asks the running daemon to reload: what it said, or why it refused the config.
fn reload(cfg: &stallnet_netconf::Config) -> Result<String, String> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Ok(format!("could not ask the daemon to reload: {e}")),
    };
    let client = Client::new(&cfg.runtime_dir);
    match rt.block_on(client.request(Method::POST, "/v1/reload")) {
        Ok(doc) => Ok(doc["message"].as_str().unwrap_or("reloaded").to_string()),
        Err(crate::control_client::ClientError::NotRunning { .. }) => {
            Ok("the daemon is not running: the revision takes effect when it starts".into())
        }
        Err(crate::control_client::ClientError::Api { message, .. }) => Err(message),
        Err(e) => Ok(format!("the daemon did not reload: {e}")),
    }
}

/// How long a change waits for another one to finish before it gives up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn exec(cmd: ConfigCmd) -> Result<Out> {
    // Changes to the live config run one at a time (see `config_lock`); reads need no lock.
    let live = match &cmd {
        ConfigCmd::Apply { opts, .. } | ConfigCmd::Set { opts, .. } => {
            Some(opts.live.config.clone())
        }
        ConfigCmd::Confirm { live } | ConfigCmd::Rollback { live, .. } => Some(live.config.clone()),
        _ => None,
    };
    let _lock = match live {
        Some(l) => match crate::config_lock::lock(&l, LOCK_WAIT) {
            Ok(lock) => Some(lock),
            Err(e) => return Ok(refused("busy", e.to_string())),
        },
        None => None,
    };
    match cmd {
        ConfigCmd::Schema => {
            let s = stallnet_netconf::docs::json_schema();
            Ok(ok(serde_json::to_string_pretty(&s)?, s))
        }
        ConfigCmd::Docs => {
            let md = stallnet_netconf::docs::config_md();
            Ok(ok(md.clone(), json!({ "version": 1, "markdown": md })))
        }
        ConfigCmd::Validate { files } => {
            let mut all = Vec::new();
            let mut human = String::new();
            for f in &files {
                match stallnet_netconf::load_file(f) {
                    Ok(_) => human.push_str(&format!("{}: valid\n", f.display())),
                    Err(e) => {
                        human.push_str(&format!("{e}\n"));
                        all.extend(errors_doc(&e));
                    }
                }
            }
            let doc = json!({ "version": 1, "valid": all.is_empty(), "errors": all });
            Ok(if all.is_empty() {
                ok(human, doc)
            } else {
                Out {
                    code: 1,
                    human,
                    doc,
                }
            })
        }
        ConfigCmd::Diff { file, live } => {
            let new = match stallnet_netconf::load_file(&file) {
                Ok(c) => c,
                Err(e) => return Ok(invalid(&e)),
            };
            let old = stallnet_netconf::load_file(&live.config).map_err(|e| {
                anyhow::anyhow!(
                    "the running config {} does not load:\n{e}",
                    live.config.display()
                )
            })?;
            let changes = edit::diff(&old, &new);
            let mut human = String::new();
            for c in &changes {
                human.push_str(&format!("{}: {} -> {}\n", c.path, c.before, c.after));
            }
            if changes.is_empty() {
                human.push_str("no changes\n");
            }
            Ok(ok(human, json!({ "version": 1, "changes": changes })))
        }
        ConfigCmd::Apply { file, opts } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            apply_text(&text, &file.display().to_string(), &opts)
        }
        ConfigCmd::Set { assignments, opts } => {
            let text = std::fs::read_to_string(&opts.live.config)
                .with_context(|| format!("reading {}", opts.live.config.display()))?;
            let edited = match edit::set(&text, &assignments) {
                Ok(t) => t,
                Err(e) => return Ok(refused("bad_edit", e.to_string())),
            };
            let what = format!("set {}", assignments.join(" "));
            let opts = ApplyOpts {
                message: if opts.message.is_empty() {
                    what
                } else {
                    opts.message
                },
                ..opts
            };
            apply_text(&edited, &opts.live.config.display().to_string(), &opts)
        }
        ConfigCmd::Get { path, live } => {
            let text = std::fs::read_to_string(&live.config)
                .with_context(|| format!("reading {}", live.config.display()))?;
            match edit::get(&text, &path) {
                Ok(v) => Ok(ok(
                    v.clone(),
                    json!({ "version": 1, "path": path, "value": v }),
                )),
                Err(e) => Ok(refused("not_found", e.to_string())),
            }
        }
        ConfigCmd::Confirm { live } => {
            let (store, _) = store_of(&live.config)?;
            match store.pending()? {
                None => Ok(refused(
                    "nothing_pending",
                    "no apply is waiting for confirmation".into(),
                )),
                Some(p) => {
                    store.set_pending(None)?;
                    Ok(ok(
                        format!("revision {} confirmed", p.revision),
                        json!({ "version": 1, "confirmed": p.revision }),
                    ))
                }
            }
        }
        ConfigCmd::Rollback { rev, live } => {
            let (store, cfg) = store_of(&live.config)?;
            let target = match rev {
                Some(r) => r,
                None => {
                    let active = store.active()?;
                    match store
                        .list()?
                        .into_iter()
                        .map(|r| r.number)
                        .find(|n| Some(*n) < active)
                    {
                        Some(n) => n,
                        None => {
                            return Ok(refused(
                                "no_previous",
                                "there is no earlier revision to go back to".into(),
                            ))
                        }
                    }
                }
            };
            let text = match store.text(target) {
                Ok(t) => t,
                Err(revisions::RevisionError::Missing(n)) => {
                    return Ok(refused("no_such_revision", format!("no revision {n}")))
                }
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = stallnet_netconf::parse_str(&live.config, &text) {
                return Ok(refused(
                    "invalid_config",
                    format!("revision {target} no longer validates:\n{e}"),
                ));
            }
            revisions::write_atomic(&live.config, text.as_bytes())?;
            store.set_active(target)?;
            store.set_pending(None)?;
            let daemon = reload(&cfg).unwrap_or_else(|e| format!("the daemon refused it: {e}"));
            Ok(ok(
                format!(
                    "revision {target} restored to {}\n{daemon}",
                    live.config.display()
                ),
                json!({ "version": 1, "active": target, "daemon": daemon }),
            ))
        }
        ConfigCmd::History { live } => {
            let (store, _) = store_of(&live.config)?;
            let (list, active, pending) = (store.list()?, store.active()?, store.pending()?);
            let mut human = format!(
                "{:>5}  {:<20} {:<12} MESSAGE\n",
                "REV", "TIME (UTC)", "AUTHOR"
            );
            for r in list.iter().take(revisions::KEEP) {
                let mark = if Some(r.number) == active {
                    if pending.as_ref().is_some_and(|p| p.revision == r.number) {
                        "  (running, unconfirmed)"
                    } else {
                        "  (running)"
                    }
                } else {
                    ""
                };
                human.push_str(&format!(
                    "{:>5}  {:<20} {:<12} {}{mark}\n",
                    r.number,
                    utc(r.at),
                    r.author,
                    r.message
                ));
            }
            Ok(ok(
                human,
                json!({ "version": 1, "active": active, "pending": pending, "revisions": list }),
            ))
        }
    }
}

fn invalid(e: &stallnet_netconf::ConfigErrors) -> Out {
    Out {
        code: 1,
        human: e.to_string(),
        doc: json!({ "version": 1, "valid": false, "errors": errors_doc(e) }),
    }
}

/// "2026-11-21 10:31:02".
fn utc(t: i64) -> String {
    let (y, m, d) = crate::core::cap::civil_from_days(t.div_euclid(86_400));
    let secs = t.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Validates `text`, stores it as a revision, puts it in force with a pending
/// confirmation, and asks the daemon to reload.
fn apply_text(text: &str, source: &str, opts: &ApplyOpts) -> Result<Out> {
    let live = &opts.live.config;
    let new = match stallnet_netconf::parse_str(Path::new(source), text) {
        Ok(c) => c,
        Err(e) => return Ok(invalid(&e)),
    };
    let (store, cfg) = store_of(live)?;
    if new.state_dir != cfg.state_dir {
        return Ok(refused(
            "state_dir_changed",
            format!(
                "state_dir cannot change by apply ({} -> {}): move it by hand and restart",
                cfg.state_dir.display(),
                new.state_dir.display()
            ),
        ));
    }
    if new.role != cfg.role {
        return Ok(refused(
            "role_changed",
            "the role (edge or hub) cannot change by apply".into(),
        ));
    }
    if let Some(p) = store.pending()? {
        return Ok(refused(
            "pending",
            format!(
                "revision {} is still waiting for confirmation: `stallnet config confirm` or \
                 `stallnet config rollback` first",
                p.revision
            ),
        ));
    }
    let t = now();
    // The running file becomes a revision first, so there is always something to go back to.
    let previous = match store.active()? {
        Some(n) => Some(n),
        None => {
            let current = std::fs::read_to_string(live)
                .with_context(|| format!("reading {}", live.display()))?;
            let r = store.add(&current, "import", "the config before the first apply", t)?;
            store.set_active(r.number)?;
            Some(r.number)
        }
    };
    let rev = store.add(text, &author(&opts.author), &opts.message, t)?;
    if opts.confirm > 0 {
        store.set_pending(Some(&Pending {
            revision: rev.number,
            previous,
            deadline: t + opts.confirm as i64,
        }))?;
    }
    let before =
        std::fs::read_to_string(live).with_context(|| format!("reading {}", live.display()))?;
    revisions::write_atomic(live, text.as_bytes())?;
    store.set_active(rev.number)?;
    let daemon = match reload(&new) {
        Ok(m) => m,
        Err(why) => {
            // All or nothing: the daemon put its previous state back; so do we.
            revisions::write_atomic(live, before.as_bytes())?;
            if let Some(p) = previous {
                store.set_active(p)?;
            }
            store.set_pending(None)?;
            let _ = reload(&cfg);
            return Ok(refused(
                "apply_failed",
                format!(
                    "revision {} was not applied: {why}; the running config is unchanged",
                    rev.number
                ),
            ));
        }
    };
    let human = if opts.confirm > 0 {
        format!(
            "revision {} applied\n{daemon}\nconfirm within {} s with `stallnet config confirm`, \
             or revision {} comes back",
            rev.number,
            opts.confirm,
            previous.map_or("-".into(), |p| p.to_string())
        )
    } else {
        format!("revision {} applied\n{daemon}", rev.number)
    };
    Ok(ok(
        human,
        json!({ "version": 1, "revision": rev.number, "previous": previous,
                "confirm_by": (opts.confirm > 0).then_some(t + opts.confirm as i64),
                "daemon": daemon }),
    ))
}
