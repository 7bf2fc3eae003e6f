//! The changed-block tracker's node agent, as a library: the binary and the
//! privileged tests drive the same code.
//!
//! Data path: [`capture`] (kernel programs, rings, loss) → [`changes`]
//! (per-device-instance change sets, in-flight writes, gaps) → later stages.
//! [`tracker`] runs the loop; [`devices`] knows sysfs.

pub mod capture;
pub mod changes;
pub mod devices;
pub mod query;
pub mod status;
pub mod tracker;
