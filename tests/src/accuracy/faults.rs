//! Fault helpers: a wall-clock jump that always restores the clock, and
//! damage to a state file.

use std::{
    fs::OpenOptions,
    os::unix::fs::FileExt,
    path::Path,
    time::{Duration, Instant},
};

fn realtime() -> libc::timespec {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes into ts.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) }, 0);
    ts
}

fn set_realtime(ns: i128) {
    let ts = libc::timespec { tv_sec: (ns.div_euclid(1_000_000_000)) as libc::time_t, tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long };
    // SAFETY: reads ts.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    assert_eq!(rc, 0, "clock_settime: {}", std::io::Error::last_os_error());
}

fn ns(ts: libc::timespec) -> i128 {
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Moves the wall clock (CLOCK_REALTIME, what `date -s` sets) by `shift`
/// seconds; on `restore` or drop it is set back to where it would be had
/// it never moved (measured on the monotonic clock), to within a few µs.
/// Keep the jumped window short: the clock is shared with everything else
/// on the machine.
pub struct ClockJump {
    real0: i128,
    mono0: Instant,
    shift_s: i64,
    restored: bool,
}

impl ClockJump {
    pub fn shift(shift_s: i64) -> Self {
        let mono0 = Instant::now();
        let real0 = ns(realtime());
        set_realtime(real0 + shift_s as i128 * 1_000_000_000);
        eprintln!("clock: moved by {shift_s} s");
        Self { real0, mono0, shift_s, restored: false }
    }

    fn put_back(&mut self) {
        if !self.restored {
            self.restored = true;
            set_realtime(self.real0 + self.mono0.elapsed().as_nanos() as i128);
            let err = ns(realtime()) - (self.real0 + self.mono0.elapsed().as_nanos() as i128);
            eprintln!("clock: restored after a {} s jump (residual {} µs)", self.shift_s, err / 1000);
            assert!(err.abs() < Duration::from_millis(50).as_nanos() as i128, "clock restore off by {err} ns");
        }
    }

    pub fn restore(mut self) {
        self.put_back();
    }
}

impl Drop for ClockJump {
    fn drop(&mut self) {
        if !self.restored {
            self.restored = true;
            set_realtime(self.real0 + self.mono0.elapsed().as_nanos() as i128);
        }
    }
}

/// Inverts `len` bytes in the middle of a file (at least one byte).
pub fn flip_middle(path: &Path, len: u64) -> (u64, u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = f.metadata().unwrap().len();
    assert!(size > 0, "{} is empty", path.display());
    let len = len.min(size).max(1);
    let at = (size - len) / 2;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, at).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    f.write_all_at(&buf, at).unwrap();
    f.sync_all().unwrap();
    (at, len)
}

/// Cuts a file to half its size.
pub fn truncate_half(path: &Path) -> u64 {
    let f = OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let half = f.metadata().unwrap().len() / 2;
    f.set_len(half).unwrap();
    f.sync_all().unwrap();
    half
}
