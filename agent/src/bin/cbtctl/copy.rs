//! `copy`: turn a copy of the base snapshot into the target snapshot by
//! copying only the ranges GetMetadataDelta reports — what an incremental
//! backup (and the upstream snapshot-metadata-verifier) does.

use std::{
    fs::{File, OpenOptions},
    io::{IsTerminal, Seek, SeekFrom},
    os::unix::fs::{FileExt, FileTypeExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::metadata::{MetadataStream, Query};

/// Bytes per read/write.
const BUFFER: usize = 8 << 20;

#[derive(clap::Args)]
pub struct CopyArgs {
    /// CSI handle of the base snapshot (the one OUTPUT holds).
    base: String,
    /// CSI handle of the target snapshot (the one TARGET_IMAGE holds).
    target: String,
    /// File or block device holding the target snapshot's bytes.
    #[arg(long = "from", value_name = "TARGET_IMAGE")]
    from: PathBuf,
    /// File or block device holding the base snapshot's bytes; becomes the
    /// target. A file shorter than the volume is extended.
    #[arg(long, value_name = "OUTPUT")]
    onto: PathBuf,
    /// Tuples per message asked of the server (0: its choice).
    #[arg(long, default_value_t = 0)]
    max_results: i32,
}

pub async fn run(channel: Channel, args: CopyArgs) -> Result<()> {
    // The whole delta first: nothing is written unless the server vouched
    // for all of it, and the progress bar knows the total.
    let query = Query::Delta { base: args.base.clone(), target: args.target.clone() };
    let context = || {
        format!("GetMetadataDelta({}, {})", cbt_agent::names::Echo(&args.base), cbt_agent::names::Echo(&args.target))
    };
    let mut stream = MetadataStream::open(channel, &query, 0, args.max_results).await.with_context(context)?;
    let mut capacity = None;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut reported = 0usize;
    while let Some(m) = stream.next().await.with_context(context)? {
        let cap = m.volume_capacity_bytes as u64;
        capacity = Some(cap);
        for r in m.ranges {
            reported += 1;
            // Never past the volume, even if a server lets a tuple run over.
            let (start, end) = (r.byte_offset as u64, (r.end() as u64).min(cap));
            match ranges.last_mut() {
                Some((_, last_end)) if *last_end == start => *last_end = end,
                _ => ranges.push((start, end)),
            }
        }
    }
    let Some(capacity) = capacity else {
        bail!("{}: the server sent no message, so the volume capacity is unknown", context());
    };
    let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    let summary = tokio::task::spawn_blocking(move || copy_ranges(&args.from, &args.onto, capacity, &ranges, total))
        .await
        .context("copy thread")??;
    crate::print_out(|out| {
        writeln!(
            out,
            "copied {reported} ranges ({} after merging adjacent ones), {total} bytes of a {capacity}-byte volume{}",
            summary.merged,
            if summary.extended { "; output extended to the volume capacity" } else { "" }
        )
    })
}

struct Summary {
    merged: usize,
    extended: bool,
}

fn copy_ranges(from: &Path, onto: &Path, capacity: u64, ranges: &[(u64, u64)], total: u64) -> Result<Summary> {
    let source = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let output =
        OpenOptions::new().read(true).write(true).open(onto).with_context(|| format!("opening {}", onto.display()))?;
    let needed = ranges.last().map_or(0, |&(_, end)| end);
    let source_size = size(&source).with_context(|| format!("size of {}", from.display()))?;
    ensure!(source_size >= needed, "{} holds {source_size} bytes but the delta reaches byte {needed}", from.display());
    let mut extended = false;
    let output_size = size(&output).with_context(|| format!("size of {}", onto.display()))?;
    if output_size < capacity {
        let meta = output.metadata()?;
        ensure!(
            meta.file_type().is_file(),
            "{} holds {output_size} bytes, less than the volume's {capacity}, and cannot be extended",
            onto.display()
        );
        output.set_len(capacity).with_context(|| format!("extending {} to {capacity} bytes", onto.display()))?;
        extended = true;
    }

    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut buf = vec![0u8; BUFFER.min(total.max(1) as usize)];
    for &(start, end) in ranges {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            source
                .read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading {n} bytes at {at} from {}", from.display()))?;
            output
                .write_all_at(&buf[..n], at)
                .with_context(|| format!("writing {n} bytes at {at} to {}", onto.display()))?;
            at += n as u64;
            bar.inc(n as u64);
        }
    }
    output.sync_all().with_context(|| format!("syncing {}", onto.display()))?;
    bar.finish_and_clear();
    Ok(Summary { merged: ranges.len(), extended })
}

/// Size of a regular file or a block device.
fn size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Seeking needs a mutable handle; a clone shares the descriptor's
        // offset, which positional I/O ignores.
        file.try_clone()?.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}
