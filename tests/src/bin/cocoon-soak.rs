//! `make soak`: many pods at once through create / exec / fault / kill / delete rounds, with
//! helpers killed and guests frozen at random, against a private containerd. Not part of
//! `make test`: it runs for minutes. Bounded by `SOAK_ROUNDS` (default 3) and `SOAK_MINUTES`
//! (default 20, checked between rounds); `SOAK_PODS` pods per round (default 10); `SOAK_SEED`
//! makes the fault draw repeatable.
//!
//! One more pod, the anchor, lives through every round and gets execs in each: its shim's RSS,
//! taken after every round, shows whether a long-lived shim grows.
//!
//! Every `ctr` call runs under `timeout`: a call that has to be killed is a wedge. Every
//! operation must either succeed or fail with an error that says why; the only failures
//! expected are the calls on a frozen guest, which must name the timeout. At the end nothing
//! may be left: processes, mounts, files under the state dir, shim sockets. Prints a summary
//! and writes target/soak/results.md; exits 1 if anything was lost, wedged or unclear.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a soak aborts on a broken setup

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::leaks::{dead_new_sockets, mounts_mentioning, shim_sockets, SHIM_SOCKETS};
use cocoon_tests::{leftovers, pids_mentioning, pids_named, processes_mentioning, signal_all};

/// Longest any one `ctr` call may take before it counts as wedged.
const CTR_LIMIT: Duration = Duration::from_secs(150);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What is done to a pod between its execs and its kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    KillVirtiofsd,
    KillVsock,
    KillVmm,
    Freeze,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::None,
        Fault::KillVirtiofsd,
        Fault::KillVsock,
        Fault::KillVmm,
        Fault::Freeze,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::KillVirtiofsd => "kill virtiofsd",
            Fault::KillVsock => "kill vhost-device-vsock",
            Fault::KillVmm => "kill the VMM",
            Fault::Freeze => "freeze the guest (SIGSTOP)",
        }
    }
}

/// xorshift64*: a repeatable draw without a dependency.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fault(&mut self) -> Fault {
        Fault::ALL[usize::try_from(self.next() % 5).unwrap()]
    }
}

/// One operation's result.
#[derive(Debug, Clone)]
struct Op {
    what: &'static str,
    ok: bool,
    /// Killed by the `timeout` around it.
    wedged: bool,
    /// A failure whose message says what went wrong (or a success).
    clear: bool,
    /// A failure the soak provoked (a call on a frozen guest).
    expected: bool,
    text: String,
}

#[derive(Debug, Default)]
struct Log(Mutex<Vec<(String, Op)>>);

impl Log {
    fn add(&self, pod: &str, op: Op) {
        if !op.ok {
            eprintln!("  {pod}: {} failed: {}", op.what, op.text.trim());
        }
        self.0.lock().unwrap().push((pod.to_owned(), op));
    }
}

/// `ctr` under `timeout -s KILL`.
fn ctr(address: &Path, args: &[&str]) -> (Output, bool) {
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            &CTR_LIMIT.as_secs().to_string(),
            "ctr",
            "--address",
        ])
        .arg(address)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let wedged = out.status.code().is_none() || out.status.code() == Some(137);
    (out, wedged)
}

