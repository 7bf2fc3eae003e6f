//! Kernel capture: loads the eBPF programs, attaches them to the block
//! layer and hands the agent every content-changing I/O, with an account of
//! everything that could have been lost on the way.
//!
//! Contract (../shared/design/correctness-contract.md §2–3): every op that
//! can change content is captured or shows up as loss; loss is never silent.

mod barrier;
mod btf;
mod layout;
mod pins;
mod rings;

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        BtfTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use cbt_common::{programs, CaptureEvent, ProgramConfig, CONFIG_GLOBAL, RINGS_MAP, UNPUBLISHABLE_MAP};
pub use barrier::{BarrierError, ProgramBarrier};
pub use pins::{PinDir, PinError};
pub use rings::{DrainReport, ReplayReport};
use rings::Rings;
use serde::{Deserialize, Serialize};

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
    #[error("pinning in bpffs: {0}")]
    Pin(#[from] PinError),
    #[error("pinning {what}: {source}")]
    PinObject {
        what: String,
        #[source]
        source: aya::pin::PinError,
    },
}

/// Why a pinned capture could not be taken over: the caller starts afresh
/// and the interval since the checkpoint becomes a gap.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResumeRefused(pub String);

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
    /// Pin programs, links and maps here (BTF flavor) so that they keep
    /// capturing while no agent runs, and a later agent can take over.
    pub pins: Option<PinDir>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self { flavor: None, completions: true, pins: None }
    }
}

/// What a later agent needs to take over a pinned capture without a gap:
/// which objects, and how far their events are already in the durable log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureCheckpoint {
    /// The eBPF object and its load-time configuration: a different build
    /// or kernel layout cannot be taken over.
    pub identity: String,
    /// The pinned ring map (ids are not reused within a boot).
    pub rings_map_id: u32,
    /// Per ring: events before this position are accounted for.
    pub tails: Vec<u64>,
    /// Per ring: drops already accounted (as gaps).
    pub dropped: Vec<u64>,
    /// Per program: recursion misses already accounted.
    pub recursion_misses: BTreeMap<String, u64>,
    pub unpublishable: u64,
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
    rings_map: MapData,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Loaded here (not taken over): owns the programs and, unpinned,
    /// their links, which detach when it drops.
    _ebpf: Option<Ebpf>,
    /// Per attached program, a descriptor for its statistics.
    programs: Vec<(&'static str, OwnedFd)>,
    unpublishable: Array<MapData, u64>,
    flavor: Flavor,
    nr_cpus: u32,
    identity: String,
    pins: Option<PinDir>,
    /// Held while running, so that removing the pins cannot detach the
    /// programs under a live agent.
    _links: Vec<PinnedLink>,
}

/// The programs of a flavor, in attach order, with their tracepoints.
fn program_list(flavor: Flavor, completions: bool) -> Vec<(&'static str, &'static str)> {
    match flavor {
        // Completions first: a completion seen without its write only
        // leaves a stale entry (over-report), never the reverse. The
        // passthrough hook before the bio hook: once the bio hook is live,
        // nothing that changes content is unobserved.
        Flavor::Btf => [
            (programs::RQ_COMPLETE_BTF, "block_rq_complete"),
            (programs::BIO_COMPLETE_BTF, "block_bio_complete"),
            (programs::RQ_ISSUE_BTF, "block_rq_issue"),
            (programs::BIO_QUEUE_BTF, "block_bio_queue"),
        ]
        .into_iter()
        .filter(|(n, _)| completions || !is_completion_program(n))
        .collect(),
        Flavor::Classic => vec![
            (programs::RQ_ISSUE_CLASSIC, "block_rq_issue"),
            (programs::BIO_QUEUE_CLASSIC, "block_bio_queue"),
        ],
    }
}

/// A program that reports completions: its lost runs cost precision (a
/// write stays counted in flight), never coverage.
pub fn is_completion_program(name: &str) -> bool {
    name == programs::RQ_COMPLETE_BTF || name == programs::BIO_COMPLETE_BTF
}

