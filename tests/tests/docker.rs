//! `docker run --runtime cocoon` against a private dockerd ≥ 23 (issue #14), with runc as the
//! reference for each behaviour: a container Docker runs under runc runs the same under Cocoon.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::docker::{Docker, ALIAS, DOCKER_IMAGE};
use cocoon_tests::{gate, Gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The test's pass and a daemon with the test image, or `None` (with the reason printed).
async fn docker() -> Option<(Gate, Docker)> {
    let pass = gate(&[Need::selected_guest()]).await?;
    match Docker::start() {
        Ok(d) => {
            d.load_test_image();
            Some((pass, d))
        }
        Err(why) => {
            eprintln!("skipped: no dockerd >= 23 to test with: {why}");
            None
        }
    }
}

/// The runtimes every behaviour is checked under: Cocoon by its daemon.json alias, and runc.
const RUNTIMES: [&str; 2] = [ALIAS, "runc"];

#[tokio::test]
async fn run_options_exit_codes_and_volumes_match_runc() {
    let Some((_pass, d)) = docker().await else {
        return;
    };
    let host = tempfile::tempdir().unwrap();
    let vol = host.path().join("vol");
    let ro = host.path().join("ro");
    std::fs::create_dir(&vol).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("in.txt"), "from-host\n").unwrap();
    // The container runs as uid 1000.
    std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let script = "echo $FOO; pwd; id -u; cat /ro/in.txt; echo $RT > /vol/out-$RT; \
                  (touch /ro/x) 2>/dev/null && echo ro-broken || echo ro-ok; \
                  (touch /etc/x) 2>/dev/null && echo rootfs-writable || echo rootfs-ro; \
                  echo scratch > /scratch/f && cat /scratch/f; \
                  grep -q ' /scratch tmpfs' /proc/mounts && echo tmpfs; \
                  cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; \
                  exit 3";
    let v = format!("{}:/vol", vol.display());
    let m = format!("type=bind,src={},dst=/ro,readonly", ro.display());
    for rt in RUNTIMES {
        let env = format!("RT={rt}");
        let out = d.docker(&[
            "run",
            "--rm",
            "--runtime",
            rt,
            "--network",
            "none",
            "-e",
            "FOO=bar",
            "-e",
            &env,
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "-v",
            &v,
            "--mount",
            &m,
            "--tmpfs",
            "/scratch:mode=1777",
            "--read-only",
            "--memory",
            "64m",
            DOCKER_IMAGE,
            "sh",
            "-c",
            script,
        ]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{rt}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        assert_eq!(
            text(&out.stdout).lines().collect::<Vec<_>>(),
            [
                "bar",
                "/tmp",
                "1000",
                "from-host",
                "ro-ok",
                "rootfs-ro",
                "scratch",
                "tmpfs",
                "67108864"
            ],
            "{rt}"
        );
        assert_eq!(
            std::fs::read_to_string(vol.join(format!("out-{rt}"))).unwrap(),
            format!("{rt}\n")
        );
    }
    // -i: the client's stdin reaches the container's.
    for rt in RUNTIMES {
        let mut cat = d.command();
        cat.args([
            "run",
            "--rm",
            "-i",
            "--runtime",
            rt,
            "--network",
            "none",
            DOCKER_IMAGE,
            "cat",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
        let mut child = cat.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"piped-in\n").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(text(&out.stdout), "piped-in\n", "{rt}: run -i");
    }
    // A VM can't share the host's interfaces: refused, saying so.
    let out = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        ALIAS,
        "--network",
        "host",
        DOCKER_IMAGE,
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("host's network namespace"), "{err}");
    // Nor its IPC namespace: refused at create, naming the field.
    let out = d.docker(&[
        "run",
        "--rm",
        "--runtime",
        ALIAS,
        "--ipc",
        "host",
        DOCKER_IMAGE,
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("linux.namespaces has no \"ipc\" entry") && err.contains("host's ipc"),
        "{err}"
    );
    d.assert_clean();
}

/// The default bridge: the container's address is reachable from the host through the
/// bridge, and `-p` publishing works through docker-proxy, as under runc.
#[tokio::test]
async fn the_default_bridge_and_published_ports_reach_the_container() {
    let Some((_pass, d)) = docker().await else {
        return;
    };
    let serve = "mkdir -p /www && echo hello-$RT > /www/index.html && httpd -f -p 8080 -h /www";
    for (i, rt) in RUNTIMES.into_iter().enumerate() {
        let name = format!("web-{rt}");
        let env = format!("RT={rt}");
        let host_port = 18080 + u16::try_from(i).unwrap();
        let publish = format!("127.0.0.1:{host_port}:8080");
        let out = d.docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime",
            rt,
            "-e",
            &env,
            "-p",
            &publish,
            DOCKER_IMAGE,
            "sh",
            "-c",
            serve,
        ]);
        assert!(
            out.status.success(),
            "{rt}: {}\n{}",
            text(&out.stderr),
            d.log()
        );
        let ip = d.docker(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &name,
        ]);
        let ip = text(&ip.stdout).trim().to_owned();
        assert!(!ip.is_empty(), "{rt}: no address");
        let want = format!("hello-{rt}\n");
        for url in [
            format!("http://{ip}:8080/"),
            format!("http://127.0.0.1:{host_port}/"),
        ] {
            let t0 = Instant::now();
            loop {
                let got = http_get(&url);
                if got.as_deref() == Some(want.as_str()) {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{rt}: {url} answered {got:?}\n{}",
                    d.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let out = d.docker(&["rm", "--force", &name]);
        assert!(out.status.success(), "{rt}: rm: {}", text(&out.stderr));
    }
    d.assert_clean();
}

/// The body of a plain HTTP GET of `url` (`http://host:port/path`), or `None`.
fn http_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (addr, path) = rest.split_once('/')?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1);
    (status == Some("200")).then(|| body.to_owned())
}

