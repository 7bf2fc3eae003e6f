//! Waiting until every capture program that may be running has finished,
//! so that a drain after the wait sees every event submitted before it.
//!
//! Tracepoint programs run inside an RCU read-side critical section, so
//! any wait for an RCU grace period outlasts every run in progress. Two
//! ways to get one from user space:
//!
//! - `membarrier(MEMBARRIER_CMD_GLOBAL)`, which waits for one; but kernels
//!   booted with `nohz_full` refuse it (EINVAL);
//! - updating an element of a BPF map-of-maps, after which the kernel waits
//!   for a grace period itself so that no program still uses the old inner
//!   map (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c). The agent
//!   keeps a one-slot map-of-maps of its own for that.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

#[derive(Debug)]
pub enum ProgramBarrier {
    Membarrier,
    /// A one-slot array of maps and the map it holds.
    MapUpdate { outer: OwnedFd, inner: OwnedFd },
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot wait for running eBPF programs: membarrier(MEMBARRIER_CMD_GLOBAL) failed ({membarrier}) and so did a \
     BPF map-of-maps update ({fallback}); without one of them a seal cannot prove it holds every write before its cut"
)]
pub struct BarrierError {
    pub membarrier: io::Error,
    pub fallback: io::Error,
}

const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The leading fields of `union bpf_attr` for `BPF_MAP_CREATE`; the kernel
/// zero-fills what a shorter attribute leaves out.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of `union bpf_attr` for `cmd`,
    // valid for the size passed; the kernel only reads it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn create_map(attr: &MapCreateAttr) -> io::Result<OwnedFd> {
    let fd = bpf(BPF_MAP_CREATE, attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn membarrier() -> io::Result<()> {
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ProgramBarrier {
    /// `membarrier` if the kernel allows it, else a map-of-maps update.
    pub fn new() -> Result<Self, BarrierError> {
        Self::choose(membarrier(), Self::map_update)
    }

    fn choose(
        membarrier: io::Result<()>,
        fallback: impl FnOnce() -> io::Result<Self>,
    ) -> Result<Self, BarrierError> {
        match membarrier {
            Ok(()) => Ok(Self::Membarrier),
            Err(refused) => {
                let reason = refused.to_string();
                let barrier = fallback().map_err(|fallback| BarrierError { membarrier: refused, fallback })?;
                tracing::info!(membarrier = %reason, "membarrier refused (a nohz_full kernel?): seals wait for running programs through a BPF map-of-maps update");
                Ok(barrier)
            }
        }
    }

    /// The map-of-maps way (needs CAP_BPF or root, like the capture).
    pub fn map_update() -> io::Result<Self> {
        let inner = create_map(&MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            ..Default::default()
        })?;
        let outer = create_map(&MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            ..Default::default()
        })?;
        let barrier = Self::MapUpdate { outer, inner };
        barrier.wait()?;
        Ok(barrier)
    }

    /// Returns once every program run that began before the call has ended.
    pub fn wait(&self) -> io::Result<()> {
        match self {
            Self::Membarrier => membarrier(),
            Self::MapUpdate { outer, inner } => {
                let key: u32 = 0;
                let value: u32 = inner.as_raw_fd() as u32;
                let attr = MapUpdateAttr {
                    map_fd: outer.as_raw_fd() as u32,
                    _pad: 0,
                    key: &key as *const u32 as u64,
                    value: &value as *const u32 as u64,
                    flags: 0,
                };
                bpf(BPF_MAP_UPDATE_ELEM, &attr).map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_membarrier_falls_back_or_fails_with_both_reasons() {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let chosen = ProgramBarrier::choose(Err(einval()), || Ok(ProgramBarrier::Membarrier)).unwrap();
        assert!(matches!(chosen, ProgramBarrier::Membarrier), "the fallback is used");
        let failed = ProgramBarrier::choose(Err(einval()), || Err(io::Error::from_raw_os_error(libc::EPERM)));
        let message = failed.unwrap_err().to_string();
        assert!(message.contains("membarrier") && message.contains("map-of-maps"), "{message}");
        assert!(matches!(ProgramBarrier::choose(Ok(()), || unreachable!()), Ok(ProgramBarrier::Membarrier)));
    }
}