/// The programs' load-time configuration for this kernel, and whether each
/// flavor can use it.
struct Prepared {
    config: ProgramConfig,
    nr_cpus: u32,
    btf_ready: Result<(), String>,
    tracefs_ready: Result<(), String>,
}

impl Prepared {
    fn new() -> Result<Self, CaptureError> {
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
        let btf_ready = kernel_btf.and_then(|btf| layout::fill_btf(&mut config, &btf)).map_err(|e| e.to_string());
        let tracefs_ready = layout::fill_tracefs(&mut config, Path::new(layout::TRACEFS)).map_err(|e| e.to_string());
        Ok(Self { config, nr_cpus, btf_ready, tracefs_ready })
    }

    /// Which object, configured how, running which programs.
    fn identity(&self, flavor: Flavor, completions: bool) -> String {
        // SAFETY: ProgramConfig is plain integers without padding (aya::Pod).
        let config = unsafe {
            std::slice::from_raw_parts(
                (&self.config as *const ProgramConfig).cast::<u8>(),
                std::mem::size_of::<ProgramConfig>(),
            )
        };
        let programs: Vec<_> = program_list(flavor, completions).into_iter().map(|(n, _)| n).collect();
        format!(
            "{:08x}-{:08x}-{}",
            crc32c::crc32c(EBPF_OBJECT),
            crc32c::crc32c(config),
            programs.join(",")
        )
    }
}

impl Capture {
    /// Loads and attaches the programs. Capture is live when this returns.
    /// With pins, whatever an earlier agent pinned there is released first.
    pub fn start(options: &CaptureOptions) -> Result<Self, CaptureError> {
        let prepared = Prepared::new()?;
        let order: &[Flavor] = match options.flavor {
            Some(Flavor::Btf) => &[Flavor::Btf],
            Some(Flavor::Classic) => &[Flavor::Classic],
            None => &[Flavor::Btf, Flavor::Classic],
        };
        if let Some(pins) = &options.pins {
            if pins.release()? {
                tracing::info!(pins = %pins.path().display(), "released the capture an earlier agent left pinned");
            }
        }
        let mut failures = Vec::new();
        for &flavor in order {
            let ready = match flavor {
                Flavor::Btf => &prepared.btf_ready,
                Flavor::Classic => &prepared.tracefs_ready,
            };
            if let Err(e) = ready {
                failures.push(format!("{flavor:?}: {e}"));
                continue;
            }
            match Self::load(flavor, &prepared, options) {
                Ok(capture) => return Ok(capture),
                Err(e) => {
                    tracing::warn!(?flavor, error = %e, "hook flavor unavailable");
                    failures.push(format!("{flavor:?}: {e}"));
                }
            }
        }
        Err(CaptureError::NoFlavor(failures.join("; ")))
    }