/// Waits until `check` holds, for up to `secs`; panics with `what` and the daemon log if not.
fn wait_until(d: &Docker, what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !check() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what} did not happen within {secs} s\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The same lifecycle under each runtime: `-d` with logs, exec (with stdin), `--cpus` seen in
/// the cgroup, pause/unpause, stats, `docker cp` both ways, stop (SIGTERM, caught), start
/// again, kill, and stop of a process that ignores SIGTERM (SIGKILL after the timeout).
#[tokio::test]
async fn a_detached_container_lives_through_docker_commands_as_under_runc() {
    let Some((_pass, d)) = docker().await else {
        return;
    };
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("in.txt"), "copied-in\n").unwrap();
    let ok = |args: &[&str]| -> String {
        let out = d.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        text(&out.stdout)
    };
    let serve = "trap 'echo got-term; exit 0' TERM; echo started; \
                 while true; do sleep 0.1; done";
    for rt in RUNTIMES {
        let name = format!("life-{rt}");
        let n = name.as_str();
        ok(&[
            "run",
            "-d",
            "--name",
            n,
            "--runtime",
            rt,
            "--cpus",
            "0.5",
            DOCKER_IMAGE,
            "sh",
            "-c",
            serve,
        ]);
        wait_until(&d, "the first log line", 60, || {
            text(&d.docker(&["logs", n]).stdout).contains("started")
        });

        // cgroup v2 in the guest; v1 on this host under runc.
        let quota = "if [ -f /sys/fs/cgroup/cpu.max ]; then cut -d' ' -f1 /sys/fs/cgroup/cpu.max; \
                     else cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi";
        assert_eq!(ok(&["exec", n, "sh", "-c", quota]).trim(), "50000", "{rt}");
        let mut echo = d.command();
        echo.args(["exec", "-i", n, "cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = echo.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"through-stdin\n").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(text(&out.stdout), "through-stdin\n", "{rt}: exec -i");

        ok(&["pause", n]);
        assert_eq!(
            ok(&["inspect", "--format", "{{.State.Status}}", n]).trim(),
            "paused"
        );
        ok(&["unpause", n]);
        assert_eq!(
            ok(&["exec", n, "echo", "after-unpause"]).trim(),
            "after-unpause"
        );
        let mem = ok(&["stats", "--no-stream", "--format", "{{.MemUsage}}", n]);
        assert!(
            !mem.trim().is_empty() && !mem.starts_with("0B"),
            "{rt}: stats {mem:?}"
        );

        let src = format!("{}", host.path().join("in.txt").display());
        ok(&["cp", &src, &format!("{n}:/tmp/in.txt")]);
        wait_until(&d, "the copied file in the container", 10, || {
            text(&d.docker(&["exec", n, "cat", "/tmp/in.txt"]).stdout) == "copied-in\n"
        });
        ok(&["exec", n, "sh", "-c", "echo made-inside > /tmp/out.txt"]);
        let dst = host.path().join(format!("out-{rt}.txt"));
        ok(&[
            "cp",
            &format!("{n}:/tmp/out.txt"),
            &dst.display().to_string(),
        ]);
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), "made-inside\n");

        // stop: SIGTERM, which the container catches and exits 0 on.
        let t0 = Instant::now();
        ok(&["stop", "--time", "20", n]);
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{rt}: stop waited for the timeout"
        );
        assert_eq!(
            ok(&["inspect", "--format", "{{.State.ExitCode}}", n]).trim(),
            "0"
        );
        assert!(
            text(&d.docker(&["logs", n]).stdout).contains("got-term"),
            "{rt}"
        );

        // start again (a new task for the same container), restart, then kill.
        ok(&["start", n]);
        let dr = &d;
        let started = |k: usize| {
            move || {
                text(&dr.docker(&["logs", n]).stdout)
                    .matches("started")
                    .count()
                    == k
            }
        };
        wait_until(&d, "the started container's log line", 60, started(2));
        ok(&["restart", "--time", "10", n]);
        wait_until(&d, "the restarted container's log line", 60, started(3));
        ok(&["kill", n]);
        wait_until(&d, "the killed container to stop", 30, || {
            d.docker(&["inspect", "--format", "{{.State.Running}}", n])
                .stdout
                == b"false\n"
        });
        assert_eq!(
            ok(&["inspect", "--format", "{{.State.ExitCode}}", n]).trim(),
            "137"
        );
        ok(&["rm", n]);

        // A process that ignores SIGTERM is killed once the stop timeout passes.
        let stubborn = format!("stubborn-{rt}");
        ok(&[
            "run",
            "-d",
            "--name",
            &stubborn,
            "--runtime",
            rt,
            DOCKER_IMAGE,
            "sh",
            "-c",
            "trap '' TERM; echo up; while true; do sleep 0.1; done",
        ]);
        wait_until(&d, "the stubborn container's log line", 60, || {
            text(&d.docker(&["logs", &stubborn]).stdout).contains("up")
        });
        let t0 = Instant::now();
        ok(&["stop", "--time", "2", &stubborn]);
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(2), "{rt}: stop took {took:?}");
        assert_eq!(
            ok(&["inspect", "--format", "{{.State.ExitCode}}", &stubborn]).trim(),
            "137"
        );
        ok(&["rm", &stubborn]);

        // -t: the process has a terminal.
        let out = ok(&[
            "run",
            "--rm",
            "-t",
            "--runtime",
            rt,
            DOCKER_IMAGE,
            "sh",
            "-c",
            "[ -t 1 ] && echo has-tty",
        ]);
        assert_eq!(out.trim(), "has-tty", "{rt}");
    }
    d.assert_clean();
}

