//! What every backend boots: the guest image check and the guest kernel command line.
//!
//! Both backends boot the same kernel and initramfs with the same command line, so both live
//! here once; a backend only decides how to hand them to its hypervisor.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::VmSpec;

/// The guest kernel command line: Cocoon's own, then the pod's, then the config's extras.
/// Each of Cocoon's boot-time parameters was measured (guest uptime at agent ready, TCG,
/// alternating boots; docs/performance.md):
/// - `quiet`: every console byte is emulated under TCG.
/// - `cryptomgr.notests`: the kernel otherwise self-tests every crypto algorithm it registers
///   (~250 ms under TCG); the algorithms are the packaged kernel's, tested upstream.
/// - `noreplace-smp`: a 1-vCPU guest would otherwise patch every SMP lock prefix to its UP
///   form at boot, and under TCG rewriting kernel text invalidates translated code (~130 ms).
pub fn kernel_cmdline(cfg: &Config, spec: &VmSpec) -> String {
    let log = format!("cocoon.log={}", cfg.log_level);
    let mut parts = vec![
        "console=ttyS0",
        "reboot=k",
        "panic=-1",
        "cryptomgr.notests",
        "noreplace-smp",
        // Layer disks are added one LUN at a time by the controller's event; a scan of the
        // empty controller at boot would only probe 256 absent targets (`qemu/disks.rs`).
        "scsi_mod.scan=manual",
    ];
    if !cfg.debug_console {
        parts.push("quiet");
    }
    // The agent serves `cocoon exec` only in a VM booted with it: a host whose config turns
    // the console off can't reach it in its VMs, whatever a shim asks.
    if cfg.debug.console {
        parts.push(cocoon_protocol::DEBUG_CONSOLE_PARAM);
    }
    parts.push(&log);
    parts.extend(
        spec.kernel_params
            .iter()
            .map(String::as_str)
            .chain([cfg.kernel_params.as_str()])
            .filter(|s| !s.is_empty()),
    );
    parts.join(" ")
}

/// Both the kernel and the initramfs must be there before any process starts.
pub(crate) fn check_image(cfg: &Config) -> Result<()> {
    for (what, path) in [
        ("guest kernel", &cfg.kernel),
        ("guest initramfs", &cfg.initramfs),
    ] {
        if !path.is_file() {
            return Err(Error::ImageMissing {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_quiet_unless_debugging() {
        let mut cfg = Config {
            kernel_params: "x=1".into(),
            ..Config::default()
        };
        let mut spec = VmSpec::from_config(&cfg, "a");
        spec.kernel_params = vec!["p=2".into(), String::new()];
        assert_eq!(
            kernel_cmdline(&cfg, &spec),
            "console=ttyS0 reboot=k panic=-1 cryptomgr.notests noreplace-smp scsi_mod.scan=manual quiet cocoon.log=info p=2 x=1"
        );
        cfg.debug_console = true;
        assert!(!kernel_cmdline(&cfg, &spec).contains("quiet"));
        assert!(!kernel_cmdline(&cfg, &spec).contains("cocoon.debug_console"));
        cfg.debug.console = true;
        assert!(kernel_cmdline(&cfg, &spec).contains(" cocoon.debug_console=1 "));
    }
}
