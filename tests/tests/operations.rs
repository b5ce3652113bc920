//! Operating pods (issue #31): the `cocoon` command asks each pod's shim through its admin
//! endpoint. With a real containerd and a real pod VM: `cocoon ps --json` lists the pod with
//! its VMM's pid, size, start path and host memory; the endpoint is root-only; a frozen guest
//! does not slow the listing, and a frozen shim costs it at most the per-pod bound and shows
//! as an error row; nothing is left once the pod is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use cocoon_tests::containerd::Containerd;
use cocoon_tests::leaks::pids_named;
use cocoon_tests::{cocoon_cli, gate, Need};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `cocoon ARGS…` against the test containerd's pods; its stdout, and how long it took.
fn cocoon(c: &Containerd, args: &[&str]) -> (String, Duration) {
    let t0 = Instant::now();
    let out = Command::new(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args(args)
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "cocoon {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8(out.stdout).unwrap(), took)
}

/// `cocoon [OPTIONS…] ps --json`, parsed.
fn rows(c: &Containerd, options: &[&str]) -> (Vec<serde_json::Value>, Duration) {
    let args: Vec<&str> = options.iter().copied().chain(["ps", "--json"]).collect();
    let (text, took) = cocoon(c, &args);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    (v.as_array().unwrap().clone(), took)
}

#[tokio::test]
async fn cocoon_ps_lists_the_pod_vm_and_a_frozen_pod_does_not_stall_it() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    c.run_detached("ops", &["sleep", "600"]);
    let qemu = pids_named(&c.cocoon_state, "qemu-system-x86_64");
    assert_eq!(qemu.len(), 1);

    // The endpoint: root's alone.
    let sock = c.cocoon_state.join("ops.admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", sock.display());

    let (rows_now, _) = rows(&c, &[]);
    assert_eq!(rows_now.len(), 1, "{rows_now:#?}");
    let r = &rows_now[0];
    assert_eq!(r["sandbox_id"], "ops", "{r:#}");
    assert_eq!(r["namespace"], "default", "{r:#}");
    assert_eq!(r["vmm_pid"], qemu[0], "{r:#}");
    assert_eq!(r["shim_pid"], c.shim_pid("ops"), "{r:#}");
    assert_eq!(r["hypervisor"], "qemu", "{r:#}");
    assert_eq!(r["vcpus"], 1, "{r:#}");
    assert_eq!(r["memory_mib"], 256, "{r:#}");
    let start = r["start"].as_str().unwrap();
    assert!(["template", "kernel boot"].contains(&start), "{r:#}");
    assert_eq!(r["containers"], serde_json::json!(["ops"]), "{r:#}");
    assert!(r["error"].is_null(), "{r:#}");
    // The pod's host memory: at least QEMU's, which is tens of MiB.
    assert!(r["pss_kib"].as_u64().unwrap() > 10 * 1024, "{r:#}");
    assert!(r["uptime_s"].as_u64().unwrap() < 600, "{r:#}");
    assert!(r["pids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p[1] == qemu[0]));

    let (table, _) = cocoon(&c, &["ps"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("ops "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains(&qemu[0].to_string()) && line.contains("256 MiB"),
        "{table}"
    );

    // A frozen guest: the shim describes the pod without asking it.
    kill(Pid::from_raw(qemu[0]), Signal::SIGSTOP).unwrap();
    let (frozen, took) = rows(&c, &[]);
    kill(Pid::from_raw(qemu[0]), Signal::SIGCONT).unwrap();
    assert!(frozen[0]["error"].is_null(), "{frozen:#?}");
    assert!(
        took < Duration::from_secs(2),
        "ps took {took:?} with the guest stopped"
    );

    // A frozen shim: the listing waits for it at most the bound, and says so.
    let shim = Pid::from_raw(c.shim_pid("ops"));
    kill(shim, Signal::SIGSTOP).unwrap();
    let (stalled, took) = rows(&c, &["--timeout-ms", "500"]);
    kill(shim, Signal::SIGCONT).unwrap();
    assert_eq!(stalled[0]["sandbox_id"], "ops", "{stalled:#?}");
    let err = stalled[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("no answer within 500 ms"), "{stalled:#?}");
    assert!(
        took < Duration::from_secs(2),
        "ps took {took:?} with the shim stopped"
    );

    c.kill_and_remove("ops");
    c.assert_clean();
    assert!(!sock.exists(), "the admin endpoint outlived its pod");
    let (after, _) = rows(&c, &[]);
    assert!(after.is_empty(), "{after:#?}");
}

/// `cocoon logs`: the guest's boot lines (the template's, for a restored pod), each stamped
/// with the host's time; `-f` goes on until the pod's VM stops. The agent's lines also reach
/// containerd's log at the configured level.
#[tokio::test]
async fn cocoon_logs_prints_the_guest_console_and_follows_it() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    // Every agent line at info or above into the shim's log (the default is warn).
    let toml = std::fs::read_to_string(&c.cocoon_config).unwrap();
    std::fs::write(&c.cocoon_config, toml + "agent_log_in_shim = \"info\"\n").unwrap();
    c.import_test_image();
    c.run_detached("logs", &["sleep", "600"]);

    let (text, _) = cocoon(&c, &["logs", "log"]); // a prefix names the pod
    assert!(text.contains("cocoon-agent 0.1.0 starting"), "{text}");
    assert!(text.contains("cocoon-agent INFO"), "{text}");
    for line in text.lines().filter(|l| !l.starts_with("--- ")) {
        let stamp = line.split(' ').next().unwrap();
        assert!(
            humantime::parse_rfc3339(stamp).is_ok(),
            "not stamped: {line:?}\n{text}"
        );
    }
    let log = c.log();
    assert!(
        log.contains("agent: ") && log.contains("guest"),
        "no agent line in containerd's log:\n{log}"
    );

    // Following: the boot lines come, and the command ends with the VM.
    let mut follow = Command::new(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args(["logs", "-f", "logs"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f ended while the pod runs"
    );
    c.kill_and_remove("logs");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "logs -f outlived the pod"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut follow.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("cocoon-agent 0.1.0 starting"), "{out}");

    // A pod that isn't there is named in the error.
    let out = Command::new(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args(["logs", "nosuchpod"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pod \"nosuchpod\""), "{err}");
    c.assert_clean();
}

/// `GET /metrics` of a running `cocoon monitor`, parsed by a Prometheus text parser; and how
/// long the scrape took.
fn scrape(addr: &str) -> (prometheus_parse::Scrape, String, Duration) {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let took = t0.elapsed();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
    (parsed, body.to_owned(), took)
}

/// The value of sample `name` of pod `sandbox`, whatever type the parser gave it.
fn sample(s: &prometheus_parse::Scrape, name: &str, sandbox: &str) -> Option<f64> {
    use prometheus_parse::Value as V;
    s.samples
        .iter()
        .find(|x| x.metric == name && x.labels.get("sandbox_id") == Some(sandbox))
        .and_then(|x| match x.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => Some(v),
            _ => None,
        })
}

/// `cocoon monitor`: one Prometheus endpoint with the pod's series, read by a real parser; a
/// frozen guest costs the scrape at most the per-pod bound (its guest part is `up 0`), and a
/// frozen shim as well (the pod is `up 0`).
#[tokio::test]
async fn cocoon_monitor_serves_the_pods_metrics_within_the_bound() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    c.run_detached("mon", &["sleep", "600"]);
    let qemu = pids_named(&c.cocoon_state, "qemu-system-x86_64");
    let mut monitor = Command::new(cocoon_cli())
        .env("COCOON_CONFIG", &c.cocoon_config)
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args(["--timeout-ms", "1000", "monitor", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(monitor.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();

    let (m, text, _) = scrape(&addr);
    assert_eq!(sample(&m, "cocoon_pod_up", "mon"), Some(1.0), "{text}");
    assert_eq!(sample(&m, "cocoon_guest_up", "mon"), Some(1.0), "{text}");
    assert_eq!(
        sample(&m, "cocoon_pod_containers", "mon"),
        Some(1.0),
        "{text}"
    );
    let total = sample(&m, "cocoon_guest_memory_total_bytes", "mon").unwrap();
    let avail = sample(&m, "cocoon_guest_memory_available_bytes", "mon").unwrap();
    assert!(total > 128e6 && avail > 0.0 && avail < total, "{text}");
    assert!(
        sample(&m, "cocoon_pod_host_pss_bytes", "mon").unwrap() > 10e6,
        "{text}"
    );
    assert!(
        sample(&m, "cocoon_pod_host_cpu_seconds_total", "mon").unwrap() > 0.0,
        "{text}"
    );
    assert!(sample(&m, "cocoon_pod_memory_bytes", "mon") == Some(256.0 * 1024.0 * 1024.0));
    let info = m
        .samples
        .iter()
        .find(|x| x.metric == "cocoon_pod_info" && x.labels.get("sandbox_id") == Some("mon"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(info.labels.get("namespace"), Some("default"), "{text}");
    assert!(matches!(
        info.labels.get("start"),
        Some("template" | "kernel boot")
    ));
    // The calls that started the container were timed.
    let calls = m
        .samples
        .iter()
        .filter(|x| {
            x.metric == "cocoon_agent_call_duration_seconds_count"
                && x.labels.get("sandbox_id") == Some("mon")
        })
        .count();
    assert!(calls >= 3, "{text}");
    assert!(text.contains("# TYPE cocoon_agent_call_duration_seconds histogram"));

    // A frozen guest: the pod's host part still comes, its guest part is down, in bound.
    kill(Pid::from_raw(qemu[0]), Signal::SIGSTOP).unwrap();
    let (m, text, took) = scrape(&addr);
    kill(Pid::from_raw(qemu[0]), Signal::SIGCONT).unwrap();
    assert_eq!(sample(&m, "cocoon_pod_up", "mon"), Some(1.0), "{text}");
    assert_eq!(sample(&m, "cocoon_guest_up", "mon"), Some(0.0), "{text}");
    assert!(took < Duration::from_millis(2500), "scrape took {took:?}");

    // A frozen shim: the pod is down, in bound.
    let shim = Pid::from_raw(c.shim_pid("mon"));
    kill(shim, Signal::SIGSTOP).unwrap();
    let (m, text, took) = scrape(&addr);
    kill(shim, Signal::SIGCONT).unwrap();
    assert_eq!(sample(&m, "cocoon_pod_up", "mon"), Some(0.0), "{text}");
    assert!(took < Duration::from_millis(2500), "scrape took {took:?}");

    monitor.kill().unwrap();
    monitor.wait().unwrap();
    c.kill_and_remove("mon");
    c.assert_clean();
}

/// `cocoon exec ARGS…` with stdin `input`; (exit code, stdout, stderr).
fn exec(c: &Containerd, args: &[&str], input: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .arg("exec")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cocoon exec -t` on a terminal of 31x97 (its controlling terminal: `setsid -c`): the
/// guest's pty gets that size, and when the terminal is resized (SIGWINCH), the new one.
fn terminal_size_follows(c: &Containerd) {
    use std::io::Read;
    let size = |rows, cols| rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(None, None).unwrap();
    rustix::termios::tcsetwinsize(&pty.master, size(31, 97)).unwrap();
    let slave = || std::process::Stdio::from(pty.slave.try_clone().unwrap());
    let mut child = Command::new("setsid")
        .arg("-c")
        .arg(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args([
            "exec",
            "-t",
            "dbg",
            "--",
            "sh",
            "-c",
            "stty size; sleep 3; stty size",
        ])
        .stdin(slave())
        .stdout(slave())
        .stderr(slave())
        .spawn()
        .unwrap();
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let (mut seen, mut buf, mut resized) = (String::new(), [0u8; 1024], false);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        // EIO once every slave fd is closed: the session is over.
        let Ok(n) = master.read(&mut buf) else { break };
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if !resized && seen.contains("31 97") {
            rustix::termios::tcsetwinsize(&master, size(42, 120)).unwrap();
            resized = true;
        }
    }
    assert!(child.wait().unwrap().success(), "{seen:?}");
    assert!(seen.contains("31 97"), "the first size: {seen:?}");
    assert!(seen.contains("42 120"), "the size after SIGWINCH: {seen:?}");
}

/// The debug console: refused by default with the setting's name; when the host enables it,
/// `uname -r` runs in the guest (the guest kernel's release, not the host's), outside the
/// container (PID 1 is the agent), with stdin, a terminal, the exit status; and a command
/// whose client leaves is killed.
#[tokio::test]
async fn cocoon_exec_is_refused_by_default_and_runs_in_the_guest_when_enabled() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    c.run_detached("off", &["sleep", "600"]);
    let (code, _, err) = exec(&c, &["off", "--", "uname", "-r"], None);
    assert_ne!(code, 0);
    assert!(err.contains("[debug] console = true"), "{err}");
    c.kill_and_remove("off");

    let toml = std::fs::read_to_string(&c.cocoon_config).unwrap();
    std::fs::write(&c.cocoon_config, toml + "\n[debug]\nconsole = true\n").unwrap();
    c.run_detached("dbg", &["sleep", "600"]);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            cocoon_tests::test_config(&c.cocoon_state)
                .kernel
                .with_file_name("manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let release = manifest["kernel_release"].as_str().unwrap();
    let (code, out, err) = exec(&c, &["dbg", "--", "uname", "-r"], None);
    assert_eq!((code, out.trim()), (0, release), "{err}");
    // Outside every container: the guest's PID 1 is the agent.
    let (code, out, err) = exec(&c, &["dbg", "--", "cat", "/proc/1/comm"], None);
    assert_eq!((code, out.trim()), (0, "init"), "{err}");
    let (code, out, _) = exec(&c, &["-i", "dbg", "--", "cat"], Some("through stdin\n"));
    assert_eq!((code, out.as_str()), (0, "through stdin\n"));
    let (code, _, err) = exec(
        &c,
        &["dbg", "--", "sh", "-c", "echo oops >&2; exit 3"],
        None,
    );
    assert_eq!((code, err.trim()), (3, "oops"));
    let (code, out, _) = exec(&c, &["-t", "dbg", "--", "tty"], None);
    assert_eq!(code, 0);
    assert!(out.trim().starts_with("/dev/pts/"), "{out:?}");
    terminal_size_follows(&c);
    let (code, _, err) = exec(&c, &["dbg", "--", "no-such-command"], None);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("no-such-command"), "{err}");

    // A client that goes: its command goes too.
    let mut gone = Command::new(cocoon_cli())
        .arg("--state-dir")
        .arg(&c.cocoon_state)
        .args(["exec", "dbg", "--", "sleep", "1234"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // busybox has no pgrep: the guest's command lines, one a line.
    let running = |c: &Containerd| {
        let script = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -q '^sleep 1234'";
        exec(c, &["dbg", "--", "sh", "-c", script], None).0 == 0
    };
    assert!(running(&c), "the command runs while its client does");
    gone.kill().unwrap();
    gone.wait().unwrap();
    let t0 = Instant::now();
    loop {
        if !running(&c) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the command outlived its client"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    c.kill_and_remove("dbg");
    c.assert_clean();
}