/// A user-defined network: containers find each other by name through Docker's embedded DNS
/// (127.0.0.11 in each container's netns on the host, relayed into the guest by the shim).
#[tokio::test]
async fn containers_on_a_user_defined_network_find_each_other_by_name() {
    let Some((_pass, d)) = docker().await else {
        return;
    };
    let serve = "mkdir -p /www && echo hello-$RT > /www/index.html && httpd -f -p 8080 -h /www";
    for (i, rt) in RUNTIMES.into_iter().enumerate() {
        let net = format!("net-{rt}");
        let n = (std::process::id() + 7 * u32::try_from(i).unwrap()) % 200 + 20;
        let subnet = format!("10.234.{n}.0/24");
        let out = d.docker(&["network", "create", "--subnet", &subnet, &net]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let srv = format!("srv-{rt}");
        let env = format!("RT={rt}");
        let out = d.docker(&[
            "run",
            "-d",
            "--name",
            &srv,
            "--network",
            &net,
            "--runtime",
            rt,
            "-e",
            &env,
            DOCKER_IMAGE,
            "sh",
            "-c",
            serve,
        ]);
        assert!(
            out.status.success(),
            "{rt}: {}\n{}",
            text(&out.stderr),
            d.log()
        );
        // busybox's nc resolves the name (its static wget crashes on this image).
        let fetch = format!(
            "for i in $(seq 1 100); do \
             got=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {srv} 8080 2>/dev/null | tail -n 1); \
             [ -n \"$got\" ] && echo \"$got\" && exit 0; sleep 0.2; done; \
             nslookup {srv}; cat /etc/resolv.conf; exit 1"
        );
        let out = d.docker(&[
            "run",
            "--rm",
            "--network",
            &net,
            "--runtime",
            rt,
            DOCKER_IMAGE,
            "sh",
            "-c",
            &fetch,
        ]);
        assert!(
            out.status.success(),
            "{rt}: {}{}\n{}",
            text(&out.stdout),
            text(&out.stderr),
            d.log()
        );
        assert_eq!(text(&out.stdout), format!("hello-{rt}\n"));
        for args in [
            vec!["rm", "--force", srv.as_str()],
            vec!["network", "rm", net.as_str()],
        ] {
            let out = d.docker(&args);
            assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        }
    }
    d.assert_clean();
}
