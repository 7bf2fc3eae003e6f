//! The changed-block tracker's node agent, as a library: the binary and the
//! privileged tests drive the same code.
//!
//! Data path, one module per stage: [`capture`] (kernel programs, rings,
//! loss) → [`changes`] (per-device-instance change sets, gaps) →
//! [`changelog`] (time-segmented, persisted segments, snapshot cut windows)
//! → [`query`] answers → [`service`] (CSI SnapshotMetadata over gRPC).
//! [`tracker`] and [`recorder`] run the loop; [`admin`] takes snapshot
//! begin/commit; [`devices`] and [`volumes`] know sysfs, [`mapping`] what
//! re-maps a disk's sectors. State that must survive a crash goes through
//! [`journal`] inside a [`statedir`].

pub mod admin;
pub mod canary;
pub mod capture;
pub mod changelog;
pub mod changes;
pub mod devices;
pub mod journal;
pub mod mapping;
pub mod names;
pub mod query;
pub mod recorder;
pub mod service;
pub mod statedir;
pub mod status;
pub mod tracker;
pub mod volumes;
