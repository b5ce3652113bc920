//! The Cocoon configs the tests run with: the default config pointed at the installed guest
//! image, the hypervisor the shim-level suites select (COCOON_TEST_HYPERVISOR), and the same
//! settings written as the `cocoon.toml` a shim reads.

use std::path::Path;

use vmm_driver::config::{Hypervisor, TemplateMode};
use vmm_driver::Config;

use crate::paths::image_dir;

/// The default config with the installed image and runtime state in `state`, unchecked.
fn image_config(state: &Path) -> Config {
    let img = image_dir();
    Config {
        kernel: img.join("vmlinuz"),
        initramfs: img.join("initramfs.img"),
        state_dir: state.to_owned(),
        vsock: test_vsock(),
        vm: vmm_driver::config::VmDefaults {
            template: test_template(),
            ..Config::default().vm
        },
        ..Config::default()
    }
}

/// The agent's channel: the default, or `COCOON_TEST_VSOCK` (`make test` runs some suites on
/// hybrid vsock too).
pub fn test_vsock() -> vmm_driver::config::VsockMode {
    match std::env::var("COCOON_TEST_VSOCK").as_deref() {
        Err(_) | Ok("" | "auto") => vmm_driver::config::VsockMode::Auto,
        Ok("hybrid") => vmm_driver::config::VsockMode::Hybrid,
        Ok("serial") => vmm_driver::config::VsockMode::Serial,
        Ok("kernel") => vmm_driver::config::VsockMode::Kernel,
        Ok(other) => panic!("COCOON_TEST_VSOCK={other}: use auto, hybrid, serial or kernel"),
    }
}

/// How the suites start pods: `COCOON_TEST_TEMPLATE=auto` (the default: from a VM template)
/// or `off` (a kernel boot each), so that both paths can run every suite.
pub fn test_template() -> TemplateMode {
    match std::env::var("COCOON_TEST_TEMPLATE").as_deref() {
        Err(_) | Ok("" | "auto") => TemplateMode::Auto,
        Ok("off") => TemplateMode::Off,
        Ok(other) => panic!("COCOON_TEST_TEMPLATE={other}: use auto or off"),
    }
}

/// The default config, with the installed image and runtime state in `state`.
pub fn test_config(state: &Path) -> Config {
    let cfg = image_config(state);
    for p in [&cfg.kernel, &cfg.initramfs] {
        assert!(
            p.is_file(),
            "{} is missing: run `make image` first",
            p.display()
        );
    }
    cfg
}

/// The hypervisor the shim-level tests (containers.rs, ctr.rs) run with:
/// `COCOON_TEST_HYPERVISOR=qemu` (the default) or `cloud-hypervisor`.
pub fn test_hypervisor() -> Hypervisor {
    match std::env::var("COCOON_TEST_HYPERVISOR").as_deref() {
        Err(_) | Ok("" | "qemu") => Hypervisor::Qemu,
        Ok("cloud-hypervisor") => Hypervisor::CloudHypervisor,
        Ok(other) => panic!("COCOON_TEST_HYPERVISOR={other}: use qemu or cloud-hypervisor"),
    }
}

/// [`test_config`] with the hypervisor chosen by [`test_hypervisor`].
pub fn backend_config(state: &Path) -> Config {
    Config {
        hypervisor: test_hypervisor(),
        ..test_config(state)
    }
}

/// Writes the `cocoon.toml` a shim reads (COCOON_CONFIG): `hypervisor`, runtime state in
/// `state_dir`, and the installed image.
/// `COCOON_TEST_GUEST_LOG=debug` raises the guest agent's log level (in `console.log`).
pub fn write_cocoon_toml(path: &Path, hypervisor: Hypervisor, state_dir: &Path) {
    let cfg = image_config(state_dir);
    std::fs::write(
        path,
        format!(
            "hypervisor = \"{}\"\nstate_dir = \"{}\"\nkernel = \"{}\"\ninitramfs = \"{}\"\n",
            match hypervisor {
                Hypervisor::Qemu => "qemu",
                Hypervisor::CloudHypervisor => "cloud-hypervisor",
            },
            cfg.state_dir.display(),
            cfg.kernel.display(),
            cfg.initramfs.display()
        ) + match cfg.vm.template {
            // A dotted key, so that lines appended after it stay top-level.
            TemplateMode::Off => "vm.template = \"off\"\n",
            TemplateMode::Auto => "",
        } + &std::env::var("COCOON_TEST_GUEST_LOG")
            .map(|level| format!("log_level = \"{level}\"\n"))
            .unwrap_or_default()
            // The agent's channel ([`test_vsock`]): `make test` runs some suites on hybrid
            // vsock too. A JSON string is a TOML string.
            + &format!(
                "vsock = {}\n",
                serde_json::to_string(&cfg.vsock).unwrap_or_default()
            ),
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cocoon_toml_a_shim_reads_holds_the_test_settings() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        for hv in [Hypervisor::Qemu, Hypervisor::CloudHypervisor] {
            let path = dir.path().join("cocoon.toml");
            write_cocoon_toml(&path, hv, &state);
            let read = Config::from_file(&path).unwrap();
            let want = image_config(&state);
            assert_eq!(read.hypervisor, hv);
            assert_eq!(read.state_dir, want.state_dir);
            assert_eq!(read.kernel, want.kernel);
            assert_eq!(read.initramfs, want.initramfs);
            assert_eq!(read.vm.template, want.vm.template);
            assert_eq!(read.vsock, want.vsock);
        }
    }
}
