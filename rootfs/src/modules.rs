//! Resolving which kernel modules to ship and the order to load them in, from `modules.dep`.
//!
//! Order matters: `virtio` before `virtio_ring` fails with "Unknown symbol". Resolving from
//! modules.dep (written by `depmod`) keeps this right across kernel updates.

use std::collections::{BTreeMap, HashSet};

use crate::{Error, Result};

/// modules.dep: module path -> the paths it depends on.
#[derive(Debug, Default, Clone)]
pub struct ModulesDep {
    deps: BTreeMap<String, Vec<String>>,
}

/// `kernel/net/vmw_vsock/vsock.ko` -> `vsock`; modprobe treats `-` and `_` alike.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

impl ModulesDep {
    pub fn parse(text: &str) -> Result<ModulesDep> {
        let mut deps = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, rest) = line.split_once(':').ok_or_else(|| Error::BadModulesDep {
                line: i + 1,
                message: format!("no `:` in {line:?}"),
            })?;
            let list = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(module.trim().to_owned(), list);
        }
        Ok(ModulesDep { deps })
    }

    fn path_of(&self, name: &str) -> Result<&str> {
        let want = name.replace('-', "_");
        self.deps
            .keys()
            .find(|p| module_name(p) == want)
            .map(String::as_str)
            .ok_or_else(|| Error::UnknownModule(name.to_owned()))
    }

    /// Whether the module at path `module` needs the one at `other`, directly or not
    /// (modules.dep lists both kinds).
    pub fn needs(&self, module: &str, other: &str) -> bool {
        self.deps
            .get(module)
            .is_some_and(|d| d.iter().any(|x| x == other))
    }

    /// The paths of `wanted` and everything they need, each after its dependencies.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>> {
        let mut order = vec![];
        let mut done = HashSet::new();
        let mut visiting = HashSet::new();
        for name in wanted {
            let path = self.path_of(name)?.to_owned();
            self.visit(&path, &mut done, &mut visiting, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        path: &str,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if !visiting.insert(path.to_owned()) {
            return Err(Error::Cycle(module_name(path)));
        }
        let deps = self
            .deps
            .get(path)
            .ok_or_else(|| Error::UnknownModule(path.to_owned()))?;
        // modules.dep lists indirect dependencies too, in no guaranteed order; recursing on
        // each one sorts them.
        for d in deps {
            self.visit(d, done, visiting, order)?;
        }
        visiting.remove(path);
        done.insert(path.to_owned());
        order.push(path.to_owned());
        Ok(())
    }
}

/// Trailer the kernel's sign-file appends to a signed module.
const SIG_MARKER: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len.
const SIG_INFO_LEN: usize = 12;

/// Drops a module's appended signature, if it has one.
///
/// The guest kernel would otherwise verify an RSA signature per module at every boot, which
/// under TCG is a large share of module loading. The modules come from a package that apt
/// already verified, and the guest kernel does not enforce signatures, so the check buys
/// nothing here. Returns the module unchanged when it is unsigned or the trailer is malformed.
pub fn strip_signature(module: &[u8]) -> &[u8] {
    let Some(body) = module.strip_suffix(SIG_MARKER) else {
        return module;
    };
    let Some(info_at) = body.len().checked_sub(SIG_INFO_LEN) else {
        return module;
    };
    let info = &body[info_at..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = usize::from(info[3]) + usize::from(info[4]) + sig_len;
    match info_at.checked_sub(extra) {
        Some(end) => &module[..end],
        None => module,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_stripped_exactly() {
        let mut m = b"\x7fELF...module body".to_vec();
        let body_len = m.len();
        m.extend_from_slice(&[0xAB; 300]); // PKCS#7 blob
        m.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
        m.extend_from_slice(&300u32.to_be_bytes());
        m.extend_from_slice(SIG_MARKER);
        assert_eq!(strip_signature(&m), &m[..body_len]);
        assert_eq!(
            strip_signature(&m[..body_len]),
            &m[..body_len],
            "unsigned stays as is"
        );
        let mut bogus = vec![0u8; 4];
        bogus.extend_from_slice(SIG_MARKER);
        assert_eq!(
            strip_signature(&bogus),
            bogus.as_slice(),
            "malformed stays as is"
        );
    }

    /// The real lines for the guest's modules, from Debian's 6.1 cloud kernel after depmod.
    const DEP: &str = "\
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/dummy.ko:
";

    fn names(order: &[String]) -> Vec<String> {
        order.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn guest_modules_resolve_in_a_loadable_order() {
        let dep = ModulesDep::parse(DEP).unwrap();
        let order = dep
            .load_order(&[
                "virtio_pci",
                "vmw_vsock_virtio_transport",
                "virtiofs",
                "overlay",
            ])
            .unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "fuse",
                "virtiofs",
                "overlay"
            ]
        );
        // Every module comes after each of its dependencies, and only once.
        for (i, p) in order.iter().enumerate() {
            for d in &dep.deps[p] {
                assert!(
                    order[..i].contains(d),
                    "{p} loaded before its dependency {d}"
                );
            }
        }
        assert!(!names(&order).contains(&"dummy".to_owned()));
    }

    #[test]
    fn names_accept_dashes_and_report_unknowns() {
        let dep = ModulesDep::parse(DEP).unwrap();
        assert_eq!(
            names(&dep.load_order(&["virtio-ring"]).unwrap()),
            ["virtio_ring"]
        );
        let err = dep.load_order(&["9p"]).unwrap_err().to_string();
        assert!(
            err.contains("`9p`") && err.contains("modules.builtin"),
            "{err}"
        );
    }

    #[test]
    fn cycles_and_garbage_are_errors() {
        let dep = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        assert!(matches!(dep.load_order(&["a"]), Err(Error::Cycle(_))));
        assert!(matches!(
            ModulesDep::parse("no colon here\n"),
            Err(Error::BadModulesDep { line: 1, .. })
        ));
    }
}
