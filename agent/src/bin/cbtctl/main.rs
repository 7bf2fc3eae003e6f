//! `cbtctl`: talks to the agent's CSI socket the way a backup tool would,
//! and to its admin socket to register snapshots and read its status.
//!
//! One module per command group; each group's argument types and `run`
//! functions live in its module, this file only dispatches and turns errors
//! into exit codes:
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | success |
//! | 3 | FAILED_PRECONDITION: the tracker cannot prove the delta, take a full backup |
//! | 4 | NOT_FOUND: unknown snapshot |
//! | 1 | anything else |

mod admin;
mod copy;
mod metadata;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tonic::Code;

#[derive(Parser)]
#[command(version, about = "Query the changed-block tracker (CSI socket) and register snapshots (admin socket)")]
struct Cli {
    /// The agent's CSI socket (Identity + SnapshotMetadata).
    #[arg(long, global = true, env = "CBT_CSI_SOCKET", default_value = "/run/cbt/csi.sock")]
    csi_socket: PathBuf,
    /// The agent's admin socket (snapshot windows, status).
    #[arg(long, global = true, env = "CBT_ADMIN_SOCKET", default_value = "/run/cbt/admin.sock")]
    admin_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the allocated (ever written) ranges of a snapshot.
    Allocated(metadata::AllocatedArgs),
    /// List the ranges that may differ between two snapshots of a volume.
    Delta(metadata::DeltaArgs),
    /// Apply a delta: copy the changed ranges of TARGET from an image of it
    /// onto a copy of BASE.
    Copy(copy::CopyArgs),
    /// Register snapshots: begin before the backend cuts, commit after.
    #[command(subcommand)]
    Snapshot(admin::SnapshotCommand),
    /// The agent's devices, volumes, change log, gaps and loss counters.
    Status(admin::StatusArgs),
}

/// A gRPC error status, kept whole so `main` can pick the exit code.
#[derive(Debug)]
pub(crate) struct RpcError(pub tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for RpcError {}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_code(&e),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let channel = || async {
        cbt_agent::service::connect(&cli.csi_socket)
            .await
            .with_context(|| format!("connecting to the CSI socket {}", cli.csi_socket.display()))
    };
    match cli.command {
        Command::Allocated(args) => metadata::allocated(channel().await?, args).await,
        Command::Delta(args) => metadata::delta(channel().await?, args).await,
        Command::Copy(args) => copy::run(channel().await?, args).await,
        Command::Snapshot(command) => admin::snapshot(admin_channel(&cli.admin_socket).await?, command).await,
        Command::Status(args) => admin::status(admin_channel(&cli.admin_socket).await?, args).await,
    }
}

async fn admin_channel(socket: &std::path::Path) -> Result<tonic::transport::Channel> {
    cbt_agent::service::connect(socket)
        .await
        .with_context(|| format!("connecting to the admin socket {}", socket.display()))
}

fn exit_code(e: &anyhow::Error) -> ExitCode {
    let status = e.chain().find_map(|c| c.downcast_ref::<RpcError>()).map(|r| &r.0);
    match status.map(|s| s.code()) {
        Some(Code::FailedPrecondition) => {
            eprintln!("full backup required: {}", status.map(|s| s.message()).unwrap_or_default());
            ExitCode::from(3)
        }
        Some(Code::NotFound) => {
            eprintln!("error: {}", chain(e));
            ExitCode::from(4)
        }
        _ => {
            eprintln!("error: {}", chain(e));
            ExitCode::from(1)
        }
    }
}

/// `a: b: c` from the error's chain, without the repeats some libraries
/// produce (tonic's transport errors wrap an I/O error that repeats itself).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}
