//! Chooses between KVM and TCG.
//!
//! `/dev/kvm` alone proves nothing: under a PVM host it exists, yet a standard guest kernel
//! hangs there. KVM counts as usable only with a real kvm_intel/kvm_amd module or vmx/svm flags.

use std::path::Path;

use crate::config::Accel;
use crate::error::{Error, Result};

/// What the host offers, read once so the decision itself is a pure function.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub dev_kvm: bool,
    pub kvm_intel: bool,
    pub kvm_amd: bool,
    pub cpu_virt_flags: bool,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts {
            dev_kvm: Path::new("/dev/kvm").exists(),
            kvm_intel: Path::new("/sys/module/kvm_intel").exists(),
            kvm_amd: Path::new("/sys/module/kvm_amd").exists(),
            cpu_virt_flags: cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm")),
        }
    }

    /// Why KVM can't be used, or None when it can.
    pub fn kvm_blocker(&self) -> Option<&'static str> {
        if !self.dev_kvm {
            Some("/dev/kvm does not exist")
        } else if !(self.kvm_intel || self.kvm_amd || self.cpu_virt_flags) {
            Some("/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded and the CPU shows no vmx/svm (a PVM or other paravirtual KVM cannot boot a standard guest)")
        } else {
            None
        }
    }
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Kvm,
    Tcg,
}

impl Chosen {
    /// What an operator must know about this accelerator's isolation, if anything.
    pub fn security_notice(self) -> Option<&'static str> {
        match self {
            Chosen::Kvm => None,
            Chosen::Tcg => Some(TCG_NOTICE),
        }
    }
}

/// QEMU's security documentation: only KVM (and other hardware accelerators) are in scope as a
/// virtualization boundary; TCG is not.
pub const TCG_NOTICE: &str = "TCG is not a security boundary (QEMU's security documentation): \
a guest that escapes the emulator runs as the VMM on the host; run untrusted pods on a host with KVM";

/// Resolves the configured accel against the host, and says why.
pub fn choose(wanted: Accel, host: &HostFacts) -> Result<(Chosen, String)> {
    match (wanted, host.kvm_blocker()) {
        (Accel::Tcg, _) => Ok((Chosen::Tcg, "accel = \"tcg\" in the config".into())),
        (Accel::Kvm, None) | (Accel::Auto, None) => Ok((
            Chosen::Kvm,
            "KVM with hardware virtualisation is available".into(),
        )),
        (Accel::Kvm, Some(why)) => Err(Error::KvmUnusable { reason: why.into() }),
        (Accel::Auto, Some(why)) => Ok((Chosen::Tcg, format!("falling back to TCG: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dev_kvm: bool, intel: bool, flags: bool) -> HostFacts {
        HostFacts {
            dev_kvm,
            kvm_intel: intel,
            kvm_amd: false,
            cpu_virt_flags: flags,
        }
    }

    #[test]
    fn auto_uses_kvm_only_with_real_hardware_support() {
        assert_eq!(
            choose(Accel::Auto, &host(true, true, true)).unwrap().0,
            Chosen::Kvm
        );
        assert_eq!(
            choose(Accel::Auto, &host(true, false, true)).unwrap().0,
            Chosen::Kvm
        );
        // PVM: /dev/kvm but no kvm_intel/kvm_amd and no vmx/svm.
        let (c, why) = choose(Accel::Auto, &host(true, false, false)).unwrap();
        assert_eq!(c, Chosen::Tcg);
        assert!(why.contains("PVM"), "{why}");
        assert_eq!(
            choose(Accel::Auto, &host(false, true, true)).unwrap().0,
            Chosen::Tcg
        );
    }

    #[test]
    fn forced_kvm_without_support_is_an_error() {
        let err = choose(Accel::Kvm, &host(true, false, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("accel = \"auto\""), "{err}");
    }

    #[test]
    fn tcg_is_always_honoured() {
        assert_eq!(
            choose(Accel::Tcg, &host(true, true, true)).unwrap().0,
            Chosen::Tcg
        );
    }
}
