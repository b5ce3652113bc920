//! End to end through a private containerd: `ctr run --runtime io.containerd.cocoon.v2` boots a
//! real VM per pod. Each case also runs under runc to compare.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run_args<'a>(runtime: &'a str, id: &'a str, extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--rm", "--runtime", runtime];
    a.extend_from_slice(extra);
    a.extend_from_slice(&[IMAGE, id]);
    a.extend_from_slice(cmd);
    a
}

#[tokio::test]
async fn ctr_run_prints_the_guest_kernel() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();

    let out = c.ctr(&run_args(RUNTIME, "uname", &[], &["uname", "-r"]));
    assert!(
        out.status.success(),
        "ctr run failed: {}\ncontainerd log:\n{}",
        text(&out.stderr),
        c.log()
    );
    let guest = text(&out.stdout);
    let host = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    let runc = c.ctr(&run_args(
        "io.containerd.runc.v2",
        "uname-runc",
        &[],
        &["uname", "-r"],
    ));
    assert_eq!(text(&runc.stdout).trim(), host, "runc sees the host kernel");
    assert!(
        guest.trim().ends_with("-cloud-amd64"),
        "guest kernel: {guest:?}"
    );
    assert_ne!(guest.trim(), host);
    c.assert_clean();
}

/// Runs the same `ctr run --rm` under cocoon and runc; returns both outputs.
fn both(
    c: &Containerd,
    id: &str,
    extra: &[&str],
    cmd: &[&str],
    input: Option<&[u8]>,
) -> [std::process::Output; 2] {
    [RUNTIME, "io.containerd.runc.v2"].map(|rt| {
        let name = format!("{id}-{}", if rt == RUNTIME { "cocoon" } else { "runc" });
        let args = run_args(rt, &name, extra, cmd);
        match input {
            Some(i) => c.ctr_with_input(&args, i),
            None => c.ctr(&args),
        }
    })
}

#[tokio::test]
async fn ctr_run_exit_codes_stdio_env_and_limits_match_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();

    // Exit codes pass through ctr.
    let [vm, runc] = both(&c, "exit", &[], &["sh", "-c", "exit 7"], None);
    assert_eq!(vm.status.code(), Some(7), "{}", text(&vm.stderr));
    assert_eq!(runc.status.code(), Some(7));

    // stdout and stderr stay separate.
    let [vm, runc] = both(
        &c,
        "split",
        &[],
        &["sh", "-c", "echo out; echo err >&2"],
        None,
    );
    for o in [&vm, &runc] {
        assert_eq!(text(&o.stdout), "out\n", "stderr: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("err\n"));
    }

    // Several MiB of stdin round-trip intact.
    let mut x: u32 = 12345;
    let input: Vec<u8> = (0..(3 << 20))
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let [vm, runc] = both(&c, "stdin", &[], &["cat"], Some(&input));
    assert!(vm.status.success(), "{}", text(&vm.stderr));
    assert_eq!(vm.stdout.len(), input.len());
    assert!(
        vm.stdout == input,
        "stdin did not round-trip through the VM"
    );
    assert!(runc.stdout == input);

    // --env and --cwd apply.
    let [vm, runc] = both(
        &c,
        "env",
        &["--env", "GREETING=hi-there", "--cwd", "/tmp"],
        &["sh", "-c", "echo $GREETING; pwd"],
        None,
    );
    assert_eq!(text(&vm.stdout), "hi-there\n/tmp\n", "{}", text(&vm.stderr));
    assert_eq!(text(&runc.stdout), text(&vm.stdout));

    // --memory-limit reaches the container's cgroup inside the guest: 100 MiB fits in the VM
    // (sized 256 MiB + the limit) but not in the 64 MiB cgroup, so the kernel OOM-kills it.
    let hog = ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"];
    let vm = c.ctr(&run_args(
        RUNTIME,
        "mem-hog",
        &["--memory-limit", "67108864"],
        &hog,
    ));
    assert_eq!(
        vm.status.code(),
        Some(137),
        "dd should be OOM-killed: {}",
        text(&vm.stderr)
    );
    let vm = c.ctr(&run_args(
        RUNTIME,
        "mem-ok",
        &["--memory-limit", "201326592"],
        &hog,
    ));
    assert!(
        vm.status.success(),
        "dd within the limit: {}",
        text(&vm.stderr)
    );

    c.assert_clean();
}

