//! The command line: `serve`, `replay`, `verify`, `export`, `import`,
//! `close-month`, `keys`, `backup`. The only module that imports clap.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::events::{Event, Month, ProgramId, Role};
use crate::ledger::{self, Ledger, LedgerConfig, Submission, SubmitError};
use crate::rules::{Command as LedgerCommand, Noop};

#[derive(Parser, Debug)]
#[command(
    name = "commission-ledger",
    version,
    about = "An event-sourced, hash-chained commission ledger"
)]
pub struct Cli {
    /// The data directory: the log, its indexes and the key secret.
    #[arg(
        long,
        global = true,
        env = "COMMISSION_LEDGER_DATA",
        default_value = "./data"
    )]
    pub data: PathBuf,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Run the HTTP server.
    Serve {
        /// The address to listen on.
        #[arg(
            long,
            env = "COMMISSION_LEDGER_LISTEN",
            default_value = "127.0.0.1:8080"
        )]
        listen: SocketAddr,
        /// The public base URL referral links start with.
        #[arg(long, env = "COMMISSION_LEDGER_BASE_URL")]
        base_url: Option<String>,
        /// Load a demo program with three months of activity (once).
        #[arg(long)]
        demo: bool,
        /// Public endpoints (`/r/…`, `/px.gif`): requests a minute per client address.
        #[arg(
            long,
            env = "COMMISSION_LEDGER_PUBLIC_PER_MINUTE",
            default_value_t = 120
        )]
        public_per_minute: u32,
        /// Public endpoints: the burst allowed above that pace.
        #[arg(long, env = "COMMISSION_LEDGER_PUBLIC_BURST", default_value_t = 30)]
        public_burst: u32,
        /// A reverse proxy (address or CIDR, repeatable) whose
        /// X-Forwarded-For names the client: rate limits and click client
        /// hashes then go by the visitor's address, not the proxy's.
        #[arg(
            long = "trusted-proxy",
            value_name = "ADDR|CIDR",
            env = "COMMISSION_LEDGER_TRUSTED_PROXIES",
            value_delimiter = ',',
            value_parser = parse_proxy
        )]
        trusted_proxies: Vec<ipnet::IpNet>,
        /// Where a link with an unknown code sends the visitor (default:
        /// the site of the only program; with several, such links answer 404).
        #[arg(
            long,
            value_name = "URL",
            env = "COMMISSION_LEDGER_FALLBACK_SITE",
            value_parser = parse_site
        )]
        fallback_site: Option<String>,
    },
    /// Delete the index store and rebuild it and every projection from the
    /// log; or, with --what-if, replay a program under overrides and print
    /// the money diff (and with --apply, append it as adjustments).
    Replay {
        /// The overrides document: the body of `POST .../replays`
        /// (`{"overrides": {...}, "months": {"from": "YYYY-MM", "to": "YYYY-MM"}}`).
        #[arg(long, value_name = "FILE", requires = "program")]
        what_if: Option<PathBuf>,
        /// The program to replay (with --what-if).
        #[arg(long)]
        program: Option<String>,
        /// Append the diff as compensating events in the open month.
        #[arg(long, requires_all = ["what_if", "reason"])]
        apply: bool,
        /// Why (kept in the log with the adjustments).
        #[arg(long)]
        reason: Option<String>,
        /// Also write the changed lines as CSV to this file.
        #[arg(long, value_name = "FILE", requires = "what_if")]
        csv: Option<PathBuf>,
    },
    /// Check the log: frames, CRCs, hash chain, postings. Exit 0 only for a sound log.
    Verify,
    /// Write every event as NDJSON (to stdout, or --out).
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only the events of this program.
        #[arg(long)]
        program: Option<String>,
    },
    /// Append an NDJSON export that continues this log (a file, or - for stdin).
    Import { file: PathBuf },
    /// Close a month of a program: post its rewards.
    CloseMonth {
        #[arg(long)]
        program: String,
        #[arg(long)]
        month: String,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        verb: KeysVerb,
    },
    /// Copy the log and the key secret to a new directory (safe while serving).
    Backup { out: PathBuf },
    /// Set aside a damaged stretch of the log (its first bad record and all
    /// after it) into DATA/damaged/, so that the ledger starts again; the
    /// index is rebuilt at the next start. Without --apply, only report.
    Repair {
        /// Move the damaged stretch aside and cut the log before it.
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysVerb {
    /// Issue a key; the key is printed alone on the last line, once.
    Create {
        #[arg(long)]
        role: String,
    },
    /// Revoke a key by its id.
    Revoke {
        key_id: String,
        #[arg(long)]
        reason: String,
    },
}

fn open(data: &std::path::Path) -> anyhow::Result<Ledger> {
    Ledger::open(LedgerConfig::new(data)).map_err(|e| refused_start(e, data))
}

/// A start's error, pointing the operator to `repair` when the log is damaged.
fn refused_start(e: ledger::LedgerError, data: &std::path::Path) -> anyhow::Error {
    let damaged = matches!(
        &e,
        ledger::LedgerError::Log(crate::log::LogError::Corrupt { .. })
    );
    let e = anyhow::Error::new(e).context(format!("opening {}", data.display()));
    if damaged {
        e.context(format!(
            "the log is damaged: `commission-ledger repair --data {}` shows what follows the bad record and, with --apply, sets it aside",
            data.display()
        ))
    } else {
        e
    }
}

fn submit(ledger: &Ledger, submission: Submission) -> anyhow::Result<ledger::Receipt> {
    match ledger.submit_blocking(submission) {
        Ok(receipt) => Ok(receipt),
        Err(SubmitError::Rejected(rejection)) => bail!("refused: {rejection}"),
        Err(e) => bail!("{e}"),
    }
}

/// `replay --what-if`: computes, prints, optionally writes CSV and applies.
fn what_if(
    data: &std::path::Path,
    file: &std::path::Path,
    program: Option<String>,
    apply: bool,
    reason: Option<String>,
    csv: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let program = ProgramId::parse(program.as_deref().unwrap_or_default())?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let body: crate::api::ReplayBody = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an overrides document", file.display()))?;
    let ledger = open(data)?;
    let replay = match ledger.what_if(&program, body.overrides, body.months) {
        Ok(replay) => replay,
        Err(SubmitError::Rejected(rejection)) => bail!("refused: {rejection}"),
        Err(e) => bail!("{e}"),
    };
    let diff = &replay.diff;
    println!(
        "replay {} of {program} at seq {}: {} changed items, total change {} {}",
        replay.replay_id,
        replay.at_seq,
        diff.changes.len(),
        diff.total_change,
        diff.currency.code()
    );
    println!(
        "{:<24} {:<8} {:>14} {:>14} {:>14}",
        "affiliate", "month", "before", "after", "change"
    );
    for row in &diff.rows {
        println!(
            "{:<24} {:<8} {:>14} {:>14} {:>14}",
            row.affiliate_id.as_str(),
            row.month.to_string(),
            row.before,
            row.after,
            row.change
        );
        for line in &row.lines {
            let what = format!(
                "  {} {} {}",
                line.kind.as_str(),
                line.customer_id.as_ref().map(|c| c.as_str()).unwrap_or("-"),
                line.line.as_ref().map(|l| l.as_str()).unwrap_or("-")
            );
            println!(
                "{what:<33} {:>14} {:>14} {:>14}",
                line.before, line.after, line.change
            );
        }
    }
    if let Some(path) = csv {
        std::fs::write(&path, crate::api::replay_csv(&replay))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if apply {
        let reason = reason.unwrap_or_default();
        let submission =
            match ledger.apply_replay_submission(&program, &replay.replay_id, &reason, "cli") {
                Ok(Some(submission)) => submission,
                Ok(None) => bail!("the replay is gone"),
                Err(SubmitError::Rejected(rejection)) => bail!("refused: {rejection}"),
                Err(e) => bail!("{e}"),
            };
        let receipt = submit(&ledger, submission)?;
        let adjustments = receipt
            .events
            .iter()
            .filter(|r| matches!(r.event, Event::AdjustmentPosted(_)))
            .count();
        match receipt.events.first() {
            Some(first) => println!(
                "applied at seq {}: {adjustments} adjustments in the open month",
                first.seq
            ),
            None => println!("nothing to apply"),
        }
    }
    Ok(0)
}

/// A trusted proxy: a network, or one address.
fn parse_proxy(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is not an IP address or a CIDR network"))
}

fn parse_site(text: &str) -> Result<String, String> {
    crate::events::check_site_url(text)
        .map(|()| text.to_string())
        .map_err(|e| e.message)
}

/// Runs the command line; the exit status is the process's.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let data = cli.data;
    match cli.verb {
        Verb::Serve {
            listen,
            base_url,
            demo,
            public_per_minute,
            public_burst,
            trusted_proxies,
            fallback_site,
        } => {
            let config = crate::api::ApiConfig {
                base_url: base_url.unwrap_or_default(),
                public_per_minute,
                public_burst,
                trusted_proxies,
                fallback_site,
                ..crate::api::ApiConfig::default()
            };
            serve(&data, listen, config, demo)
        }
        Verb::Replay {
            what_if: Some(file),
            program,
            apply,
            reason,
            csv,
        } => what_if(&data, &file, program, apply, reason, csv),
        Verb::Replay { what_if: None, .. } => {
            let head = ledger::rebuild_index(&data).map_err(|e| refused_start(e, &data))?;
            println!(
                "rebuilt the index and projections from {} events; head hash {}",
                head.seq,
                crate::log::hex(&head.hash)
            );
            Ok(0)
        }
        Verb::Verify => {
            let report = ledger::verify_data_dir(&data);
            let body = serde_json::json!({
                "ok": report.ok, "events": report.events, "head_seq": report.head_seq,
                "head_hash": report.head_hash, "bad_seq": report.bad_seq, "problem": report.problem,
                "projections": report.projections.as_str(),
                "projections_detail": report.projections_detail,
            });
            println!("{body}");
            if !report.ok {
                eprintln!(
                    "verify failed at seq {}: {}",
                    report
                        .bad_seq
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into()),
                    report.problem.unwrap_or_default()
                );
                return Ok(1);
            }
            Ok(0)
        }
        Verb::Repair { apply } => {
            let report = ledger::repair_log(&data, apply)?;
            println!("{}", serde_json::to_string(&report)?);
            if report.sound {
                eprintln!(
                    "the log is sound: {} events (a torn tail, if any, is cut at the next start)",
                    report.events
                );
                return Ok(0);
            }
            if !report.repairable {
                eprintln!(
                    "seq {} is intact but does not decode ({}): not damage, so repair leaves it; run a build of commission-ledger that reads it",
                    report.bad_seq.unwrap_or_default(),
                    report.problem.as_deref().unwrap_or_default(),
                );
                return Ok(1);
            }
            if !report.applied {
                eprintln!(
                    "seq {} on is damaged ({}): {} bytes would be set aside ({} with the zero-filled space past them), keeping {} events; run again with --apply",
                    report.bad_seq.unwrap_or_default(),
                    report.problem.as_deref().unwrap_or_default(),
                    report.set_aside_data_bytes,
                    report.set_aside_bytes,
                    report.events
                );
                return Ok(1);
            }
            eprintln!(
                "set aside {} bytes ({} with the zero-filled space past them) from seq {} on in {}; the log keeps {} events, and the index is rebuilt at the next start",
                report.set_aside_data_bytes,
                report.set_aside_bytes,
                report.bad_seq.unwrap_or_default(),
                report
                    .set_aside_in
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                report.events
            );
            Ok(0)
        }
        Verb::Export { out, program } => {
            let program = program.map(|p| ProgramId::parse(&p)).transpose()?;
            let count = match out {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    let mut writer = std::io::BufWriter::new(file);
                    let count = ledger::export_ndjson(&data, program.as_ref(), &mut writer)?;
                    writer.flush()?;
                    count
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut writer = std::io::BufWriter::new(stdout.lock());
                    let count = ledger::export_ndjson(&data, program.as_ref(), &mut writer)?;
                    writer.flush()?;
                    count
                }
            };
            eprintln!("exported {count} events");
            Ok(0)
        }
        Verb::Import { file } => {
            let count = if file.as_os_str() == "-" {
                ledger::import_ndjson(&data, &mut std::io::stdin().lock())?
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?;
                ledger::import_ndjson(&data, &mut std::io::BufReader::new(f))?
            };
            println!("imported {count} events");
            Ok(0)
        }
        Verb::CloseMonth { program, month } => {
            let program = ProgramId::parse(&program)?;
            let month = Month::parse(&month)?;
            let ledger = open(&data)?;
            let receipt = submit(
                &ledger,
                Submission::new(Some(&program), "cli", LedgerCommand::CloseMonth { month }),
            )?;
            let closed = match (&receipt.noop, receipt.events.last().map(|r| &r.event)) {
                (Some(Noop::MonthAlreadyClosed(closed)), _) => (closed.clone(), true),
                (None, Some(Event::MonthClosed(closed))) => (closed.clone(), false),
                _ => bail!("the close recorded no MonthClosed event"),
            };
            println!(
                "{}",
                serde_json::json!({
                    "month": closed.0.month, "rewards": closed.0.rewards,
                    "total": closed.0.total.to_string(), "already_closed": closed.1,
                })
            );
            Ok(0)
        }
        Verb::Keys { verb } => {
            let ledger = open(&data)?;
            match verb {
                KeysVerb::Create { role } => {
                    let role = Role::parse(&role)?;
                    let (key_id, key) = ledger
                        .create_key(role, "cli")
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("key id {key_id}, role {role:?}; the key is shown once:");
                    println!("{key}");
                }
                KeysVerb::Revoke { key_id, reason } => {
                    submit(
                        &ledger,
                        Submission::new(
                            None,
                            "cli",
                            LedgerCommand::RevokeKey {
                                key_id: key_id.clone(),
                                reason,
                            },
                        ),
                    )?;
                    println!("revoked {key_id}");
                }
            }
            Ok(0)
        }
        Verb::Backup { out } => {
            let head = ledger::backup(&data, &out)?;
            println!(
                "backed up {} events (head hash {}) to {}",
                head.seq,
                crate::log::hex(&head.hash),
                out.display()
            );
            Ok(0)
        }
    }
}

