//! The one gate every integration test passes first. It decides whether the test can run on
//! this host, printing `SKIPPED <test>: <reason>` where it can't, and it makes the tests that
//! start a VM take turns on the VM lock. Nothing else decides a skip or holds that lock.
//!
//! What `make setup` and `make image` install (QEMU, the helper daemons, busybox, containerd,
//! the guest image) is not a need: a test that lacks one fails, saying which make target to run.

use std::path::Path;

use tokio::sync::{Mutex, MutexGuard};
use vmm_driver::config::Hypervisor;
use vmm_driver::Config;

use crate::config::test_hypervisor;

/// VM tests take turns: concurrent TCG guests on a 2-core machine distort each other's timings.
static VM_LOCK: Mutex<()> = Mutex::const_new(());

/// Something a test needs that a host set up with `make setup` may still lack. Every need
/// starts a VMM, so a test with any need also waits for its turn on the VM lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Boots a guest with this hypervisor. QEMU always can (TCG); Cloud Hypervisor needs a
    /// usable KVM and a `cloud-hypervisor` on PATH.
    Guest(Hypervisor),
    /// Starts cloud-hypervisor's VMM and drives its API without booting to the agent: needs a
    /// `cloud-hypervisor` on PATH and `/dev/kvm` to exist (not to work).
    ChVmm,
}

impl Need {
    /// A guest booted with the hypervisor the shim-level suites run with (COCOON_TEST_HYPERVISOR).
    pub fn selected_guest() -> Need {
        Need::Guest(test_hypervisor())
    }

    /// Why this host can't meet the need; empty where it can.
    fn unmet(self) -> Vec<String> {
        match self {
            Need::Guest(hv) => unavailable(hv)
                .map(|why| format!("{hv:?} can't boot a guest here: {why}"))
                .into_iter()
                .collect(),
            Need::ChVmm => {
                let mut why: Vec<String> = ch_binary_missing().into_iter().collect();
                if !Path::new("/dev/kvm").exists() {
                    why.push("cloud-hypervisor's VMM does not start without /dev/kvm".into());
                }
                why
            }
        }
    }
}

/// Why `hv` can't boot a guest on this host, or None when it can. QEMU always can (TCG).
fn unavailable(hv: Hypervisor) -> Option<String> {
    match hv {
        Hypervisor::Qemu => None,
        Hypervisor::CloudHypervisor => {
            let cfg = Config {
                hypervisor: hv,
                ..Config::default()
            };
            if let Err(e) = vmm_driver::cloud_hypervisor::check_host(
                &cfg,
                &vmm_driver::accel::HostFacts::probe(),
            ) {
                return Some(e.to_string());
            }
            ch_binary_missing()
        }
    }
}

/// Why there is no `cloud-hypervisor` to run here, or None when one is on PATH.
fn ch_binary_missing() -> Option<String> {
    which::which(vmm_driver::config::BinaryPaths::default().cloud_hypervisor)
        .is_err()
        .then(|| "cloud-hypervisor is not on PATH (it has no Debian package; build it from its source and put it on PATH)".into())
}

/// A test's pass through [`gate`]: while it lives, a test with needs holds its turn on the
/// VM lock. Keep it until the test's VMs are gone (`let Some(_gate) = …`).
#[derive(Debug)]
pub struct Gate {
    needs: Vec<Need>,
    _turn: Option<MutexGuard<'static, ()>>,
}

impl Gate {
    /// What the test said it needs.
    pub fn needs(&self) -> &[Need] {
        &self.needs
    }
}

/// The test that called: libtest runs each test on a thread named after it.
fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}

/// The start of every integration test: `let Some(_gate) = gate(&[needs]).await else {
/// return };`, first thing in the test, on its own thread (that thread's name is the test's).
/// Where this host can't meet a need, prints `SKIPPED <test>: <reasons>` and returns None, so
/// the test ends as skipped and says why; otherwise waits for the test's turn on the VM lock
/// (when it has any need: each starts a VMM) and returns the pass.
pub async fn gate(needs: &[Need]) -> Option<Gate> {
    let mut why: Vec<String> = vec![];
    for reason in needs.iter().flat_map(|n| n.unmet()) {
        if !why.contains(&reason) {
            why.push(reason);
        }
    }
    if !why.is_empty() {
        println!("SKIPPED {}: {}", current_test(), why.join("; "));
        return None;
    }
    let turn = if needs.is_empty() {
        None
    } else {
        Some(VM_LOCK.lock().await)
    };
    Some(Gate {
        needs: needs.to_vec(),
        _turn: turn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the lock is process-wide, so its checks must not run beside each other.
    #[tokio::test]
    async fn a_test_with_needs_holds_the_vm_lock_and_one_without_does_not() {
        let free = gate(&[]).await.unwrap();
        assert!(free.needs().is_empty());
        assert!(
            VM_LOCK.try_lock().is_ok(),
            "a gate without needs took the lock"
        );

        let vm = gate(&[Need::Guest(Hypervisor::Qemu)]).await.unwrap();
        assert_eq!(vm.needs(), [Need::Guest(Hypervisor::Qemu)]);
        assert!(
            VM_LOCK.try_lock().is_err(),
            "a VM test ran without its turn"
        );
        drop(vm);
        assert!(VM_LOCK.try_lock().is_ok(), "the turn outlived its gate");

        // Where a need is unmet (no cloud-hypervisor here, say), the gate says no, takes no turn.
        if !Need::ChVmm.unmet().is_empty() {
            assert!(gate(&[Need::ChVmm, Need::Guest(Hypervisor::Qemu)])
                .await
                .is_none());
            assert!(VM_LOCK.try_lock().is_ok(), "a skipped test took a turn");
        }
    }

    #[test]
    fn qemu_is_always_there_and_reasons_name_the_hypervisor() {
        assert!(Need::Guest(Hypervisor::Qemu).unmet().is_empty());
        for why in Need::Guest(Hypervisor::CloudHypervisor).unmet() {
            assert!(
                why.starts_with("CloudHypervisor can't boot a guest here: "),
                "{why}"
            );
        }
    }

    #[test]
    fn the_test_name_is_the_thread_libtest_runs_it_on() {
        assert_eq!(
            current_test(),
            "gate::tests::the_test_name_is_the_thread_libtest_runs_it_on"
        );
    }
}
