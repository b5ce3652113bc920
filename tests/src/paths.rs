//! Where the things the tests run come from: the guest image `make image` installed, the
//! host's busybox-static (`make setup`), and the shim binary cargo built beside the tests.

use std::path::PathBuf;

/// Where `make image` installed the guest image (override with COCOON_IMAGE_DIR).
pub fn image_dir() -> PathBuf {
    std::env::var_os("COCOON_IMAGE_DIR").map_or_else(
        || PathBuf::from(vmm_driver::config::DEFAULT_IMAGE_DIR),
        PathBuf::from,
    )
}

/// The host's busybox-static (Debian package busybox-static, installed by `make setup`).
pub fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("busybox-static is missing: run `make setup`"))
}

/// Where cargo put this build's shim binary: beside this executable (a bin target) or beside
/// its `deps/` directory (a test).
pub fn shim_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let here = exe.parent().unwrap().to_owned();
    [here.clone(), here.parent().unwrap().to_owned()]
        .into_iter()
        .find(|d| d.join("containerd-shim-cocoon-v2").is_file())
        .unwrap_or_else(|| {
            panic!("no containerd-shim-cocoon-v2 near {}: build the workspace first (`cargo test --workspace` does)", here.display())
        })
}

/// The `cocoon` command `make build` put beside the shim.
pub fn cocoon_cli() -> PathBuf {
    let p = shim_dir().join("cocoon");
    assert!(p.is_file(), "no {}: run `make build`", p.display());
    p
}
