//! cocoon-agent: PID 1 of every Cocoon guest.

mod auth;
mod containers;
mod debug_exec;
mod dns;
mod exec_seccomp;
mod forward;
mod guest_stats;
mod host_stream;
mod init;
mod logger;
mod modprobe;
mod network;
mod propagation;
mod reaper;
mod refresh;
mod runner;
mod scrub;
mod serial;
mod server;
mod spec;
mod stdio;

use std::path::Path;

use anyhow::Context;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("runner") {
        runner::main(&args[2..]);
    }
    // A debug console process on its way to its command (`debug_exec.rs`).
    if args.get(1).map(String::as_str) == Some(debug_exec::ARG) {
        std::process::exit(debug_exec::main(&args[2..]));
    }
    // The kernel's modprobe helper is the agent itself (`modprobe.rs`).
    if modprobe::is_helper_call(&args[1..]) {
        modprobe::main(&args[3..]);
    }
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
    let start_uptime_ms = logger::uptime_ms();
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
    // A VM template boots without vsock and virtio-fs devices; they are hot-plugged into each
    // pod restored from it (vmm-driver's `qemu/template.rs`).
    let template = cmdline
        .split_whitespace()
        .any(|w| w == cocoon_protocol::TEMPLATE_PARAM);
    // `[debug] console = true` on the host: DebugExec is served and busybox is kept.
    let debug_console = cmdline
        .split_whitespace()
        .any(|w| w == cocoon_protocol::DEBUG_CONSOLE_PARAM);

    // Serve as soon as vsock works; the rest of bring-up (virtio-fs, overlay) finishes in the
    // background while the host already talks to us. Calls that need it wait for `Booted`.
    // The bring-up thread pauses until the listener is bound: with one vCPU, a module load
    // running beside the bind would delay it by the whole load.
    let (vsock_up_tx, vsock_up_rx) = std::sync::mpsc::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
    let (booted_tx, booted_rx) = tokio::sync::watch::channel(None);
    std::thread::Builder::new()
        .name("bring-up".into())
        .spawn(move || {
            let state = bring_up(template, debug_console, move |m| {
                if m == init::VSOCK_TRANSPORT {
                    let _ = vsock_up_tx.send(());
                    let _ = bound_rx.recv_timeout(std::time::Duration::from_secs(1));
                } else if m == init::BALLOON {
                    init::tune_page_reporting();
                }
            });
            let _ = booted_tx.send(Some(state));
        })
        .context("start the bring-up thread")?;
    vsock_up_rx.recv().map_err(|_| {
        anyhow::anyhow!(
            "vsock never came up (module {} not loaded); see the log above",
            init::VSOCK_TRANSPORT
        )
    })?;

    log::debug!("vsock up");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    log::debug!("runtime built");
    rt.block_on(async move {
        let reaper = reaper::Reaper::default();
        tokio::spawn(reaper.clone().run());
        // Every port the host connects to admits only connections that open with the pod's key.
        let gate = auth::Gate::new(booted_rx.clone());
        // The serial channel, when the host chose it, serves the same ports (`serial.rs`).
        let (api_ready, api_ready_rx) = tokio::sync::watch::channel(false);
        let serial = serial::wanted();
        if serial {
            tokio::spawn(serial::serve(gate.clone(), api_ready_rx));
        }
        // A template guest announces itself only once bring-up finished: that is after its
        // restore, when the host has plugged in its devices and connected.
        let wait_for_bring_up = template.then(|| booted_rx.clone());
        let hub = std::sync::Arc::new(stdio::StdioHub::default());
        hub.clone().serve(&gate).await?;
        forward::serve(&gate).context("listen for port-forward connections")?;
        dns::serve(&gate).context("listen for the host's DNS relay")?;
        let manager = containers::Manager::new(reaper, hub, init::SHARED_MOUNT.into());
        let mut agent = server::Agent::new(start_uptime_ms, booted_rx, manager);
        agent.template = template;
        agent.debug_console = debug_console;
        let _server = server::serve(agent, &gate, move || {
            let _ = bound_tx.send(());
        })
        .await?;
        tokio::spawn(async move {
            if let Some(mut rx) = wait_for_bring_up {
                let _ = rx.wait_for(Option::is_some).await;
            }
            if serial {
                let _ = api_ready.send(true);
            } else {
                server::announce_ready().await;
            }
        });
        log::info!(
            "serving the agent API on {} port {}",
            if serial {
                "the serial channel's"
            } else {
                "vsock"
            },
            cocoon_protocol::AGENT_PORT
        );
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// Loads the modules and mounts the share; failures are kept for the calls that need them.
fn bring_up(template: bool, debug_console: bool, on_module: impl FnMut(&str)) -> init::Booted {
    let t0 = logger::uptime_ms();
    let modules = init::load_modules(Path::new(init::MODULE_ORDER), on_module);
    let t_modules = logger::uptime_ms();
    let (loaded_modules, shared) = match modules {
        Ok(m) => {
            // Every module is in, so the initramfs can go; the share mounts on the new root.
            let shared = init::switch_root(debug_console)
                .and_then(|()| match template {
                    true => init::template_ready(),
                    false => init::mount_shared(),
                })
                .map_err(|e| format!("{e:#}"));
            (m, shared)
        }
        Err(e) => {
            log::error!("{e:#}");
            (vec![], Err(format!("modules: {e:#}")))
        }
    };
    if let Err(e) = &shared {
        log::warn!("no shared directory: {e}");
    }
    log::info!(
        "bring-up done: {} modules {} ms, root switch + share {} ms",
        loaded_modules.len(),
        t_modules - t0,
        logger::uptime_ms() - t_modules
    );
    init::Booted {
        loaded_modules,
        shared,
    }
}
