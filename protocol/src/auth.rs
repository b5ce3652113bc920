//! Who may talk to the agent. Every connection the host opens to a guest port (the API, stdio,
//! port-forward, the DNS relay) starts with the pod's key: [`KEY_LEN`] random bytes the host
//! made for this VM and handed to the guest as a QEMU fw_cfg item ([`KEY_FW_CFG`]), or as
//! [`KEY_FILE`] at the top of the virtio-fs share where the VMM has no fw_cfg; only root on
//! the host (a 0700 run directory) and this guest can read either. With kernel
//! vsock any host user can connect to any guest's ports, and a context id is easy to find; the
//! key is what keeps them out. The agent drops a connection whose first bytes are not the key.

use std::io::Read;

/// Length of a pod's key in bytes.
pub const KEY_LEN: usize = 32;
/// The key's file name at the top of the share (the guest reads it at
/// `<GUEST_SHARE>/<KEY_FILE>`; the host writes it below its host-only share directory), for a
/// VMM without fw_cfg (Cloud Hypervisor).
pub const KEY_FILE: &str = ".agent-key";
/// The key's QEMU fw_cfg item: a pod needs no share to learn its key. QEMU reads the file
/// while it is still root; the guest's `qemu_fw_cfg` module shows it at [`KEY_FW_CFG_PATH`],
/// readable by guest root only. A VM restored from a template reads the restoring QEMU's
/// item (fw_cfg items are not part of a saved state), which is why the template has one of
/// the same name and size.
pub const KEY_FW_CFG: &str = "opt/io.cocoon/agent-key";
/// Where the guest reads [`KEY_FW_CFG`].
pub const KEY_FW_CFG_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/io.cocoon/agent-key/raw";

/// A pod's key. Its `Debug` shows nothing of it: keys must not reach logs.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey([u8; KEY_LEN]);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl AgentKey {
    /// A fresh key from the kernel's CSPRNG.
    pub fn generate() -> std::io::Result<AgentKey> {
        let mut k = [0u8; KEY_LEN];
        random_fill(&mut k)?;
        Ok(AgentKey(k))
    }

    /// A key from exactly [`KEY_LEN`] bytes (a key file's content).
    pub fn from_bytes(b: &[u8]) -> Option<AgentKey> {
        Some(AgentKey(b.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Compares in time that does not depend on where the bytes first differ, so a peer can't
    /// learn the key a byte at a time.
    pub fn matches(&self, presented: &[u8]) -> bool {
        if presented.len() != KEY_LEN {
            return false;
        }
        self.0
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_key_matches() {
        let k = AgentKey::generate().unwrap();
        let other = AgentKey::generate().unwrap();
        assert_ne!(k, other, "two fresh keys are equal");
        assert!(k.matches(k.as_bytes()));
        assert!(!k.matches(other.as_bytes()));
        assert!(!k.matches(&k.as_bytes()[..KEY_LEN - 1]));
        let mut flipped = *k.as_bytes();
        flipped[KEY_LEN - 1] ^= 1;
        assert!(!k.matches(&flipped));
        assert_eq!(AgentKey::from_bytes(k.as_bytes()), Some(k.clone()));
        assert_eq!(AgentKey::from_bytes(&[0; 3]), None);
        assert_eq!(format!("{k:?}"), "AgentKey(..)");
    }
}

/// Fills `buf` from the host kernel's RNG (`/dev/urandom`): keys, the guest's entropy
/// (`RefreshRequest`), random ids.
pub fn random_fill(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}