#[tokio::test]
async fn three_ctr_runs_at_once() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = std::sync::Arc::new(Containerd::start());
    c.import_test_image();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                c.ctr(&run_args(
                    RUNTIME,
                    &format!("par{i}"),
                    &[],
                    &["echo", &format!("pod {i}")],
                ))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert!(out.status.success(), "run {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("pod {i}\n"));
    }
    c.assert_clean();
}

#[tokio::test]
async fn detached_task_exec_ps_kill_delete() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();

    c.run_detached("bg", &["sleep", "1000"]);

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "bg",
        "sh",
        "-c",
        "echo from-exec; cat /proc/1/cmdline | tr '\\0' ' '; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-exec\nsleep 1000 ");

    let ps = c.ctr(&["task", "ps", "bg"]);
    assert!(ps.status.success(), "ps: {}", text(&ps.stderr));
    assert!(
        text(&ps.stdout).lines().count() >= 2,
        "ps lists the task's processes: {}",
        text(&ps.stdout)
    );

    let ls = c.ctr(&["task", "ls"]);
    assert!(
        text(&ls.stdout)
            .lines()
            .any(|l| l.starts_with("bg") && l.contains("RUNNING")),
        "{}",
        text(&ls.stdout)
    );

    let task_state = |c: &Containerd| {
        let ls = c.ctr(&["task", "ls"]);
        text(&ls.stdout)
            .lines()
            .find(|l| l.starts_with("bg"))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(c.ctr(&["task", "pause", "bg"]).status.success());
    assert!(task_state(&c).contains("PAUSED"), "{}", task_state(&c));
    assert!(c.ctr(&["task", "resume", "bg"]).status.success());
    assert!(task_state(&c).contains("RUNNING"), "{}", task_state(&c));
    let metrics = c.ctr(&["task", "metrics", "bg"]);
    assert!(
        metrics.status.success(),
        "metrics: {}",
        text(&metrics.stderr)
    );
    assert!(
        text(&metrics.stdout).contains("memory"),
        "{}",
        text(&metrics.stdout)
    );

    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", "bg"]);
    assert!(kill.status.success(), "kill: {}", text(&kill.stderr));
    let t0 = std::time::Instant::now();
    loop {
        let ls = c.ctr(&["task", "ls"]);
        if text(&ls.stdout)
            .lines()
            .any(|l| l.starts_with("bg") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "task never stopped: {}",
            text(&ls.stdout)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let del = c.ctr(&["task", "delete", "bg"]);
    assert!(del.status.success(), "task delete: {}", text(&del.stderr));
    let del = c.ctr(&["containers", "delete", "bg"]);
    assert!(
        del.status.success(),
        "containers delete: {}",
        text(&del.stderr)
    );
    c.assert_clean();
}

#[tokio::test]
async fn ctr_run_t_gives_a_tty() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();
    // `script` gives ctr a terminal of its own, as a person's shell would.
    let cmd = format!(
        "ctr --address {} run --rm -t --runtime {RUNTIME} {IMAGE} tty sh -c '[ -t 0 ] && echo is-a-tty; tty'",
        c.address.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let o = text(&out.stdout);
    assert!(
        out.status.success(),
        "ctr run -t: {o} {}",
        text(&out.stderr)
    );
    assert!(o.contains("is-a-tty"), "{o:?}");
    assert!(o.contains("/dev/pts/"), "{o:?}");
    c.assert_clean();
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_the_shim_stays_healthy() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();

    let out = c.ctr(&run_args(RUNTIME, "nobin", &[], &["/bin/no-such-binary"]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no-such-binary"),
        "{}",
        text(&out.stderr)
    );

    let out = c.ctr(&run_args(
        RUNTIME,
        "badann",
        &["--annotation", "io.cocoon.vm.vcpus=999"],
        &["true"],
    ));
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("io.cocoon.vm.vcpus") && e.contains("out of range"),
        "{e}"
    );
    let out = c.ctr(&run_args(
        RUNTIME,
        "typo",
        &["--annotation", "io.cocoon.vm.cpus=2"],
        &["true"],
    ));
    assert!(
        text(&out.stderr).contains("unknown annotation `io.cocoon.vm.cpus`"),
        "{}",
        text(&out.stderr)
    );

    // A config naming a kernel that does not exist.
    let good = std::fs::read_to_string(&c.cocoon_config).unwrap();
    std::fs::write(&c.cocoon_config, good.replace("vmlinuz", "no-such-vmlinuz")).unwrap();
    let out = c.ctr(&run_args(RUNTIME, "nokernel", &[], &["true"]));
    let e = text(&out.stderr);
    assert!(
        e.contains("no-such-vmlinuz") && e.contains("make image"),
        "{e}"
    );
    std::fs::write(&c.cocoon_config, good).unwrap();

    // Still healthy for the next container.
    let out = c.ctr(&run_args(RUNTIME, "fine", &[], &["echo", "ok"]));
    assert_eq!(text(&out.stdout), "ok\n", "{}", text(&out.stderr));
    for id in ["nobin", "badann", "typo", "nokernel"] {
        let _ = c.ctr(&["containers", "delete", id]);
    }
    c.assert_clean();
}

/// Pids of this instance's processes whose command line contains `what`.
fn pids_of(c: &Containerd, what: &str) -> Vec<i32> {
    cocoon_tests::pids_mentioning(&c.cocoon_state, what)
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_killed_vm_ends_its_task_and_a_killed_shim_leaves_nothing() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = std::sync::Arc::new(Containerd::start());
    c.import_test_image();
    let mut events = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&c.address)
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Kill QEMU under a running task: the task exits non-zero, with an event, and the shim
    // says why.
    let runner = {
        let c = c.clone();
        std::thread::spawn(move || c.ctr(&run_args(RUNTIME, "victim", &[], &["sleep", "1000"])))
    };
    wait_until("the victim's VM", || {
        !pids_of(&c, "qemu-system").is_empty()
            && c.ctr(&["task", "ls"])
                .stdout
                .windows(7)
                .any(|w| w == b"RUNNING")
    });
    for pid in pids_of(&c, "qemu-system") {
        kill9(pid);
    }
    let out = runner.join().unwrap();
    assert!(
        !out.status.success(),
        "ctr run should fail when its VM dies"
    );
    assert!(
        c.log().contains("pod VM victim died"),
        "the shim did not log the VM's death:\n{}",
        c.log()
    );

    // SIGKILL the shim while a task runs, then `ctr task delete -f`: nothing may be left.
    c.run_detached("orphan", &["sleep", "1000"]);
    kill9(c.shim_pid("orphan"));
    let _ = c.ctr(&["task", "delete", "-f", "orphan"]);
    let _ = c.ctr(&["containers", "delete", "orphan"]);
    let _ = events.kill();
    let ev = text(&events.wait_with_output().unwrap().stdout);
    c.assert_clean();
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            ev.lines()
                .any(|l| l.contains(topic) && l.contains("victim")),
            "no {topic} event for victim:\n{ev}"
        );
    }
}

/// containerd 2.x asks a shim for its features (`<shim> -info`); CRI reports a handler's
/// recursive read-only support from them. Checked through containerd itself
/// (`ctr plugins inspect-runtime`, which 1.x lacks: skipped there, saying so).
#[tokio::test]
async fn containerd_reads_the_shims_features() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let c = Containerd::start();
    if !c
        .ctr(&["plugins", "inspect-runtime", "--help"])
        .status
        .success()
    {
        eprintln!("skipped: this containerd has no runtime introspection (2.x has)");
        return;
    }
    let out = c.ctr(&["plugins", "inspect-runtime", "--runtime", RUNTIME]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), c.log());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Name"], RUNTIME);
    let opts = info["Features"]["mountOptions"].as_array().unwrap();
    assert!(opts.iter().any(|o| o == "rro"), "{info}");
    assert_eq!(
        info["Features"]["linux"]["mountExtensions"]["idmap"]["enabled"],
        false
    );
    c.assert_clean();
}
