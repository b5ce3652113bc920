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
