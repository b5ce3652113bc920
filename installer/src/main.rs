//! `cocoon-deploy`: the deploy image's installer (docs/kubernetes.md, "Install with a
//! DaemonSet").

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cocoon_deploy::{label, node, Artifacts, Node};

#[derive(Debug, Parser)]
#[command(
    name = "cocoon-deploy",
    version,
    about = "Install Cocoon on a node, or take it off"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Installs under /opt/cocoon, registers the `cocoon` handler with containerd and
    /// restarts it; again is the same as once.
    Install {
        /// Where the node's root is mounted (`/host` in the DaemonSet).
        #[arg(long)]
        host_root: PathBuf,
        /// Leave containerd running as it is (it loads the handler at its next start).
        #[arg(long)]
        no_restart: bool,
        /// The image's artifacts; by default the tree this binary is in (`<dir>/bin/..`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Label the node cocoon.io/runtime=true (in a cluster: the node is $NODE_NAME).
        #[arg(long)]
        label_node: bool,
        /// Then wait until stopped (a DaemonSet's pod).
        #[arg(long)]
        wait: bool,
    },
    /// Takes away what install added and gives containerd's config back as it was.
    Uninstall {
        #[arg(long)]
        host_root: PathBuf,
        #[arg(long)]
        no_restart: bool,
        /// Take the label cocoon.io/runtime off the node ($NODE_NAME).
        #[arg(long)]
        label_node: bool,
        #[arg(long)]
        wait: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(node::RESTART_ARG) {
        return Err(node::restart_in_init_namespace().into());
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Install {
            host_root,
            no_restart,
            from,
            label_node,
            wait,
        } => {
            let dir = match from {
                Some(d) => d,
                None => std::env::current_exe()?
                    .parent()
                    .and_then(|bin| bin.parent())
                    .context("where this binary is")?
                    .to_owned(),
            };
            let node = Node::new(host_root);
            let done = cocoon_deploy::install(&node, &Artifacts { dir })?;
            for c in &done.changes {
                println!("{c}");
            }
            if done.changes.is_empty() {
                println!("already installed; nothing changed");
            }
            restart(done.containerd_changed, no_restart)?;
            if label_node {
                set_label(true)?;
            }
            if wait {
                wait_forever();
            }
        }
        Command::Uninstall {
            host_root,
            no_restart,
            label_node,
            wait,
        } => {
            let node = Node::new(host_root);
            let done = cocoon_deploy::uninstall(&node)?;
            for c in &done.changes {
                println!("{c}");
            }
            for k in &done.kept {
                println!("kept {k}");
            }
            if done.changes.is_empty() {
                println!("not installed; nothing to take away");
            }
            // The label goes first: no new cocoon pod is placed on a node losing Cocoon.
            if label_node {
                set_label(false)?;
            }
            restart(done.containerd_changed, no_restart)?;
            if wait {
                wait_forever();
            }
        }
    }
    Ok(())
}

fn restart(changed: bool, no_restart: bool) -> anyhow::Result<()> {
    match (changed, no_restart) {
        (false, _) => {}
        (true, true) => println!("containerd's config changed: it applies at its next start"),
        (true, false) => {
            node::restart_containerd()?;
            println!("restarted containerd");
        }
    }
    Ok(())
}

fn set_label(on: bool) -> anyhow::Result<()> {
    let name = std::env::var("NODE_NAME").context("--label-node needs $NODE_NAME")?;
    label::label(&label::Cluster::in_cluster()?, &name, on)?;
    println!(
        "{} {} on node {name}",
        if on { "set" } else { "removed" },
        label::LABEL
    );
    Ok(())
}

/// A DaemonSet's pod stays up once its work is done; SIGTERM or SIGINT ends it. The signals
/// are blocked and waited for: as a container's PID 1 this process would otherwise never see
/// a signal it has no handler for, and the pod would wait out its grace period.
fn wait_forever() -> ! {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_ok() {
        if let Ok(sig) = set.wait() {
            println!("{sig}: done");
            std::process::exit(0);
        }
    }
    loop {
        std::thread::park();
    }
}
