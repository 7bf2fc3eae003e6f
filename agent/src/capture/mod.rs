//! Kernel capture: loads the eBPF programs, attaches them to the block
//! layer and hands the agent every content-changing I/O, with an account of
//! everything that could have been lost on the way.
//!
//! Contract (../shared/design/correctness-contract.md §2–3): every op that
//! can change content is captured or shows up as loss; loss is never silent.

mod btf;
mod layout;
mod rings;

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
};

use aya::{
    maps::Map,
    programs::{BtfTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};
use cbt_common::{programs, CaptureEvent, ProgramConfig, CONFIG_GLOBAL, RINGS_MAP, UNPUBLISHABLE_MAP};
pub use rings::DrainReport;
use rings::Rings;

/// The compiled eBPF object, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("CBT_EBPF_OBJECT"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("mapping the event rings: {0}")]
    Mmap(std::io::Error),
    #[error("reading program statistics: {0}")]
    ProgramInfo(std::io::Error),
    #[error("possible CPUs: {0}")]
    Cpus(String),
    #[error("no hook flavor could be attached: {0}")]
    NoFlavor(String),
}

/// Which kind of tracepoint the programs are attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// `tp_btf`: exact `REQ_OP` and the device instance (`diskseq`) read in
    /// the kernel. Preferred.
    Btf,
    /// Classic tracepoints decoded from `rwbs` text; `diskseq` resolved in
    /// user space.
    Classic,
}

/// What to load.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// `None`: BTF if the kernel allows it, else classic.
    pub flavor: Option<Flavor>,
    /// Attach the request-completion program (BTF flavor): precision for
    /// writes in flight across a cut, at one more program run per request.
    pub completions: bool,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self { flavor: None, completions: true }
    }
}

/// Per-program kernel statistics (`bpf_prog_info`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProgramStats {
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because the program was already running on
    /// that CPU: each may be a lost write.
    pub recursion_misses: u64,
}

/// A running capture: programs attached, rings mapped.
pub struct Capture {
    // Field order matters for drop: unmap the rings before the map closes.
    rings: Rings,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    ebpf: Ebpf,
    flavor: Flavor,
    attached: Vec<&'static str>,
    nr_cpus: u32,
}

impl Capture {
    /// Loads and attaches the programs. Capture is live when this returns.
    pub fn start(options: &CaptureOptions) -> Result<Self, CaptureError> {
        ensure_tracefs();
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| CaptureError::Cpus(format!("{what}: {e}")))? as u32;
        let mut config = ProgramConfig::EMPTY;
        config.nr_cpus = nr_cpus;
        let kernel_btf = btf::Btf::from_kernel();
        if let Ok(btf) = &kernel_btf {
            config.op_kind = layout::op_table(btf.enum_values("req_op")?);
        } else {
            // Without BTF the classic programs never consult the table.
            config.op_kind = [0; 256];
        }
        let btf_ready = kernel_btf.and_then(|btf| layout::fill_btf(&mut config, &btf));
        let tracefs_ready = layout::fill_tracefs(&mut config, Path::new(layout::TRACEFS));

