//! Shared support for the integration tests in `tests/tests/` and the bench binaries. Every
//! test starts at [`gate()`], which skips it with the reason where this host can't run it and
//! makes VM tests take turns; the other modules hold what the tests build on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

pub mod agent_calls;
pub mod bench_chart;
pub mod config;
pub mod conformance;
pub mod containerd;
pub mod cri;
pub mod cri_bench;
pub mod docker;
pub mod docker_bench;
pub mod fuse_client;
pub mod gate;
pub mod layer_bench;
pub mod leaks;
pub mod oci;
pub mod paths;
pub mod phases;
pub mod pod;
pub mod portforward;
pub mod stats;
pub mod template_bench;
pub mod virtiofsd;
pub mod volume_bench;

pub use config::{backend_config, test_config, test_hypervisor, write_cocoon_toml};
pub use gate::{gate, Gate, Need};
pub use leaks::{
    assert_no_leaks, leftovers, pids_mentioning, pids_named, processes_mentioning, signal_all,
};
pub use oci::{busybox_rootfs, oci_spec};
pub use paths::{busybox, cocoon_cli, image_dir, shim_dir};
pub use pod::{ctx, streams, Io, Pod};
