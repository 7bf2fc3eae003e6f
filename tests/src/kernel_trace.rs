//! What the kernel really emits, recorded with tracefs and replayed
//! through the agent's in-flight accounting.
//!
//! The in-flight model once assumed that one submitted bio completes as one
//! request; the kernel splits bios into several requests that each complete
//! whole, and the model lost writes at split points. Tests that generate
//! kernel behaviour from the model's own assumptions cannot find that. So
//! these record `block_bio_queue` / `block_split` / `block_rq_complete` /
//! `block_bio_complete` on a real device under real workloads, compute the truth from the recording
//! alone (per sector, in the kernel's own time order), and replay the same
//! events through [`InFlight`] the way the agent drains them: per-CPU rings
//! read at different moments, completions only up to positions read before
//! the submissions.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use cbt_agent::changes::InFlight;

use crate::sh;

/// One recorded event, in the kernel's time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEvent {
    pub ts_ns: u64,
    pub cpu: u32,
    pub what: Traced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traced {
    /// `block_bio_queue` of a write or discard: sectors `[sector, sector + nr)`.
    Submitted { sector: u64, nr: u64 },
    /// `block_rq_complete` of a write or discard (`nr` may be part of the
    /// request), or `block_bio_complete` of one that ended before a request
    /// held it (what it still held).
    Completed { sector: u64, nr: u64 },
    /// `block_split`: not replayed (the agent does not hook it), counted so
    /// a recording can show it exercised splits.
    Split,
}

/// A tracefs instance recording the block events of one device.
pub struct Recording {
    dir: PathBuf,
}

const EVENTS: [&str; 4] = [
    "block_bio_queue",
    "block_rq_complete",
    "block_bio_complete",
    "block_split",
];

impl Recording {
    /// Starts recording events of the disk `major:minor`.
    pub fn start(tag: &str, major: u32, minor: u32) -> Self {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("instances").exists() {
            sh("mount -t tracefs nodev /sys/kernel/tracing");
        }
        let dir = tracefs
            .join("instances")
            .join(format!("cbt-{tag}-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let recording = Self { dir };
        recording.write("buffer_size_kb", "32768");
        // One clock for every CPU: the truth is the kernel's global order.
        recording.write("trace_clock", "mono");
        // The kernel's internal dev_t, as the events store it.
        let dev = (major << 20) | minor;
        for event in EVENTS {
            recording.write(
                &format!("events/block/{event}/filter"),
                &format!("dev == {dev}"),
            );
            recording.write(&format!("events/block/{event}/enable"), "1");
        }
        recording
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .unwrap_or_else(|e| panic!("writing {value:?} to {}: {e}", path.display()));
    }

    /// Stops and returns the events, in time order. Panics if the kernel
    /// lost any (a replay of an incomplete recording proves nothing).
    pub fn finish(self) -> Vec<TraceEvent> {
        for event in EVENTS {
            self.write(&format!("events/block/{event}/enable"), "0");
        }
        let per_cpu = std::fs::read_dir(self.dir.join("per_cpu")).expect("per_cpu stats");
        for cpu in per_cpu.flatten() {
            let stats = std::fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
            for line in stats
                .lines()
                .filter(|l| l.starts_with("overrun:") || l.starts_with("dropped events:"))
            {
                let lost: u64 = line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                assert_eq!(
                    lost,
                    0,
                    "tracefs lost events on {}: {line}",
                    cpu.path().display()
                );
            }
        }
        let text = std::fs::read_to_string(self.dir.join("trace")).expect("reading the trace");
        parse(&text)
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        for event in EVENTS {
            let _ = std::fs::write(self.dir.join(format!("events/block/{event}/enable")), "0");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Parses tracefs text lines such as
/// `dd-3265 [001] ..... 148.057651: block_bio_queue: 7,0 WS 8 + 2072 [dd]`
/// `ksoftirqd/0-14 [000] ..s.. 148.057873: block_rq_complete: 7,0 WS () 8 + 1024 be,0,4 [0]`.
pub fn parse(text: &str) -> Vec<TraceEvent> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, rest)) = line.split_once(": block_") else {
            continue;
        };
        let cpu = head
            .split('[')
            .nth(1)
            .and_then(|c| c.split(']').next())
            .and_then(|c| c.trim().parse().ok());
        let ts = head.rsplit(' ').next().and_then(parse_ts);
        let (Some(cpu), Some(ts_ns)) = (cpu, ts) else {
            panic!("unparsed trace line: {line}")
        };
        let (event, fields) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("unparsed trace line: {line}"));
        let tokens: Vec<&str> = fields.split_whitespace().collect();
        let rwbs = tokens.get(1).copied().unwrap_or("");
        let op = rwbs.trim_start_matches('F');
        let changes = op.starts_with('W') || op.starts_with('D');
        let range = |at: usize| -> (u64, u64) {
            let sector = tokens[at]
                .parse()
                .unwrap_or_else(|_| panic!("sector in {line}"));
            let nr = tokens[at + 2]
                .parse()
                .unwrap_or_else(|_| panic!("sector count in {line}"));
            (sector, nr)
        };
        let what = match event {
            "bio_queue" if changes => {
                let (sector, nr) = range(2);
                Traced::Submitted { sector, nr }
            }
            // `()` stands where a passthrough command would be.
            "rq_complete" if changes => {
                let at = tokens.iter().position(|t| *t == "+").expect("a range") - 1;
                let (sector, nr) = range(at);
                Traced::Completed { sector, nr }
            }
            "bio_complete" if changes => {
                let (sector, nr) = range(2);
                Traced::Completed { sector, nr }
            }
            "split" => Traced::Split,
            _ => continue,
        };
        out.push(TraceEvent { ts_ns, cpu, what });
    }
    out.sort_by_key(|e| e.ts_ns);
    out
}