        let order: &[Flavor] = match options.flavor {
            Some(Flavor::Btf) => &[Flavor::Btf],
            Some(Flavor::Classic) => &[Flavor::Classic],
            None => &[Flavor::Btf, Flavor::Classic],
        };
        let mut failures = Vec::new();
        for &flavor in order {
            let ready = match flavor {
                Flavor::Btf => btf_ready.as_ref().map_err(ToString::to_string),
                Flavor::Classic => tracefs_ready.as_ref().map_err(ToString::to_string),
            };
            if let Err(e) = ready {
                failures.push(format!("{flavor:?}: {e}"));
                continue;
            }
            match Self::load(flavor, &config, nr_cpus, options.completions) {
                Ok(capture) => return Ok(capture),
                Err(e) => {
                    tracing::warn!(?flavor, error = %e, "hook flavor unavailable");
                    failures.push(format!("{flavor:?}: {e}"));
                }
            }
        }
        Err(CaptureError::NoFlavor(failures.join("; ")))
    }

    fn load(flavor: Flavor, config: &ProgramConfig, nr_cpus: u32, completions: bool) -> Result<Self, CaptureError> {
        let ring_count = Rings::elements(nr_cpus);
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, config, true)
            .map_max_entries(RINGS_MAP, ring_count)
            .load(EBPF_OBJECT)?;
        // The programs log only on rare paths (first ring drop, passthrough);
        // their records reach `tracing` through the `log` bridge.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| tracing::warn!(error = %e, "eBPF diagnostics unavailable"))
            .ok();
        let rings = match ebpf.map(RINGS_MAP) {
            Some(Map::Array(data)) => Rings::map(data.fd().as_fd(), ring_count)?,
            _ => return Err(missing_map(RINGS_MAP)),
        };
        // The passthrough hook goes first so that once the bio hook is live,
        // nothing that changes content is unobserved.
        let attached = match flavor {
            Flavor::Btf => {
                let btf = aya::Btf::from_sys_fs().map_err(|e| CaptureError::Btf(e.to_string()))?;
                // Completions first: a completion seen without its write
                // only leaves a stale entry (over-report), never the reverse.
                let all = [
                    (programs::RQ_COMPLETE_BTF, "block_rq_complete"),
                    (programs::RQ_ISSUE_BTF, "block_rq_issue"),
                    (programs::BIO_QUEUE_BTF, "block_bio_queue"),
                ];
                let list: Vec<_> = all.into_iter().filter(|(n, _)| completions || *n != programs::RQ_COMPLETE_BTF).collect();
                for &(name, tp) in &list {
                    let prog: &mut BtfTracePoint = program(&mut ebpf, name)?;
                    prog.load(tp, &btf).map_err(|source| CaptureError::Program { name, source })?;
                    prog.attach().map_err(|source| CaptureError::Program { name, source })?;
                }
                list.iter().map(|(n, _)| *n).collect()
            }
            Flavor::Classic => {
                let list = [
                    (programs::RQ_ISSUE_CLASSIC, "block_rq_issue"),
                    (programs::BIO_QUEUE_CLASSIC, "block_bio_queue"),
                ];
                for (name, tp) in list {
                    let prog: &mut TracePoint = program(&mut ebpf, name)?;
                    prog.load().map_err(|source| CaptureError::Program { name, source })?;
                    prog.attach("block", tp).map_err(|source| CaptureError::Program { name, source })?;
                }
                list.map(|(n, _)| n).to_vec()
            }
        };
        tracing::info!(?flavor, programs = ?attached, nr_cpus, ring_bytes = Rings::kernel_bytes(nr_cpus), "capture attached");
        Ok(Self { rings, logger, ebpf, flavor, attached, nr_cpus })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Whether request completions are reported (`Completed` events).
    pub fn tracks_completions(&self) -> bool {
        self.attached.contains(&programs::RQ_COMPLETE_BTF)
    }

    /// Kernel memory held by the event rings (fixed at load).
    pub fn kernel_ring_bytes(&self) -> u64 {
        Rings::kernel_bytes(self.nr_cpus)
    }

    /// Moves every published event into `out`; with `marks` (from
    /// [`Capture::marks`]) the report tells which were published after them.
    pub fn drain(&mut self, out: &mut Vec<CaptureEvent>, marks: Option<&[u64]>) -> DrainReport {
        self.rings.drain(out, marks)
    }

    /// Publish positions now, for [`Capture::drain`].
    pub fn marks(&self) -> Vec<u64> {
        self.rings.marks()
    }

    /// Forwards the programs' log records to `tracing`.
    pub fn flush_kernel_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// Events the programs could not publish at all (see
    /// [`UNPUBLISHABLE_MAP`]), cumulative.
    pub fn unpublishable(&self) -> Result<u64, CaptureError> {
        let map = self.ebpf.map(UNPUBLISHABLE_MAP).ok_or_else(|| missing_map(UNPUBLISHABLE_MAP))?;
        let array = aya::maps::Array::<_, u64>::try_from(map).map_err(|e| CaptureError::Load(e.into()))?;
        array.get(&0, 0).map_err(|e| CaptureError::Load(e.into()))
    }

    /// Statistics of each attached program, by name.
    pub fn program_stats(&self) -> Result<Vec<(&'static str, ProgramStats)>, CaptureError> {
        self.attached
            .iter()
            .map(|&name| {
                let prog = self.ebpf.program(name).expect("attached program exists");
                let fd = prog.fd().map_err(|e| CaptureError::Program { name, source: e })?;
                Ok((name, prog_stats(fd.as_fd().as_raw_fd())?))
            })
            .collect()
    }
}

fn missing_map(name: &str) -> CaptureError {
    CaptureError::Load(aya::EbpfError::MapError(aya::maps::MapError::InvalidName { name: name.into() }))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(CaptureError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    prog.try_into().map_err(|source| CaptureError::Program { name, source })
}

/// `BPF_OBJ_GET_INFO_BY_FD`: aya exposes run time and count but not
/// `recursion_misses`, the only witness of skipped runs.
fn prog_stats(fd: i32) -> Result<ProgramStats, CaptureError> {
    use aya_obj::generated::bpf_prog_info;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is plain integers; all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoAttr {
        bpf_fd: fd as u32,
        info_len: std::mem::size_of::<bpf_prog_info>() as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: attr points at a live, correctly sized info struct.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &attr as *const InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if rc < 0 {
        return Err(CaptureError::ProgramInfo(std::io::Error::last_os_error()));
    }
    Ok(ProgramStats {
        run_count: info.run_cnt,
        run_time_ns: info.run_time_ns,
        recursion_misses: info.recursion_misses,
    })
}

/// Classic tracepoints need tracefs; BTF ones do not, so failure here is
/// only reported by the classic flavor's own check.
fn ensure_tracefs() {
    let probe = Path::new(layout::TRACEFS).join("events");
    if probe.exists() {
        return;
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", layout::TRACEFS])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        tracing::debug!("tracefs not mounted and mount failed");
    }
}
