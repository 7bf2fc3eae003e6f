//! The accuracy harness: end-to-end checks of `cbtctl delta` / `allocated`
//! against snapshot images, under real workloads and injected faults.
//!
//! - [`scratch`]: an xfs scratch filesystem with reflink on a loop device in
//!   /dev/shm, loop-device volumes inside it, point-in-time snapshot images
//!   (FICLONE), frozen copies and writes held in flight by `fsfreeze`;
//! - [`truth`]: image diff (the independent truth), parsed answers, the
//!   superset assertion, range application, byte comparison, the
//!   `ACCURACY` report;
//! - [`workload`]: fio, buffered writes left for later writeback,
//!   discard/write-zeroes, file churn, a seeded RNG;
//! - [`faults`]: a wall-clock jump that restores itself, state-file damage;
//! - [`agent`]: the `cbt-agent` process guard, `cbtctl`, the backend the
//!   tests use (the agent, or an oracle to check the harness itself), and
//!   the pair checks.
//!
//! See `tests/tests/delta*.rs` for the tests and
//! `tests/tests/accuracy_harness.rs` for the harness's own checks.

pub mod agent;
pub mod faults;
pub mod scratch;
pub mod truth;
pub mod workload;

pub use agent::*;
pub use faults::*;
pub use scratch::*;
pub use truth::*;
pub use workload::*;
