//! What a durable append costs on this machine's disk (not a benchmark
//! harness: a quick measurement to size the change log's flush policy).
//!
//! `cargo run --release -p cbt-agent --example journal_cost [DIR]` (default `/var/tmp`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cbt_agent::journal::Journal;

fn per_op(total: Duration, n: u32) -> String {
    format!("{:.1} µs", total.as_secs_f64() * 1e6 / f64::from(n))
}

fn main() -> anyhow::Result<()> {
    let base = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = base.join(format!("cbt-journal-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("journal");
    let (mut journal, _) = Journal::open(&path)?;

    let big = vec![0x5au8; 64 << 10];
    let rounds = 100;
    let start = Instant::now();
    for _ in 0..rounds {
        journal.append(&big)?;
        journal.sync()?;
    }
    println!(
        "1 record of 64 KiB, append + sync: {} each ({rounds} rounds)",
        per_op(start.elapsed(), rounds)
    );

    let small = [0xa5u8; 100];
    let n = 1000;
    let rounds = 20;
    let start = Instant::now();
    for _ in 0..rounds {
        for _ in 0..n {
            journal.append(&small)?;
        }
        journal.sync()?;
    }
    println!(
        "1000 records of 100 B, appended then one sync: {} per batch ({rounds} rounds)",
        per_op(start.elapsed(), rounds)
    );

    let start = Instant::now();
    for _ in 0..n {
        journal.append(&small)?;
        journal.sync()?;
    }
    println!(
        "1 record of 100 B, append + sync, 1000 times: {} each",
        per_op(start.elapsed(), n)
    );

    let records: Vec<Vec<u8>> = (0..n).map(|_| small.to_vec()).collect();
    let start = Instant::now();
    journal.rewrite(records.iter().map(Vec::as_slice))?;
    println!("rewrite to 1000 records of 100 B: {}", per_op(start.elapsed(), 1));

    drop(journal);
    let start = Instant::now();
    let (_, recovered) = Journal::open(&path)?;
    println!(
        "open with {} records: {}",
        recovered.records.len(),
        per_op(start.elapsed(), 1)
    );

    // The worst torn tail to judge: a big high-entropy record cut short (the
    // search for intact frames after it checks every offset).
    let mut journal = Journal::open(&path)?.0;
    let noise: Vec<u8> = (0..64u64 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    journal.append(&noise)?;
    journal.sync()?;
    drop(journal);
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;
    file.set_len(file.metadata()?.len() - 1)?;
    let start = Instant::now();
    let (_, recovered) = Journal::open(&path)?;
    println!(
        "open with a 64 MiB record cut short ({:?}): {}",
        recovered.tail,
        per_op(start.elapsed(), 1)
    );

    // The longest tail still searched for intact frames (a longer one is
    // damage on its length alone): high-entropy bytes after the last frame.
    let mut journal = Journal::open(&path)?.0;
    journal.rewrite([&small[..]])?;
    drop(journal);
    let garbage: Vec<u8> = (0..cbt_agent::journal::MAX_TORN_BYTES)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();
    let mut file = std::fs::OpenOptions::new().append(true).open(&path)?;
    std::io::Write::write_all(&mut file, &garbage)?;
    drop((file, garbage));
    let start = Instant::now();
    let (_, recovered) = Journal::open(&path)?;
    println!(
        "open with {} MiB of garbage after the last frame ({:?}): {}",
        cbt_agent::journal::MAX_TORN_BYTES >> 20,
        recovered.tail,
        per_op(start.elapsed(), 1)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