/// Runs one `ctr` operation and records it. `expect_error`: the failure expected, as a
/// substring its message must contain; `None` expects success.
fn op(
    log: &Log,
    address: &Path,
    pod: &str,
    what: &'static str,
    args: &[&str],
    expect_error: Option<&str>,
) -> bool {
    let (out, wedged) = ctr(address, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success();
    let clear = match (ok, expect_error) {
        (true, _) => true,
        (false, Some(needle)) => text.contains(needle),
        // An unexpected failure is still "clear" if it names a cause; a bare deadline from
        // ctr's own client (no bound of ours named) or an empty message is not.
        (false, None) => {
            !wedged
                && !text.trim().is_empty()
                && (!text.contains("context deadline") || text.contains("got no answer within"))
        }
    };
    log.add(
        pod,
        Op {
            what,
            ok,
            wedged,
            clear,
            expected: expect_error.is_some(),
            text,
        },
    );
    ok
}

fn task_status(address: &Path, id: &str) -> String {
    let (out, _) = ctr(address, &["task", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_owned()
}

fn wait_status(address: &Path, id: &str, want: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if task_status(address, id) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The pod's host processes called `comm`.
fn pod_processes(state: &Path, id: &str, comm: &str) -> Vec<i32> {
    pids_named(&state.join(id), comm)
}

/// One pod's round: run, two execs, the fault, kill, delete.
fn cycle(log: &Log, address: &Path, state: &Path, id: &str, fault: Fault) {
    if !op(
        log,
        address,
        id,
        "run",
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "1000",
        ],
        None,
    ) {
        let _ = ctr(address, &["containers", "rm", id]);
        return;
    }
    if !wait_status(address, id, "RUNNING", Duration::from_secs(120)) {
        log.add(id, failure("reach RUNNING", "the task never ran"));
    }
    for n in 0..2 {
        let eid = format!("e{n}");
        op(
            log,
            address,
            id,
            "exec",
            &["task", "exec", "--exec-id", &eid, id, "echo", "hi"],
            None,
        );
    }
    let vmm = ["qemu-system-x86_64", "cloud-hypervisor"];
    match fault {
        Fault::None => {}
        Fault::KillVirtiofsd | Fault::KillVsock | Fault::KillVmm => {
            let names: &[&str] = match fault {
                Fault::KillVirtiofsd => &["virtiofsd"],
                Fault::KillVsock => &["vhost-device-vsock"],
                _ => &vmm,
            };
            let pids: Vec<i32> = names
                .iter()
                .flat_map(|n| pod_processes(state, id, n))
                .collect();
            signal_all(&pids, nix::sys::signal::Signal::SIGKILL);
            if !pids.is_empty() {
                // The pod ends on its own; Delete is what is left to do.
                if !wait_status(address, id, "STOPPED", Duration::from_secs(60)) {
                    log.add(id, failure("stop after the fault", "the task did not stop"));
                }
                op(log, address, id, "delete", &["task", "delete", id], None);
                op(log, address, id, "rm", &["containers", "rm", id], None);
                return;
            }
        }
        Fault::Freeze => {
            let pids: Vec<i32> = vmm
                .iter()
                .flat_map(|n| pod_processes(state, id, n))
                .collect();
            signal_all(&pids, nix::sys::signal::Signal::SIGSTOP);
            op(
                log,
                address,
                id,
                "exec (frozen)",
                &["task", "exec", "--exec-id", "frozen", id, "true"],
                Some("got no answer within"),
            );
        }
    }
    op(
        log,
        address,
        id,
        "kill",
        &["task", "kill", "-s", "SIGKILL", id],
        None,
    );
    if !wait_status(address, id, "STOPPED", Duration::from_secs(60)) {
        log.add(id, failure("stop after SIGKILL", "the task did not stop"));
    }
    op(log, address, id, "delete", &["task", "delete", id], None);
    op(log, address, id, "rm", &["containers", "rm", id], None);
}

fn failure(what: &'static str, text: &str) -> Op {
    Op {
        what,
        ok: false,
        wedged: true,
        clear: false,
        expected: false,
        text: text.to_owned(),
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let pods = env_or("SOAK_PODS", 10);
    let rounds = env_or("SOAK_ROUNDS", 3);
    let minutes = env_or("SOAK_MINUTES", 20);
    let seed = env_or("SOAK_SEED", 0x5eed_c0c0);
    let c = Containerd::start();
    let sockets_before = shim_sockets();
    // Frozen guests should cost seconds, not the default half minute.
    let mut toml = std::fs::read_to_string(&c.cocoon_config).unwrap();
    // (5 s proved too short for a CreateContainer while ten TCG guests boot on two cores.)
    toml.push_str("[agent]\ncall_timeout_ms = 10000\nstdio_timeout_ms = 5000\n");
    std::fs::write(&c.cocoon_config, toml).unwrap();
    c.import_test_image();
    let address = c.address.clone();
    let state = c.cocoon_state.clone();
    let log = Arc::new(Log::default());
    let mut draw = Draw(seed | 1);
    let t0 = Instant::now();

    op(
        &log,
        &address,
        "anchor",
        "run",
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "anchor",
            "sleep",
            "100000",
        ],
        None,
    );
    wait_status(&address, "anchor", "RUNNING", Duration::from_secs(120));
    let anchor_shim = pids_mentioning(c.dir.path(), "containerd-shim-cocoon-v2")
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("anchor"))
        });
    let mut rss = vec![];
    let mut faults: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut done = 0;
    for round in 0..rounds {
        if t0.elapsed() > Duration::from_secs(minutes * 60) {
            eprintln!("SOAK_MINUTES={minutes} reached after {round} rounds");
            break;
        }
        eprintln!("round {}: {pods} pods", round + 1);
        let mut threads = vec![];
        for p in 0..pods {
            let fault = draw.fault();
            *faults.entry(fault).or_default() += 1;
            let (log, address, state) = (log.clone(), address.clone(), state.clone());
            let id = format!("soak-{round}-{p}");
            threads.push(std::thread::spawn(move || {
                cycle(&log, &address, &state, &id, fault);
            }));
        }
        for n in 0..5 {
            op(
                &log,
                &address,
                "anchor",
                "exec",
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    &format!("a{round}-{n}"),
                    "anchor",
                    "true",
                ],
                None,
            );
        }
        for t in threads {
            t.join().unwrap();
        }
        rss.push(anchor_shim.and_then(rss_kib).unwrap_or(0));
        done += 1;
    }
    op(
        &log,
        &address,
        "anchor",
        "kill",
        &["task", "kill", "-s", "SIGKILL", "anchor"],
        None,
    );
    wait_status(&address, "anchor", "STOPPED", Duration::from_secs(60));
    op(
        &log,
        &address,
        "anchor",
        "delete",
        &["task", "delete", "anchor"],
        None,
    );
    op(
        &log,
        &address,
        "anchor",
        "rm",
        &["containers", "rm", "anchor"],
        None,
    );
    let elapsed = t0.elapsed();

    // What is left, after the shims had a moment to exit.
    let me = format!("{}:", std::process::id());
    let mut procs = vec![];
    for _ in 0..100 {
        procs = processes_mentioning(c.dir.path())
            .into_iter()
            .filter(|p| !p.starts_with(&me) && !p.contains("containerd --config"))
            .collect();
        if procs.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mounts = mounts_mentioning(&state);
    let files: Vec<PathBuf> = leftovers(&state);
    // Only sockets nothing serves: a live shim of this containerd is in `procs` already, and
    // one of another containerd on the host is not this run's leak.
    let sockets = dead_new_sockets(Path::new(SHIM_SOCKETS), &sockets_before);

    let ops = log.0.lock().unwrap().clone();
    let failed: Vec<_> = ops.iter().filter(|(_, o)| !o.ok && o.expected).collect();
    let unexpected: Vec<_> = ops.iter().filter(|(_, o)| !o.ok && !o.expected).collect();
    let wedged: Vec<_> = ops.iter().filter(|(_, o)| o.wedged).collect();
    let unclear: Vec<_> = ops.iter().filter(|(_, o)| !o.clear).collect();
    let mut md = String::new();
    md.push_str(&format!(
        "# Soak results\n\n{done} rounds of {pods} pods at once (+1 anchor pod), seed {seed:#x}, \
         {:.0} s, {} operations.\n\n",
        elapsed.as_secs_f64(),
        ops.len()
    ));
    md.push_str("| fault injected | pods |\n|---|---|\n");
    for (f, n) in &faults {
        md.push_str(&format!("| {} | {n} |\n", f.name()));
    }
    md.push_str(&format!(
        "\n- failed as expected (calls on a frozen guest, naming the timeout): {}\n\
         - other failures: {}\n\
         - wedged (killed after {:?}): {}\n- failed without a clear error: {}\n\
         - anchor shim RSS after each round (KiB): {rss:?}\n\
         - left behind: {} processes, {} mounts, {} files under the state dir, {} shim sockets\n",
        failed.len(),
        unexpected.len(),
        CTR_LIMIT,
        wedged.len(),
        unclear.len(),
        procs.len(),
        mounts.len(),
        files.len(),
        sockets.len()
    ));
    for (pod, o) in unexpected.iter().chain(unclear.iter()).chain(wedged.iter()) {
        md.push_str(&format!("  - {pod} {}: {}\n", o.what, o.text.trim()));
    }
    for p in &procs {
        md.push_str(&format!("  - process: {p}\n"));
    }
    for m in &mounts {
        md.push_str(&format!("  - mount: {m}\n"));
    }
    for f in &files {
        md.push_str(&format!("  - file: {}\n", f.display()));
    }
    println!("{md}");
    let out = PathBuf::from("target/soak");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.md"), &md).unwrap();
    let grew = rss.len() >= 2 && rss[rss.len() - 1] > rss[0] + 4096;
    if grew {
        println!("the anchor shim grew by more than 4 MiB over the rounds");
    }
    let lost = !procs.is_empty() || !mounts.is_empty() || !files.is_empty() || !sockets.is_empty();
    let bad = lost || !wedged.is_empty() || !unclear.is_empty() || grew;
    // Stops the private containerd (exit would skip its Drop).
    drop(c);
    if bad {
        std::process::exit(1);
    }
}
