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
    },
    /// Delete the index store and rebuild it and every projection from the log.
    Replay,
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
    Ledger::open(LedgerConfig::new(data)).with_context(|| format!("opening {}", data.display()))
}

fn submit(ledger: &Ledger, submission: Submission) -> anyhow::Result<ledger::Receipt> {
    match ledger.submit_blocking(submission) {
        Ok(receipt) => Ok(receipt),
        Err(SubmitError::Rejected(rejection)) => bail!("refused: {rejection}"),
        Err(e) => bail!("{e}"),
    }
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
        } => {
            let config = crate::api::ApiConfig {
                base_url: base_url.unwrap_or_default(),
                public_per_minute,
                public_burst,
                ..crate::api::ApiConfig::default()
            };
            serve(&data, listen, config, demo)
        }
        Verb::Replay => {
            let head = ledger::rebuild_index(&data)?;
            println!(
                "rebuilt the index and projections from {} events; head hash {}",
                head.seq,
                crate::log::hex(&head.hash)
            );
            Ok(0)
        }
        Verb::Verify => {
            let report = ledger::verify_log(&data.join("log"), None);
            let body = serde_json::json!({
                "ok": report.ok, "events": report.events, "head_seq": report.head_seq,
                "head_hash": report.head_hash, "bad_seq": report.bad_seq, "problem": report.problem,
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
