//! Making the guest its own machine: the host's wall clock and fresh entropy, sent by the
//! host right after `Check` on every boot (`RefreshRequest`).
//!
//! A pod restored from a VM template resumes the template's memory: its wall clock is the
//! template's, and its kernel RNG state is the template's too, the same in every pod made from
//! it until the kernel reseeds on its own (up to a minute later). The Debian cloud kernel has
//! no vmgenid driver to do this at restore, so the agent does it before any container runs.
//!
//! The agent keeps no RNG of its own: where it needs random bytes it asks the kernel. (std's
//! per-thread hash keys are the template's in a restored pod; they only guard against hash
//! flooding, which a pod's own host can't mount through the agent's few maps.)

use anyhow::{Context, Result};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

/// At most this much entropy is taken from one request (the kernel's ioctl limit is 2 KiB).
pub const MAX_ENTROPY: usize = 512;

/// Sets the clock, mixes `entropy` into the kernel's pool (credited: it comes from the host's
/// own RNG) and forces the kernel RNG to reseed from it, so the next read differs from every
/// other pod of the same template.
pub fn apply(unix_time_ns: i64, entropy: &[u8]) -> Result<()> {
    if unix_time_ns > 0 {
        let ts = TimeSpec::new(unix_time_ns / 1_000_000_000, unix_time_ns % 1_000_000_000);
        clock_settime(ClockId::CLOCK_REALTIME, ts).context("set the guest clock")?;
    }
    let entropy = &entropy[..entropy.len().min(MAX_ENTROPY)];
    if !entropy.is_empty() {
        let bits = u32::try_from(entropy.len() * 8).unwrap_or(u32::MAX);
        linux_crng_ioctl::ioctl::add_randomness_to_kernel(entropy, bits)
            .context("add the host's entropy (RNDADDENTROPY)")?;
        linux_crng_ioctl::ioctl::force_kernel_crng_reseed()
            .context("reseed the kernel RNG (RNDRESEEDCRNG)")?;
    }
    Ok(())
}

/// Where the virtio balloon's driver lists the devices it drives.
const BALLOON_DRIVER: &str = "/sys/bus/virtio/drivers/virtio_balloon";

/// Unbinds the virtio balloon, whose only work here is free page reporting: in a VM whose RAM
/// is a private clone of the template's, QEMU can't discard what it is told (the file is
/// read-only to it), so every report would cost the guest work and QEMU an error line. Best
/// effort: a guest that keeps reporting is slower, not wrong.
pub fn stop_free_page_reporting() {
    let Ok(devices) = std::fs::read_dir(BALLOON_DRIVER) else {
        return;
    };
    for d in devices.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if !name.starts_with("virtio") {
            continue;
        }
        match std::fs::write(format!("{BALLOON_DRIVER}/unbind"), &name) {
            Ok(()) => log::debug!("{name}: balloon unbound (RAM is a copy-on-write clone)"),
            Err(e) => log::warn!("{name}: could not unbind the balloon: {e}"),
        }
    }
}
