//! Kubernetes pods through containerd's CRI plugin, driven by a Rust CRI client the way kubelet
//! drives it: one VM per pod, several containers in it, and stop + remove that always work.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use cocoon_tests::cri::{ContainerSpec, Cri, HANDLER};
use cocoon_tests::{gate, pids_mentioning, processes_mentioning, Need};

/// Pids of this containerd's processes whose command line contains `what`.
fn pids_of(cri: &Cri, what: &str) -> Vec<i32> {
    pids_mentioning(&cri.containerd.cocoon_state, what)
}

/// A private CRI containerd with one Cocoon pod whose one container sleeps.
async fn sleeping_pod(name: &str) -> (Cri, String) {
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod(name, HANDLER).await;
    let app = ContainerSpec {
        name: "app",
        command: &["sleep", "1000"],
    };
    cri.start_container(&pod, &config, app).await;
    (cri, pod)
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plain HTTP GET from the host; the body, or why not.
fn http_get(ip: &str, port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = format!("{ip}:{port}");
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// An HTTP GET through CRI PortForward, retried while the forward isn't there yet (a server
/// that just started, or a mirror that hasn't seen it); the last result after 60 s.
async fn forward_get(cri: &mut Cri, pod: &str, port: u16, want: &str) -> String {
    let t0 = Instant::now();
    loop {
        let got = cri
            .port_forward(pod, port, b"GET / HTTP/1.0\r\n\r\n")
            .await
            .map(|f| format!("{}{}", String::from_utf8_lossy(&f.data), f.error));
        match got {
            Ok(text) if text.contains(want) => return text,
            other if t0.elapsed() > Duration::from_secs(60) => {
                panic!(
                    "PortForward {port}: {other:?}\ncontainerd log:\n{}",
                    cri.containerd.log()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// A tmpfs at kubelet's emptyDir path under `root`, as kubelet makes one for `medium: Memory`
/// with a `sizeLimit` of [`MEMORY_DIR_SIZE`]; unmounted on drop.
struct MemoryEmptyDir(std::path::PathBuf);

const MEMORY_DIR_SIZE: u64 = 8 << 20;

impl MemoryEmptyDir {
    fn new(root: &std::path::Path) -> Self {
        let dir = root.join("pods/uid-web/volumes/kubernetes.io~empty-dir/cache");
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={MEMORY_DIR_SIZE}").as_str()),
        )
        .unwrap();
        MemoryEmptyDir(dir)
    }
}

impl Drop for MemoryEmptyDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

const WEB: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && echo hello-from-pod > /www/index.html && echo web-says-hello && exec httpd -f -p 8080 -h /www",
];

#[tokio::test]
async fn a_pod_of_two_containers_shares_one_vm_its_network_and_stops_cleanly() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("web", HANDLER).await;
    // kubelet's emptyDir with medium Memory: a tmpfs on the host at kubelet's path, mounted
    // into both containers.
    let kubelet = tempfile::tempdir().unwrap();
    let memory_dir = MemoryEmptyDir::new(kubelet.path());
    let cache = || k8s_cri::v1::Mount {
        container_path: "/cache".into(),
        host_path: memory_dir.0.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let web = cri
        .try_start_container_with(
            &pod,
            &config,
            ContainerSpec {
                name: "web",
                command: WEB,
            },
            vec![cache()],
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
    // A kubelet volume (a host directory, as hostPath or emptyDir on disk are) in the side
    // container.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("from-host"), "host-data\n").unwrap();
    let side = cri
        .try_start_container_with(
            &pod,
            &config,
            ContainerSpec {
                name: "side",
                command: &["sleep", "1000"],
            },
            vec![
                k8s_cri::v1::Mount {
                    container_path: "/data".into(),
                    host_path: volume.path().to_string_lossy().into_owned(),
                    ..Default::default()
                },
                cache(),
            ],
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
    assert_eq!(pids_of(&cri, "qemu-system").len(), 1, "one VM for the pod");

    // The files containerd prepares for every container, and the volume, both ways.
    let (code, files, err) = cri
        .exec_sync(
            &side,
            &[
                "sh",
                "-c",
                "cat /etc/hostname /data/from-host; grep -c localhost /etc/hosts; \
                           echo from-pod > /data/from-pod; cat /etc/resolv.conf",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let mut lines = files.lines();
    assert_eq!(lines.next(), Some("web"), "/etc/hostname:\n{files}");
    assert_eq!(lines.next(), Some("host-data"), "{files}");
    assert!(
        lines.next().is_some_and(|n| n != "0"),
        "/etc/hosts:\n{files}"
    );
    let resolv: Vec<&str> = lines.collect();
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert_eq!(
        resolv,
        host_resolv.lines().collect::<Vec<_>>(),
        "/etc/resolv.conf"
    );
    assert_eq!(
        std::fs::read_to_string(volume.path().join("from-pod")).unwrap(),
        "from-pod\n"
    );

    // The pod's /dev/shm: one guest tmpfs that its containers share.
    let (code, _, err) = cri
        .exec_sync(&web, &["sh", "-c", "echo shm-data > /dev/shm/x"])
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, shm, _) = cri
        .exec_sync(
            &side,
            &["sh", "-c", "cat /dev/shm/x; grep ' /dev/shm ' /proc/mounts"],
        )
        .await;
    assert!(
        shm.starts_with("shm-data\n") && shm.contains("tmpfs"),
        "/dev/shm in the other container:\n{shm}"
    );

    // The memory emptyDir: one guest tmpfs for the pod; nothing of it lands on the host's.
    let (code, _, err) = cri
        .exec_sync(&web, &["sh", "-c", "echo in-memory > /cache/x"])
        .await;
    assert_eq!(code, 0, "{err}");
    let (_, mem, _) = cri
        .exec_sync(
            &side,
            &[
                "sh",
                "-c",
                "cat /cache/x; grep ' /cache ' /proc/mounts; \
                 set -- $(stat -f -c '%b %S' /cache); echo size=$(($1*$2))",
            ],
        )
        .await;
    assert!(
        mem.starts_with("in-memory\n") && mem.contains("tmpfs"),
        "/cache in the other container:\n{mem}"
    );
    assert!(
        mem.contains(&format!("size={MEMORY_DIR_SIZE}\n")),
        "the guest tmpfs has the volume's sizeLimit:\n{mem}"
    );
    assert!(
        std::fs::read_dir(&memory_dir.0).unwrap().next().is_none(),
        "the memory emptyDir's data stays in the VM"
    );

    // Both containers answer, with their exit codes, in the same guest.
    let (code, out, _) = cri
        .exec_sync(&web, &["sh", "-c", "echo in-web; exit 3"])
        .await;
    assert_eq!((code, out.trim()), (3, "in-web"));
    let (code, kernel, _) = cri.exec_sync(&side, &["uname", "-r"]).await;
    assert_eq!(code, 0);
    assert!(
        kernel.trim().ends_with("-cloud-amd64"),
        "guest kernel: {kernel:?}"
    );

    // The container's output is in its CRI log file.
    let log = cri.log_dir("web").join("web.log");
    wait_for("web's CRI log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("web-says-hello"))
    })
    .await;

    // The pod's identity: its IP on the guest's interface, its hostname in every container.
    let ip = cri.pod_ip(&pod).await;
    assert!(ip.starts_with("10.231."), "pod IP from CNI: {ip:?}");
    let (_, addrs, _) = cri.exec_sync(&side, &["ip", "-4", "addr"]).await;
    assert!(
        addrs.contains(&format!("inet {ip}/24")),
        "ip addr in the pod:\n{addrs}"
    );
    for c in [&web, &side] {
        let (_, host, _) = cri.exec_sync(c, &["hostname"]).await;
        assert_eq!(host.trim(), "web");
    }

    // The server answers the host at the pod IP, and the other container on 127.0.0.1.
    let got = http_get(&ip, 8080);
    assert!(
        got.as_ref().is_ok_and(|b| b.contains("hello-from-pod")),
        "host -> pod {ip}:8080: {got:?}"
    );
    let (code, body, err) = cri
        .exec_sync(&side, &["wget", "-qO-", "http://127.0.0.1:8080/"])
        .await;
    assert_eq!((code, body.trim()), (0, "hello-from-pod"), "{err}");

    // CRI PortForward (kubectl port-forward) reaches it, and a server that listens on
    // 127.0.0.1 only, as under runc; a port nobody listens on fails on the error channel.
    forward_get(&mut cri, &pod, 8080, "hello-from-pod").await;
    let (code, _, err) = cri
        .exec_sync(
            &side,
            &[
                "sh",
                "-c",
                "mkdir -p /lo && echo loopback-only > /lo/index.html && httpd -p 127.0.0.1:9090 -h /lo",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    forward_get(&mut cri, &pod, 9090, "loopback-only").await;
    let none = cri.port_forward(&pod, 9999, b"hello").await.unwrap();
    assert!(
        none.data.is_empty() && none.error.contains("9999"),
        "forward to a closed port: {none:?}"
    );

    // A second pod reaches it by IP. It asks for resources (kubelet sends the pod's totals,
    // containerd puts them on the sandbox) and a net.* sysctl.
    let mut client_config = cri.pod_config("client");
    let linux = client_config.linux.get_or_insert_with(Default::default);
    linux.resources = Some(k8s_cri::v1::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 100_000,
        memory_limit_in_bytes: 256 << 20,
        ..Default::default()
    });
    linux
        .sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "1000".into());
    let (other, other_config) = cri.run_pod_with(client_config, HANDLER).await;
    let client = cri
        .start_container(
            &other,
            &other_config,
            ContainerSpec {
                name: "client",
                command: &["sleep", "1000"],
            },
        )
        .await;
    let url = format!("http://{ip}:8080/");
    let (code, body, err) = cri.exec_sync(&client, &["wget", "-qO-", &url]).await;
    assert_eq!((code, body.trim()), (0, "hello-from-pod"), "{err}");
    // Its VM: the configured overhead (1 vCPU, 256 MiB) plus what the pod asked for.
    let (_, cpus, _) = cri.exec_sync(&client, &["nproc"]).await;
    assert_eq!(cpus.trim(), "2", "vCPUs of a pod with a 1-CPU quota");
    let (_, mem, _) = cri
        .exec_sync(&client, &["head", "-1", "/proc/meminfo"])
        .await;
    let kib: u64 = mem
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .unwrap_or(0);
    assert!(kib > 400 << 10, "a 256 MiB pod gets 256 + 256 MiB: {mem}");
    let (_, port, _) = cri
        .exec_sync(
            &client,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
        )
        .await;
    assert_eq!(
        port.trim(),
        "1000",
        "the pod's net.* sysctl, in its network namespace"
    );

    cri.stop_and_remove_pod(&other).await;
    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

/// The same PortForward client against a runc pod: what Cocoon must match.
#[tokio::test]
async fn port_forward_reaches_a_runc_pod_the_same_way() {
    let Some(_gate) = gate(&[]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let (pod, config) = cri.run_pod("runc-web", "runc").await;
    let app = ContainerSpec {
        name: "web",
        command: WEB,
    };
    cri.start_container(&pod, &config, app).await;
    forward_get(&mut cri, &pod, 8080, "hello-from-pod").await;
    let none = cri.port_forward(&pod, 9999, b"hello").await.unwrap();
    assert!(
        none.data.is_empty() && none.error.contains("9999"),
        "forward to a closed port: {none:?}"
    );
    // No assert_clean: shim sockets live in one host-wide directory, and this test runs beside
    // the ones that hold the VM lock.
    cri.stop_and_remove_pod(&pod).await;
}

/// JVMs and other runtimes size themselves from `/sys/fs/cgroup/memory.max` and `cpu.max`:
/// a CRI container must see its own limits there, as under runc (which on a cgroup v1 host,
/// like this one, shows them in v1's files).
#[tokio::test]
async fn the_cgroup_filesystem_shows_a_containers_own_limits_as_under_runc() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    for handler in [HANDLER, "runc"] {
        let (pod, config) = cri.run_pod(&format!("cg-{handler}"), handler).await;
        let limits = k8s_cri::v1::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            memory_limit_in_bytes: 96 << 20,
            ..Default::default()
        };
        let app = ContainerSpec {
            name: "limited",
            command: &["sleep", "1000"],
        };
        let id = cri
            .try_start_container_with(&pod, &config, app, vec![], Some(limits))
            .await
            .unwrap_or_else(|e| panic!("{e}\ncontainerd log:\n{}", cri.containerd.log()));
        // The guest is cgroup v2; runc here follows the host, which may be v1 (this one is):
        // the same limits, in v1's files.
        let show = "cd /sys/fs/cgroup; if [ -f memory.max ]; then cat memory.max cpu.max; \
                    else cat memory/memory.limit_in_bytes; \
                    echo \"$(cat cpu/cpu.cfs_quota_us) $(cat cpu/cpu.cfs_period_us)\"; fi";
        let (code, out, err) = cri.exec_sync(&id, &["sh", "-c", show]).await;
        assert_eq!(code, 0, "{handler}: {err}");
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [(96u64 << 20).to_string().as_str(), "50000 100000"],
            "{handler}"
        );
        cri.stop_and_remove_pod(&pod).await;
    }
    cri.containerd.assert_clean();
}

/// With `shareProcessNamespace`, a container's init dying does not make the kernel kill the
/// rest of the container; the runtime must (runc's shim does), or the container never finishes
/// exiting and StopPodSandbox waits for good.
#[tokio::test]
async fn a_container_in_a_shared_pid_namespace_stops_with_its_children() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let mut cri = Cri::start().await;
    let mut config = cri.pod_config("shared-pid");
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = k8s_cri::v1::NamespaceMode::Pod.into();
    }
    let (pod, config) = cri.run_pod_with(config, HANDLER).await;
    let parent = cri
        .start_container(
            &pod,
            &config,
            ContainerSpec {
                name: "parent",
                command: &["sh", "-c", "sleep 1000 & sleep 1000 & wait"],
            },
        )
        .await;
    let side = cri
        .start_container(
            &pod,
            &config,
            ContainerSpec {
                name: "side",
                command: &["sleep", "1000"],
            },
        )
        .await;
    // One PID namespace for the pod: the side container sees the parent's children.
    let (_, ps, _) = cri.exec_sync(&side, &["ps", "-o", "args"]).await;
    assert!(
        ps.matches("sleep 1000").count() >= 3,
        "ps in the pod:\n{ps}"
    );

    let stop = cri
        .client
        .stop_container(k8s_cri::v1::StopContainerRequest {
            container_id: parent.clone(),
            timeout: 0,
        });
    let stopped = tokio::time::timeout(Duration::from_secs(60), stop).await;
    assert!(
        matches!(stopped, Ok(Ok(_))),
        "StopContainer of a parent in a shared PID namespace: {stopped:?}"
    );
    let (_, ps, _) = cri.exec_sync(&side, &["ps", "-o", "args"]).await;
    assert_eq!(
        ps.matches("sleep 1000").count(),
        1,
        "only the side container's sleep is left:\n{ps}"
    );
    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

#[tokio::test]
async fn a_pod_whose_vm_was_killed_still_stops_and_is_removed() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (mut cri, pod) = sleeping_pod("doomed").await;
    let qemu = pids_of(&cri, "qemu-system");
    assert_eq!(qemu.len(), 1, "one VM for the pod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("QEMU to go", || pids_of(&cri, "qemu-system").is_empty()).await;

    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

#[tokio::test]
async fn a_sigtermed_shim_tears_its_pod_down_and_exits() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (mut cri, pod) = sleeping_pod("term").await;
    let shim = pids_mentioning(cri.containerd.dir.path(), "containerd-shim-cocoon-v2");
    assert_eq!(shim.len(), 1, "one shim for the pod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim[0]),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The shim goes by itself, and takes its VM with it.
    wait_for("the shim to exit on SIGTERM", || {
        processes_mentioning(cri.containerd.dir.path())
            .iter()
            .all(|p| !p.contains("containerd-shim-cocoon-v2") && !p.contains("qemu-system"))
    })
    .await;
    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
}

/// The pod VM's host processes are accounted as runc accounts the pod's containers: they join
/// the sandbox's cgroup below the pod's cgroup parent (so the pod's limits bind them), and they
/// are never harder to OOM-kill than the pod's most killable container. Before, QEMU stayed in
/// containerd's cgroup with containerd's `oom_score_adj` (-998 on Debian). The cgroup goes with
/// the pod.
#[tokio::test]
async fn the_pod_vm_sits_in_the_pods_cgroup_with_its_containers_oom_score() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let parent = format!("/cocoon-test-pods/pod-{}", std::process::id());
    let mut cri = Cri::start().await;
    let mut config = cri.pod_config("acct");
    config.linux.as_mut().unwrap().cgroup_parent = parent.clone();
    let (pod, config) = cri.run_pod_with(config, HANDLER).await;
    let app = ContainerSpec {
        name: "app",
        command: &["sleep", "1000"],
    };
    let resources = k8s_cri::v1::LinuxContainerResources {
        oom_score_adj: 500,
        ..Default::default()
    };
    cri.try_start_container_with(&pod, &config, app, vec![], Some(resources))
        .await
        .unwrap();
    let vm: Vec<i32> = pids_of(&cri, "")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| {
                ["qemu-system-x86", "virtiofsd", "cloud-hyperviso"].contains(&c.trim())
            })
        })
        .collect();
    assert!(!vm.is_empty(), "no VM processes found");
    for pid in &vm {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let memory = cgroups
            .lines()
            .find(|l| l.contains(":memory:") || l.starts_with("0::"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            memory.contains(&format!("{parent}/{pod}")),
            "pid {pid} is not in the pod's cgroup {parent}/{pod}: {cgroups}"
        );
        let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        assert_eq!(adj.trim(), "500", "pid {pid}'s oom_score_adj");
    }
    cri.stop_and_remove_pod(&pod).await;
    cri.containerd.assert_clean();
    // The sandbox's cgroup went with the pod; the parent is kubelet's (here: the test's).
    for root in [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup",
    ] {
        let sandbox = std::path::Path::new(root)
            .join(parent.trim_start_matches('/'))
            .join(&pod);
        assert!(!sandbox.exists(), "{} was left", sandbox.display());
    }
    cleanup_test_cgroups(&parent);
}

/// Removes the test's cgroup parent (runc and the shim create parents as needed).
fn cleanup_test_cgroups(parent: &str) {
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs: Vec<std::path::PathBuf> = roots
        .flatten()
        .map(|e| e.path())
        .chain([std::path::PathBuf::from("/sys/fs/cgroup")])
        .collect();
    dirs.sort();
    for root in dirs {
        let p = root.join(parent.trim_start_matches('/'));
        let _ = std::fs::remove_dir(&p);
        let _ = p.parent().map(std::fs::remove_dir);
    }
}
