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
//! | 141 | stdout was closed before all output was written (`cbtctl ... \| head`); nothing is printed about it |

mod admin;
mod copy;
mod metadata;

use std::{
    io::{self, Write},
    path::PathBuf,
    process::ExitCode,
};

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
        // Bounded: a server may echo a huge id.
        write!(f, "{:?}: {}", self.0.code(), cbt_agent::names::bound_message(self.0.message().to_string()))
    }
}

impl std::error::Error for RpcError {}

/// Whoever read cbtctl's stdout closed it early (`cbtctl snapshot list |
/// head`). Not worth a message, but not success either: the output was not
/// all delivered (a consumer of `delta` must not take a cut list as whole).
#[derive(Debug)]
pub(crate) struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Exit status for [`StdoutClosed`]: what a shell reports for a process
/// that SIGPIPE killed, as `ls | head` does. (Rust ignores SIGPIPE, so a
/// write to a closed pipe fails with EPIPE instead, and `println!` panics.)
const EXIT_STDOUT_CLOSED: u8 = 128 + libc::SIGPIPE as u8;

/// Every command's output goes through here, never `println!`: a closed
/// stdout becomes [`StdoutClosed`], other write errors an error.
pub(crate) fn print_out(write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// A client-side text (handle, volume) for a table: characters that would
/// hide or reorder what follows are shown escaped (`\u{202e}`); the agent
/// refuses them in new handles, older state may still hold some.
pub(crate) fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(cbt_agent::names::is_invisible) {
        return text.into();
    }
    text.chars()
        .map(|c| if cbt_agent::names::is_invisible(c) { c.escape_unicode().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
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
    if e.chain().any(|c| c.is::<StdoutClosed>()) {
        return ExitCode::from(EXIT_STDOUT_CLOSED);
    }
    let status = e.chain().find_map(|c| c.downcast_ref::<RpcError>()).map(|r| &r.0);
    // `eprintln!` would panic on a closed stderr: nothing more to say then.
    let mut stderr = io::stderr().lock();
    match status.map(|s| s.code()) {
        Some(Code::FailedPrecondition) => {
            let message = cbt_agent::names::bound_message(status.map(|s| s.message()).unwrap_or_default().to_string());
            let _ = writeln!(stderr, "full backup required: {message}");
            ExitCode::from(3)
        }
        Some(Code::NotFound) => {
            let _ = writeln!(stderr, "error: {}", chain(e));
            ExitCode::from(4)
        }
        _ => {
            let _ = writeln!(stderr, "error: {}", chain(e));
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