fn parse_ts(ts: &str) -> Option<u64> {
    let ts = ts.trim_end_matches(':');
    let (secs, frac) = ts.split_once('.')?;
    let frac = format!("{frac:0<9}");
    Some(secs.parse::<u64>().ok()? * 1_000_000_000 + frac[..9].parse::<u64>().ok()?)
}

/// The truth, from the recording alone: how many submitted sectors are not
/// yet completed, per sector, in the kernel's time order.
#[derive(Default)]
struct Truth {
    sectors: HashMap<u64, u32>,
}

impl Truth {
    fn apply(&mut self, e: &TraceEvent) {
        match e.what {
            Traced::Submitted { sector, nr } => {
                for s in sector..sector + nr {
                    *self.sectors.entry(s).or_default() += 1;
                }
            }
            Traced::Completed { sector, nr } => {
                for s in sector..sector + nr {
                    let count = self.sectors.get_mut(&s).unwrap_or_else(|| {
                        panic!("the kernel completed sector {s} that no recorded submission held ({e:?})")
                    });
                    *count -= 1;
                    if *count == 0 {
                        self.sectors.remove(&s);
                    }
                }
            }
            Traced::Split => {}
        }
    }

    fn blocks(&self, block_shift: u32) -> Vec<u64> {
        let mut blocks: Vec<u64> = self.sectors.keys().map(|s| s >> block_shift).collect();
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }
}

/// Replays `events` through [`InFlight`] as the agent drains them, with
/// drain moments and ring-read delays drawn from `rng`, and checks after
/// every drain that every block the truth has in flight at any moment
/// between the completion positions' read and the first submission ring's
/// read is counted in flight. Returns how many drains were checked.
pub fn replay_as_drained(events: &[TraceEvent], rng: &mut fastrand::Rng) -> usize {
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return 0;
    };
    let cpus = events.iter().map(|e| e.cpu).max().unwrap_or(0) as usize + 1;
    // Per CPU, per family: the ring's events in publish order.
    let ring = |completions: bool, cpu: usize| {
        events
            .iter()
            .filter(move |e| {
                e.cpu as usize == cpu && matches!(e.what, Traced::Completed { .. }) == completions
            })
            .filter(|e| e.what != Traced::Split)
            .copied()
            .collect::<Vec<_>>()
    };
    let submission_rings: Vec<Vec<TraceEvent>> = (0..cpus).map(|c| ring(false, c)).collect();
    let completion_rings: Vec<Vec<TraceEvent>> = (0..cpus).map(|c| ring(true, c)).collect();
    let mut submission_tails = vec![0usize; cpus];
    let mut completion_tails = vec![0usize; cpus];
    let mut model = InFlight::default();
    let mut truth = Truth::default();
    let mut truth_at = 0usize;
    let mut drains = 0;
    // A drain every 0.05-5 ms, its ring reads spread over up to 2 ms (an
    // agent preempted mid-drain).
    let mut now = first.ts_ns;
    while now <= last.ts_ns + 5_000_000 {
        now += rng.u64(50_000..5_000_000);
        let heads_read = now;
        let mut read_at = heads_read;
        let mut first_submission_read = u64::MAX;
        let mut batch = Vec::new();
        for cpu in 0..cpus {
            read_at += rng.u64(0..2_000_000 / cpus as u64);
            first_submission_read = first_submission_read.min(read_at);
            let ring = &submission_rings[cpu];
            while submission_tails[cpu] < ring.len() && ring[submission_tails[cpu]].ts_ns <= read_at
            {
                batch.push(ring[submission_tails[cpu]]);
                submission_tails[cpu] += 1;
            }
        }
        for cpu in 0..cpus {
            let ring = &completion_rings[cpu];
            while completion_tails[cpu] < ring.len()
                && ring[completion_tails[cpu]].ts_ns <= heads_read
            {
                batch.push(ring[completion_tails[cpu]]);
                completion_tails[cpu] += 1;
            }
        }
        for e in &batch {
            match e.what {
                Traced::Submitted { sector, nr } => model.submitted(sector, sector + nr),
                Traced::Completed { sector, nr } => model.completed(sector, sector + nr),
                Traced::Split => {}
            }
        }
        let counted = model.blocks();
        // The truth at every moment from the completions' read to the
        // first submission ring's read.
        let check = |truth: &Truth, at: u64| {
            for b in truth.blocks(cbt_agent::changes::BLOCK_SHIFT) {
                assert!(
                    counted.contains(b),
                    "block {b} truly in flight at {at} ns is not counted after drain {drains}"
                );
            }
        };
        while truth_at < events.len() && events[truth_at].ts_ns <= heads_read {
            truth.apply(&events[truth_at]);
            truth_at += 1;
        }
        check(&truth, heads_read);
        while truth_at < events.len() && events[truth_at].ts_ns <= first_submission_read {
            truth.apply(&events[truth_at]);
            truth_at += 1;
            check(&truth, events[truth_at - 1].ts_ns);
        }
        drains += 1;
        now = read_at;
    }
    if !truth.sectors.is_empty() {
        let mut left: Vec<u64> = truth.sectors.keys().copied().collect();
        left.sort_unstable();
        let around: Vec<_> = events
            .iter()
            .filter(|e| match e.what {
                Traced::Submitted { sector, nr } | Traced::Completed { sector, nr } => {
                    sector <= left[0] && left[0] < sector + nr
                }
                Traced::Split => false,
            })
            .collect();
        panic!(
            "the recording ended with {} sectors in flight, from {}: events over it: {around:?}",
            left.len(),
            left[0]
        );
    }
    assert!(
        model.is_empty(),
        "every write completed, yet {} blocks are still counted",
        model.len()
    );
    drains
}
