//! cocoon-agent: PID 1 of every Cocoon guest.

mod init;
mod logger;
mod server;

use std::path::Path;

use anyhow::Context;

fn main() {
    // Nothing may make PID 1 exit: the kernel would panic and the host would see only that.
    std::panic::set_hook(Box::new(|info| {
        log::error!("panic: {info}");
        let _ = init::power_off();
    }));
    if let Err(e) = run() {
        log::error!("fatal: {e:#}");
        eprintln!("cocoon-agent: fatal: {e:#}");
        let _ = init::power_off();
    }
}

fn run() -> anyhow::Result<()> {
    init::mount_proc()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    logger::init(&init::cmdline_param(&cmdline, "cocoon.log").unwrap_or_else(|| "info".into()));
    log::info!("cocoon-agent {} starting", env!("CARGO_PKG_VERSION"));

    // The boot-time floor: the same kernel and initramfs, stopping as soon as /init runs.
    if init::cmdline_param(&cmdline, "cocoon.mode").as_deref() == Some("bare") {
        log::info!("bare boot: init reached");
        return init::power_off();
    }

    init::mount_base()?;
    let loaded_modules = init::load_modules(Path::new(init::MODULE_ORDER))?;
    log::debug!("modules loaded: {}", loaded_modules.join(" "));
    let shared_mounted = match init::mount_shared() {
        Ok(()) => true,
        Err(e) => {
            log::warn!("no shared directory: {e:#}");
            false
        }
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async move {
        tokio::spawn(reap_orphans());
        let agent = server::Agent { shared_mounted, loaded_modules, ..Default::default() };
        let _server = server::serve(agent).await?;
        log::info!("serving the agent API on vsock port {}", cocoon_protocol::AGENT_PORT);
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// PID 1 inherits every orphan in the guest; reap them so they don't pile up as zombies.
async fn reap_orphans() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut sigchld) = signal(SignalKind::child()) else {
        log::error!("cannot watch SIGCHLD; orphans will not be reaped");
        return;
    };
    while sigchld.recv().await.is_some() {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
            log::debug!("reaped {status:?}");
        }
    }
}
