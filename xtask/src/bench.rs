//! `cargo xtask bench …` (filled in by the capture benchmark).
use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum Bench {
    /// fio 4k randwrite with and without the agent, interleaved rounds.
    Capture,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Capture => anyhow::bail!("not written yet"),
    }
}
