//! containerd-shim-cocoon-v2: the containerd shim v2 for runtime `io.containerd.cocoon.v2`.
//!
//! containerd runs it with `start`, `delete` or as the daemon; the containerd-shim crate
//! parses those flags. `-info` answers containerd's introspection (`info.rs`).
//! `containerd-shim-cocoon-v2 check` is for people: it boots a pod VM from the configuration,
//! prints the guest details next to the host's, and stops the VM.

use anyhow::{bail, Context, Result};
use vmm_driver::{Config, VmSpec};

use cocoon_shim::info::RUNTIME_NAME as RUNTIME;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The volume helper enters a mount namespace, which only a single-threaded process may:
    // it runs before the runtime starts any thread.
    if args.first().map(String::as_str) == Some(cocoon_shim::volumes::ns::HELPER_ARG) {
        return Ok(cocoon_shim::volumes::ns::helper_main(&args[1..])?);
    }
    // The pod's guard needs no runtime: it waits on a pipe and cleans up if the shim dies.
    if args.first().map(String::as_str) == Some(cocoon_shim::guard::GUARD_ARG) {
        return Ok(cocoon_shim::guard::guard_main(&args[1..])?);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(run(args))
}

async fn run(args: Vec<String>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("check") => {
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
                .init();
            check(args.iter().any(|a| a == "--console")).await
        }
        // containerd's introspection (2.x): the runtime's features, before any shim flags
        // are parsed (the containerd-shim crate would ask for a TTRPC address first).
        Some("-info") => {
            use std::io::{Read, Write};
            // The runtime's options arrive on stdin; none of them changes the answer.
            let mut options = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut options);
            std::io::stdout().write_all(&cocoon_shim::info::runtime_info())?;
            Ok(())
        }
        Some("--version") => {
            println!(
                "containerd-shim-cocoon-v2 {} ({RUNTIME})",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Some("help" | "--help") => bail!(
            "usage: containerd-shim-cocoon-v2 check [--console]   boot a pod VM and report on it\n\
             containerd starts this binary itself for runtime {RUNTIME}"
        ),
        _ => {
            containerd_shim::asynchronous::run::<cocoon_shim::service::CocoonShim>(RUNTIME, None)
                .await;
            // Exit now rather than wait for blocking threads: one may still sit in the open()
            // of a FIFO whose other end containerd never opened.
            std::process::exit(0)
        }
    }
}

/// Where the VM template of a default-sized pod stands.
async fn template_state(cfg: &Config) -> String {
    use vmm_driver::config::{Hypervisor, TemplateMode};
    match (cfg.vm.template, cfg.hypervisor) {
        (TemplateMode::Off, _) => "off (vm.template = \"off\"): pods boot the kernel".into(),
        (_, Hypervisor::CloudHypervisor) => {
            "not used with cloud-hypervisor: pods boot the kernel".into()
        }
        (TemplateMode::Auto, Hypervisor::Qemu) => {
            match vmm_driver::qemu::default_identity(cfg).await {
                Ok(id) => id.describe(),
                Err(e) => format!("unknown: {e}"),
            }
        }
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
    if cfg.hypervisor == vmm_driver::config::Hypervisor::Qemu {
        let (chosen, why) =
            vmm_driver::accel::choose(cfg.accel, &vmm_driver::accel::HostFacts::probe())?;
        println!("accel       : {chosen:?} ({why})");
        if let Some(notice) = chosen.security_notice() {
            println!("WARNING     : {notice}");
        }
    }
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
    println!("template    : {}", template_state(&cfg).await);
    println!(
        "boot        : VMM up {:?}, agent connected {:?}, agent answered {:?} (guest uptime at agent ready {} ms)",
        t.vmm_started, t.agent_connected, t.agent_ready, d.agent_ready_uptime_ms
    );
    Ok(())
}
