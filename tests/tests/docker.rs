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
