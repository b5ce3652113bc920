//! Shared helpers for the integration tests: configs pointing at the installed guest image,
//! a lock so VM tests don't compete for the two cores, and leak checks.

use std::path::{Path, PathBuf};

use vmm_driver::Config;

/// VM tests take turns: concurrent TCG guests on a 2-core machine distort each other's timings.
pub static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where `make image` installed the guest image (override with COCOON_IMAGE_DIR).
pub fn image_dir() -> PathBuf {
    std::env::var_os("COCOON_IMAGE_DIR").map_or_else(
        || PathBuf::from(vmm_driver::config::DEFAULT_IMAGE_DIR),
        PathBuf::from,
    )
}

/// The default config, with the installed image and runtime state in `state`.
pub fn test_config(state: &Path) -> Config {
    let img = image_dir();
    let cfg = Config {
        kernel: img.join("vmlinuz"),
        initramfs: img.join("initramfs.img"),
        state_dir: state.to_owned(),
        ..Config::default()
    };
    for p in [&cfg.kernel, &cfg.initramfs] {
        assert!(
            p.is_file(),
            "{} is missing: run `make image` first",
            p.display()
        );
    }
    cfg
}

/// Processes whose command line mentions `needle` (a per-test temp dir): anything listed after
/// a VM stopped is a leak.
pub fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(&needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Everything left under `dir`, recursively: after a stop there must be nothing.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Asserts that nothing of a VM under `state` survives: no process, no file, no directory.
pub fn assert_no_leaks(state: &Path) {
    let procs = processes_mentioning(state);
    assert!(procs.is_empty(), "processes left behind: {procs:#?}");
    let files = leftovers(state);
    assert!(files.is_empty(), "files left behind: {files:#?}");
}