    fn load(flavor: Flavor, prepared: &Prepared, options: &CaptureOptions) -> Result<Self, CaptureError> {
        let nr_cpus = prepared.nr_cpus;
        let ring_count = Rings::elements(nr_cpus);
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &prepared.config, true)
            .map_max_entries(RINGS_MAP, ring_count)
            .load(EBPF_OBJECT)?;
        // The programs log only on rare paths (first ring drop, passthrough);
        // their records reach `tracing` through the `log` bridge.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| tracing::warn!(error = %e, "eBPF diagnostics unavailable"))
            .ok();
        let rings_map = match ebpf.take_map(RINGS_MAP) {
            Some(Map::Array(data)) => data,
            _ => return Err(missing_map(RINGS_MAP)),
        };
        let rings = Rings::map(rings_map.fd().as_fd(), ring_count)?;
        let unpublishable_map = match ebpf.take_map(UNPUBLISHABLE_MAP) {
            Some(Map::Array(data)) => data,
            _ => return Err(missing_map(UNPUBLISHABLE_MAP)),
        };
        // Only tp_btf links are bpf links that can be pinned.
        let pins = options.pins.clone().filter(|_| flavor == Flavor::Btf);
        if let Some(pins) = &pins {
            pins.create()?;
            pin_object("the event rings", rings_map.pin(pins.rings()))?;
            pin_object("the loss counter", unpublishable_map.pin(pins.unpublishable()))?;
        }
        let unpublishable: Array<MapData, u64> =
            Array::try_from(Map::Array(unpublishable_map)).map_err(|e| CaptureError::Load(e.into()))?;
        let list = program_list(flavor, options.completions);
        let btf = match flavor {
            Flavor::Btf => Some(aya::Btf::from_sys_fs().map_err(|e| CaptureError::Btf(e.to_string()))?),
            Flavor::Classic => None,
        };
        let mut programs = Vec::new();
        let mut links = Vec::new();
        for &(name, tp) in &list {
            let fail = |source| CaptureError::Program { name, source };
            match &btf {
                Some(btf) => {
                    let prog: &mut BtfTracePoint = program(&mut ebpf, name)?;
                    prog.load(tp, btf).map_err(fail)?;
                    let link = prog.attach().map_err(fail)?;
                    if let Some(pins) = &pins {
                        pin_object(name, prog.pin(pins.program(name)))?;
                        let link: FdLink = prog.take_link(link).map_err(fail)?.into();
                        // The pin keeps the program attached after we exit.
                        let pinned = link.pin(pins.link(name));
                        links.push(pinned.map_err(|source| CaptureError::PinObject { what: name.into(), source })?);
                    }
                    programs.push((name, clone_fd(prog.fd().map_err(fail)?)?));
                }
                None => {
                    let prog: &mut TracePoint = program(&mut ebpf, name)?;
                    prog.load().map_err(fail)?;
                    prog.attach("block", tp).map_err(fail)?;
                    programs.push((name, clone_fd(prog.fd().map_err(fail)?)?));
                }
            }
        }
        let identity = prepared.identity(flavor, options.completions);
        tracing::info!(
            ?flavor,
            programs = ?list.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            nr_cpus,
            ring_bytes = Rings::kernel_bytes(nr_cpus),
            pinned = ?pins.as_ref().map(|p| p.path().display().to_string()),
            "capture attached"
        );
        Ok(Self {
            rings,
            rings_map,
            logger,
            _ebpf: Some(ebpf),
            programs,
            unpublishable,
            flavor,
            nr_cpus,
            identity,
            pins,
            _links: links,
        })
    }

    /// Takes over the capture an earlier agent pinned in `options.pins`,
    /// re-reading from the rings what it had consumed after `checkpoint`.
    /// Refused when anything shows the pins are not those of the
    /// checkpoint, or a ring has been overwritten since.
    pub fn resume(
        options: &CaptureOptions,
        checkpoint: &CaptureCheckpoint,
        replayed: &mut Vec<CaptureEvent>,
    ) -> Result<(Self, ReplayReport), ResumeRefused> {
        let refuse = |what: String| ResumeRefused(what);
        let pins = options.pins.clone().ok_or_else(|| refuse("pinning is off".into()))?;
        if !pins.exists() {
            return Err(refuse(format!("nothing pinned in {}", pins.path().display())));
        }
        if options.flavor == Some(Flavor::Classic) {
            return Err(refuse("the classic flavor is not pinned".into()));
        }
        let prepared = Prepared::new().map_err(|e| refuse(e.to_string()))?;
        let identity = prepared.identity(Flavor::Btf, options.completions);
        if identity != checkpoint.identity {
            return Err(refuse(format!(
                "pinned programs are {}, this agent runs {identity}: a different build or configuration",
                checkpoint.identity
            )));
        }
        let rings_map = MapData::from_pin(pins.rings()).map_err(|e| refuse(format!("pinned rings: {e}")))?;
        let info = rings_map.info().map_err(|e| refuse(format!("pinned rings: {e}")))?;
        if info.id() != checkpoint.rings_map_id {
            return Err(refuse(format!(
                "pinned rings are map {}, the checkpoint's were map {}",
                info.id(),
                checkpoint.rings_map_id
            )));
        }
        let ring_count = Rings::elements(prepared.nr_cpus);
        let per_ring = [checkpoint.tails.len(), checkpoint.dropped.len()];
        if info.max_entries() != ring_count || per_ring != [ring_count as usize; 2] {
            return Err(refuse(format!("pinned rings hold {} rings, expected {ring_count}", info.max_entries())));
        }
        let mut programs = Vec::new();
        let mut links = Vec::new();
        for (name, _) in program_list(Flavor::Btf, options.completions) {
            let link = PinnedLink::from_pin(pins.link(name))
                .map_err(|e| refuse(format!("{name} is no longer attached (its link pin: {e})")))?;
            links.push(link);
            let prog = BtfTracePoint::from_pin(pins.program(name)).map_err(|e| refuse(format!("{name}: {e}")))?;
            let fd = prog.fd().map_err(|e| refuse(format!("{name}: {e}")))?;
            programs.push((name, clone_fd(fd).map_err(|e| refuse(e.to_string()))?));
        }
        let unpublishable_map =
            MapData::from_pin(pins.unpublishable()).map_err(|e| refuse(format!("pinned loss counter: {e}")))?;
        let unpublishable: Array<MapData, u64> = Array::try_from(Map::Array(unpublishable_map))
            .map_err(|e| refuse(format!("pinned loss counter: {e}")))?;
        let mut rings =
            Rings::map(rings_map.fd().as_fd(), ring_count).map_err(|e| refuse(format!("mapping the rings: {e}")))?;
        let report = rings.replay(replayed, &checkpoint.tails, &checkpoint.dropped).map_err(refuse)?;
        let logger = programs
            .iter()
            .find(|(n, _)| *n == programs::BIO_QUEUE_BTF)
            .and_then(|(_, fd)| prog_id(fd.as_raw_fd()).ok())
            .and_then(|id| aya_log::EbpfLogger::init_from_id(id).ok());
        tracing::info!(pins = %pins.path().display(), replayed = replayed.len(), "took over the pinned capture");
        let capture = Self {
            rings,
            rings_map,
            logger,
            _ebpf: None,
            programs,
            unpublishable,
            flavor: Flavor::Btf,
            nr_cpus: prepared.nr_cpus,
            identity,
            pins: Some(pins),
            _links: links,
        };
        Ok((capture, report))
    }

    /// The capture's position, for a later agent to take over from; `None`
    /// if nothing is pinned (its programs go when this process does).
    pub fn checkpoint(&self, recursion_misses: BTreeMap<String, u64>, unpublishable: u64) -> Option<CaptureCheckpoint> {
        self.pins.as_ref()?;
        let rings_map_id = self.rings_map.info().ok()?.id();
        Some(CaptureCheckpoint {
            identity: self.identity.clone(),
            rings_map_id,
            tails: self.rings.tails(),
            dropped: self.rings.accounted_drops(),
            recursion_misses,
            unpublishable,
        })
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Whether request completions are reported (`Completed` events).
    pub fn tracks_completions(&self) -> bool {
        self.programs.iter().any(|(n, _)| *n == programs::RQ_COMPLETE_BTF)
    }

    /// Where the capture is pinned, if it is.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
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
        self.unpublishable.get(&0, 0).map_err(|e| CaptureError::Load(e.into()))
    }

    /// Statistics of each attached program, by name.
    pub fn program_stats(&self) -> Result<Vec<(&'static str, ProgramStats)>, CaptureError> {
        self.programs.iter().map(|(name, fd)| Ok((*name, prog_stats(fd.as_raw_fd())?))).collect()
    }
}

fn pin_object(what: &str, result: Result<(), aya::pin::PinError>) -> Result<(), CaptureError> {
    result.map_err(|source| CaptureError::PinObject { what: what.to_string(), source })
}

fn clone_fd(fd: &aya::programs::ProgramFd) -> Result<OwnedFd, CaptureError> {
    fd.as_fd().try_clone_to_owned().map_err(CaptureError::ProgramInfo)
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
    let info = prog_info(fd).map_err(CaptureError::ProgramInfo)?;
    Ok(ProgramStats {
        run_count: info.run_cnt,
        run_time_ns: info.run_time_ns,
        recursion_misses: info.recursion_misses,
    })
}

fn prog_id(fd: i32) -> std::io::Result<u32> {
    prog_info(fd).map(|info| info.id)
}

fn prog_info(fd: i32) -> std::io::Result<aya_obj::generated::bpf_prog_info> {
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
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
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
