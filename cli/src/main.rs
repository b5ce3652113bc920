//! `cocoon`: see and operate the pod VMs on this host. It talks to each pod's shim through
//! the shim's admin endpoint (`shim/src/admin.rs`), never around it: the shim is what knows
//! the pod. Root only, as the endpoints are.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod client;
mod exec;
mod monitor;
mod ps;
mod target;

#[derive(Debug, Parser)]
#[command(
    name = "cocoon",
    version,
    about = "See and operate Cocoon's pod VMs on this host"
)]
struct Cli {
    /// The pods' state directory; by default the `state_dir` of the Cocoon config
    /// (/etc/cocoon/config.toml, or $COCOON_CONFIG).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// How long one pod's shim may take to answer, in ms; a shim that takes longer is shown
    /// with an error rather than holding up the rest.
    #[arg(long, global = true, default_value_t = 2000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every pod VM on the host: sandbox, namespace, VMM pid, size, how it started, uptime,
    /// host memory (PSS) and containers.
    Ps {
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The guest's console: kernel and agent lines, stamped with the host's time. For a pod
    /// restored from the VM template, the template's boot comes first.
    Logs {
        /// The pod's sandbox id, or a prefix of it that names one pod.
        sandbox: String,
        /// Go on printing what the guest adds until the pod's VM stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Runs a command in the pod's guest VM as the guest's root, outside every container (a
    /// debug console). Off unless the host sets `[debug] console = true`; exits with the
    /// command's status.
    Exec {
        /// Allocate a terminal (for a shell: `cocoon exec -it POD -- sh`).
        #[arg(short, long)]
        tty: bool,
        /// Pass this command's stdin to the guest command.
        #[arg(short, long)]
        interactive: bool,
        /// The pod's sandbox id, or a prefix of it that names one pod.
        sandbox: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A Prometheus endpoint (GET /metrics) with every pod's numbers: host CPU and memory of
    /// its VM, the guest's memory and CPU, boot phases, agent call latency, OOM kills. Each
    /// pod gets --timeout-ms per scrape.
    Monitor {
        /// Address to serve on, e.g. 127.0.0.1:9464 (port 0: any free port; the first line
        /// printed names it).
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Read only where a default comes from it: `--state-dir` works with any config file.
    let cfg = || vmm_driver::Config::load();
    let state_dir = match cli.state_dir {
        Some(d) => d,
        None => cfg()?.state_dir,
    };
    let limit = Duration::from_millis(cli.timeout_ms);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Ps { json } => {
            let rows = rt.block_on(ps::rows(&state_dir, limit));
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", ps::table(&rows));
            }
        }
        Command::Exec {
            tty,
            interactive,
            sandbox,
            command,
        } => {
            let socket = target::endpoint(&state_dir, &sandbox)?;
            let status = rt.block_on(exec::run(&socket, &command, tty, interactive, limit))?;
            // Not a return through the runtime's drop: a read of stdin may still be blocked.
            std::process::exit(status);
        }
        Command::Monitor { listen } => {
            // Scrapes overlap freely: a multi-threaded runtime of its own.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(monitor::serve(
                state_dir,
                cfg()?.template_dir,
                &listen,
                limit,
            ))?;
        }
        Command::Logs { sandbox, follow } => {
            let socket = target::endpoint(&state_dir, &sandbox)?;
            let path = if follow { "/logs?follow" } else { "/logs" };
            rt.block_on(client::stream(&socket, path, limit, follow))?;
        }
    }
    Ok(())
}
