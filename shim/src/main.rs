//! containerd-shim-cocoon-v2.
//!
//! The containerd Task service is not wired up yet (issue #4). What works today is
//! `containerd-shim-cocoon-v2 check`: boot a pod VM from the configuration, ask its agent for
//! the guest details, print them next to the host's, and stop the VM.

use anyhow::{bail, Context, Result};
use vmm_driver::{Config, VmSpec};

#[tokio::main]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check(args.iter().any(|a| a == "--console")).await,
        Some("--version" | "-v") => {
            println!("containerd-shim-cocoon-v2 {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => bail!(
            "usage: containerd-shim-cocoon-v2 check [--console]\n\
             (the containerd Task API is not implemented yet; `check` boots a pod VM and reports on it)"
        ),
    }
}

async fn check(show_console: bool) -> Result<()> {
    let cfg = Config::load().context("loading the Cocoon config")?;
    let id = format!("check-{}", std::process::id());
    let spec = VmSpec::from_config(&cfg, &id);
    let sb = cocoon_shim::sandbox::Sandbox::boot(&cfg, &spec).await?;
    let details = sb.guest_details().await;
    let t = sb.timings;
    let console = std::fs::read_to_string(sb.vm().console_log()).unwrap_or_default();
    sb.shutdown().await?;
    if show_console {
        println!("--- guest console ---\n{}--- end of console ---", console);
    }
    let d = details?;
    let host = nix::sys::utsname::uname()?;
    println!("host  kernel: {}", host.release().to_string_lossy());
    println!(
        "guest kernel: {} ({} vCPU, {} MiB)",
        d.kernel_release,
        d.online_cpus,
        d.mem_total_kib / 1024
    );
    println!(
        "shared dir  : {}",
        if d.shared_mount.is_empty() {
            "NOT mounted"
        } else {
            &d.shared_mount
        }
    );
    println!(
        "boot        : VMM up {:?}, agent connected {:?}, agent answered {:?} (guest uptime at agent ready {} ms)",
        t.vmm_started, t.agent_connected, t.agent_ready, d.agent_ready_uptime_ms
    );
    Ok(())
}