fn serve(
    data: &std::path::Path,
    listen: SocketAddr,
    mut config: crate::api::ApiConfig,
    demo: bool,
) -> anyhow::Result<i32> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    let ledger = Arc::new(open(data)?);
    let has_admin = ledger
        .state()
        .model
        .keys
        .values()
        .any(|k| k.role == Role::Admin && !k.revoked);
    if !has_admin {
        let (key_id, key) = ledger
            .create_key(Role::Admin, "system")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("created admin key {key_id}; it is shown once, keep it:");
        println!("{key}");
    }
    if demo {
        let loaded =
            crate::demo::load(&ledger).map_err(|e| anyhow::anyhow!("loading the demo: {e}"))?;
        println!(
            "demo program `{}` {}; referral codes:",
            loaded.program,
            if loaded.loaded {
                "loaded"
            } else {
                "already there"
            }
        );
        for (affiliate, code) in &loaded.affiliates {
            println!("  {affiliate}: /r/{code}");
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let bound = listener.local_addr()?;
        println!("listening on http://{bound}");
        if config.base_url.is_empty() {
            config.base_url = format!("http://{bound}");
        }
        crate::api::serve(listener, ledger, config, shutdown_signal())
            .await
            .context("serving")?;
        anyhow::Ok(())
    })?;
    Ok(0)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
