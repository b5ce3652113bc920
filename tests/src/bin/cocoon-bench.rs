//! `make bench`: Cocoon side by side with runc and gVisor (runsc), same image, same commands,
//! same machine, one run. Prints a table and writes target/bench/results.{json,md}.
//!
//! Figures: cold `ctr run --rm … true`, Cocoon's phases (from the shim's log timestamps) and
//! the bare boot-to-init floor, exec latency, stdout throughput, host PSS per idle pod, and
//! 10 pods started at once, and Cocoon's start from a VM template against a kernel boot
//! (`template_bench`), and I/O on a volume and on the root filesystem (`volume_bench`).
//! BENCH_RUNS sets the sample count (default 10); BENCH_ONLY=template,
//! cri, docker, volumes or rootfs runs one part. BENCH_COCOON_TOML adds lines to the Cocoon
//! config of the run (an A/B by hand, e.g. `rootfs.mode = "virtio-fs"`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark aborts on a broken setup

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::stats::summary;
use cocoon_tests::template_bench::remove;
use cocoon_tests::volume_bench::Target;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
struct Runtime {
    name: &'static str,
    args: Vec<String>,
}

fn runtimes(dir: &Path) -> Vec<Runtime> {
    let mut v = vec![
        Runtime {
            name: "cocoon",
            args: vec!["--runtime".into(), RUNTIME.into()],
        },
        Runtime {
            name: "runc",
            args: vec!["--runtime".into(), "io.containerd.runc.v2".into()],
        },
    ];
    if which("runsc") {
        // gVisor refuses the host network namespace; run it with networking off.
        let w = dir.join("runsc-nonet");
        std::fs::write(&w, "#!/bin/sh\nexec runsc --network=none \"$@\"\n").unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        v.push(Runtime {
            name: "gvisor",
            args: vec![
                "--runtime".into(),
                "io.containerd.runc.v2".into(),
                "--runc-binary".into(),
                w.display().to_string(),
            ],
        });
    } else {
        println!("gVisor: skipped (runsc is not installed; `apt-get install runsc`)");
    }
    v
}

fn which(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(bin).is_file())
}

fn ctr(c: &Containerd, rt: &Runtime, pre: &[&str], post: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = pre.iter().map(|s| (*s).to_owned()).collect();
    args.extend(rt.args.iter().cloned());
    args.extend(post.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ctr(&refs)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cold_start(c: &Containerd, rt: &Runtime, runs: usize) -> Vec<f64> {
    (0..runs)
        .map(|i| {
            let id = format!("cold-{}-{i}", rt.name);
            let t0 = Instant::now();
            let out = ctr(c, rt, &["run", "--rm"], &[IMAGE, &id, "true"]);
            assert!(
                out.status.success(),
                "{} cold start: {}",
                rt.name,
                String::from_utf8_lossy(&out.stderr)
            );
            ms(t0.elapsed())
        })
        .collect()
}

fn exec_latency(c: &Containerd, rt: &Runtime, runs: usize) -> Vec<f64> {
    let id = format!("exec-{}", rt.name);
    let out = ctr(c, rt, &["run", "-d"], &[IMAGE, &id, "sleep", "100000"]);
    assert!(
        out.status.success(),
        "{}: {}",
        rt.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let v = (0..runs)
        .map(|i| {
            let t0 = Instant::now();
            let out = c.ctr(&["task", "exec", "--exec-id", &format!("e{i}"), &id, "true"]);
            assert!(
                out.status.success(),
                "{} exec: {}",
                rt.name,
                String::from_utf8_lossy(&out.stderr)
            );
            ms(t0.elapsed())
        })
        .collect();
    remove(c, &id);
    v
}

/// MB/s of 256 MiB from `dd` in the container to the host through ctr's stdout.
fn stdout_throughput(c: &Containerd, rt: &Runtime, runs: usize) -> Vec<f64> {
    (0..runs)
        .map(|i| {
            let mut args = vec![
                "--address".to_owned(),
                c.address.display().to_string(),
                "run".into(),
                "--rm".into(),
            ];
            args.extend(rt.args.iter().cloned());
            args.extend([
                IMAGE.into(),
                format!("dd-{}-{i}", rt.name),
                "dd".into(),
                "if=/dev/zero".into(),
                "bs=1M".into(),
                "count=256".into(),
            ]);
            let t0 = Instant::now();
            let mut child = Command::new("ctr")
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut out = child.stdout.take().unwrap();
            let n = std::io::copy(&mut out, &mut std::io::sink()).unwrap();
            assert!(child.wait().unwrap().success());
            assert_eq!(n, 256 << 20, "{}: short stdout", rt.name);
            (n as f64 / 1e6) / t0.elapsed().as_secs_f64()
        })
        .collect()
}

/// `n` idle pods, each with a guest of `memory_mib` (set through the pod annotation).
fn idle_pods(c: &Containerd, n: usize, memory_mib: u32) -> Value {
    let mut args = vec!["--runtime".to_owned(), RUNTIME.into()];
    args.extend([
        "--annotation".into(),
        format!("io.cocoon.vm.memory_mib={memory_mib}"),
    ]);
    let cocoon = Runtime {
        name: "cocoon",
        args,
    };
    let ids: Vec<String> = (0..n)
        .map(|i| format!("idle-{memory_mib}-{n}-{i}"))
        .collect();
    for id in &ids {
        let out = ctr(c, &cocoon, &["run", "-d"], &[IMAGE, id, "sleep", "100000"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let by = cocoon_tests::template_bench::cocoon_pss(c);
    let shim_rss = cocoon_tests::processes_mentioning(c.dir.path())
        .iter()
        .filter(|p| p.contains("containerd-shim-cocoon"))
        .filter_map(|p| {
            let pid = p.split(':').next()?;
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()?
                .lines()
                .find_map(|l| {
                    l.strip_prefix("VmRSS:")
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                })
        })
        .max()
        .unwrap_or(0);
    for id in &ids {
        remove(c, id);
    }
    let total: u64 = by.values().sum();
    json!({
        "pods": n,
        "guest_memory_mib": memory_mib,
        "pss_total_mib": total as f64 / 1024.0,
        "pss_per_pod_mib": total as f64 / 1024.0 / n as f64,
        "pss_by_process_mib_per_pod": by.iter().map(|(k, v)| (k.to_string(), json!(*v as f64 / 1024.0 / n as f64))).collect::<serde_json::Map<_, _>>(),
        "shim_rss_max_mib": shim_rss as f64 / 1024.0,
    })
}

fn density(c: &std::sync::Arc<Containerd>, rt: &Runtime, n: usize) -> Value {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            let rt = rt.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let out = ctr(
                    &c,
                    &rt,
                    &["run", "-d"],
                    &[IMAGE, &format!("dense-{}-{i}", rt.name), "sleep", "100000"],
                );
                (
                    out.status.success(),
                    ms(t.elapsed()),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let all = ms(t0.elapsed());
    let ok = results.iter().filter(|r| r.0).count();
    for r in results.iter().filter(|r| !r.0) {
        println!("  density failure ({}): {}", rt.name, r.2.trim());
    }
    for i in 0..n {
        remove(c, &format!("dense-{}-{i}", rt.name));
    }
    let times: Vec<f64> = results.iter().map(|r| r.1).collect();
    let mut s = times.clone();
    s.sort_by(f64::total_cmp);
    json!({"pods": n, "succeeded": ok, "all_ready_ms": all, "p50_ms": s[s.len() / 2], "p99_ms": s[s.len() - 1]})
}

/// Boot-to-init of the same kernel and initramfs with /init powering off at once.
fn bare_floor(runs: usize) -> Vec<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (0..runs)
        .map(|i| {
            rt.block_on(async {
                let state = tempfile::tempdir().unwrap();
                let mut cfg = cocoon_tests::test_config(state.path());
                // The floor is a kernel boot: never a VM template.
                cfg.vm.template = vmm_driver::config::TemplateMode::Off;
                let mut spec = vmm_driver::VmSpec::from_config(&cfg, &format!("floor{i}"));
                spec.kernel_params = vec!["cocoon.mode=bare".into()];
                let t0 = Instant::now();
                let mut vm = vmm_driver::launch(&cfg, &spec).await.unwrap();
                let console = vm.console_log();
                let mut at = None;
                while t0.elapsed() < Duration::from_secs(60) {
                    if std::fs::read_to_string(&console)
                        .unwrap_or_default()
                        .contains("bare boot: init reached")
                    {
                        at = Some(t0.elapsed());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                vm.wait_exit(Duration::from_secs(30)).await;
                vm.stop().await.unwrap();
                ms(at.expect("bare guest never reached /init"))
            })
        })
        .collect()
}

fn kvm_or_tcg() -> String {
    let host = vmm_driver::accel::HostFacts::probe();
    match vmm_driver::accel::choose(vmm_driver::config::Accel::Auto, &host) {
        Ok((c, why)) => format!("{c:?} ({why})"),
        Err(e) => e.to_string(),
    }
}

/// Appends `BENCH_COCOON_TOML` (dotted keys) to the run's Cocoon config.
fn with_extra_config(c: &Containerd) {
    if let Ok(extra) = std::env::var("BENCH_COCOON_TOML") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&c.cocoon_config)
            .unwrap();
        writeln!(f, "{extra}").unwrap();
        println!("cocoon config + {extra}");
    }
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let out_dir =
        PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench".into()));
    std::fs::create_dir_all(&out_dir).unwrap();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("volumes") {
        let c = Containerd::start();
        c.import_test_image();
        let r = volumes(&c, &runtimes(c.dir.path()), runs.clamp(1, 3));
        println!("{}", cocoon_tests::volume_bench::markdown(&r));
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("rootfs") {
        let c = Containerd::start();
        with_extra_config(&c);
        let r = rootfs_io(&c, &runtimes(c.dir.path()), runs.clamp(1, 3));
        println!("{}", cocoon_tests::volume_bench::rootfs_markdown(&r));
        let l = cocoon_tests::layer_bench::figures(&c, runs.clamp(1, 3));
        println!("layer_images: {l}");
        println!("{}", cocoon_tests::layer_bench::markdown(&l));
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("docker") {
        let r = cocoon_tests::docker_bench::figures(runs.clamp(1, 5));
        println!("{}", cocoon_tests::docker_bench::markdown(&r));
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("template") {
        let c = std::sync::Arc::new(Containerd::start());
        c.import_test_image();
        let r = cocoon_tests::template_bench::figures(&c, runs);
        println!("{}", cocoon_tests::template_bench::markdown(&r));
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("cri") {
        let cri = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(cocoon_tests::cri_bench::figures(runs.clamp(1, 5)));
        println!("{}", cocoon_tests::cri_bench::markdown(&cri));
        return;
    }
    let c = std::sync::Arc::new(Containerd::start());
    with_extra_config(&c);
    c.import_test_image();
    let rts = runtimes(c.dir.path());
    let machine = format!(
        "{} cores, {} MiB, host kernel {}, accel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024,
        nix::sys::utsname::uname()
            .unwrap()
            .release()
            .to_string_lossy(),
        kvm_or_tcg()
    );
    println!("machine: {machine}\nruns per figure: {runs}");

    let mut res = serde_json::Map::new();
    let mut cold = serde_json::Map::new();
    let mut exec = serde_json::Map::new();
    let mut tput = serde_json::Map::new();
    let mut dens = serde_json::Map::new();
    let mut cold_samples = vec![];
    // First, so that the template exists before the other figures (the default path).
    println!("VM template against kernel boot…");
    res.insert(
        "template".into(),
        cocoon_tests::template_bench::figures(&c, runs),
    );
    for rt in &rts {
        println!("{}: cold start…", rt.name);
        let v = cold_start(&c, rt, runs);
        cold.insert(rt.name.into(), summary(&v));
        cold_samples.push((rt.name, v));
    }
    let phase_summary = cocoon_tests::phases::phases(&c.log(), "cold-cocoon", runs);
    res.insert("cocoon_phases_ms".into(), phase_summary.clone());
    println!("bare boot floor…");
    let floor = summary(&bare_floor(runs));
    res.insert("bare_boot_to_init_ms".into(), floor.clone());
    let png = out_dir.join("start.png");
    match cocoon_tests::bench_chart::chart(
        &png,
        &cold_samples,
        &phase_summary,
        floor["median"].as_f64().unwrap_or(0.0),
    ) {
        Ok(()) => println!("wrote {}", png.display()),
        Err(e) => println!("chart not drawn: {e}"),
    }
    for rt in &rts {
        println!("{}: exec, stdout, density…", rt.name);
        exec.insert(rt.name.into(), summary(&exec_latency(&c, rt, runs)));
        tput.insert(
            rt.name.into(),
            summary(&stdout_throughput(&c, rt, 3.min(runs))),
        );
        dens.insert(rt.name.into(), density(&c, rt, 10));
    }
    println!("idle pod memory…");
    let cfg = vmm_driver::Config::default();
    res.insert(
        "idle_pod_memory".into(),
        json!([
            idle_pods(&c, 1, cfg.vm.memory_mib),
            idle_pods(&c, 10, cfg.vm.memory_mib),
            // The size the memory goal is stated for.
            idle_pods(&c, 1, 128),
        ]),
    );
    println!("CRI pods (cocoon, runc, gVisor)…");
    // A broken CRI set-up costs its figures, not the whole run's.
    let cri = std::panic::catch_unwind(|| {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(cocoon_tests::cri_bench::figures(runs.clamp(1, 5)))
    })
    .unwrap_or_else(|_| json!({"error": "the CRI figures panicked; see the output above"}));
    res.insert("cri".into(), cri);
    println!("volume I/O…");
    res.insert("volumes".into(), volumes(&c, &rts, runs.clamp(1, 3)));
    println!("root filesystem I/O…");
    res.insert("rootfs_io".into(), rootfs_io(&c, &rts, runs.clamp(1, 3)));
    // After rootfs_io, which imported the bench image.
    res.insert(
        "layer_images".into(),
        cocoon_tests::layer_bench::figures(&c, runs.clamp(1, 3)),
    );
    println!("docker run…");
    let docker = std::panic::catch_unwind(|| cocoon_tests::docker_bench::figures(runs.clamp(1, 5)))
        .unwrap_or_else(|_| json!({"error": "the Docker figures panicked; see the output above"}));
    res.insert("docker".into(), docker);
    res.insert("cold_start_ms".into(), cold.into());
    res.insert("exec_ms".into(), exec.into());
    res.insert("stdout_mb_per_s".into(), tput.into());
    res.insert("density_10_pods".into(), dens.into());
    res.insert(
        "guest".into(),
        json!({"vcpus": cfg.vm.vcpus, "memory_mib": cfg.vm.memory_mib}),
    );
    res.insert("machine".into(), json!(machine));
    let res = Value::Object(res);
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&res).unwrap(),
    )
    .unwrap();
    let md = markdown(&res);
    std::fs::write(out_dir.join("results.md"), &md).unwrap();
    println!(
        "\n{md}\nwrote {}/results.json and results.md",
        out_dir.display()
    );
}

/// Volume I/O for every runtime, and for Cocoon under each other `virtiofs_cache` mode (the
/// shim reads its config at each boot, so the bench rewrites it between runs).
fn volumes(c: &Containerd, rts: &[Runtime], runs: usize) -> Value {
    let vol = c.dir.path().join("bench-volume");
    std::fs::create_dir_all(&vol).unwrap();
    cocoon_tests::volume_bench::make_archive(&vol).unwrap();
    let mut out = serde_json::Map::new();
    for rt in rts {
        let name = if rt.name == "cocoon" {
            "cocoon (virtiofs_cache=auto, default)".to_owned()
        } else {
            rt.name.to_owned()
        };
        let v = cocoon_tests::volume_bench::figures(
            c,
            &format!("vol-{}", rt.name),
            &rt.args,
            Target::Volume(&vol),
            runs,
        );
        println!("volumes {name}: {v}");
        out.insert(name, v);
    }
    let config = c.dir.path().join("cocoon.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    for mode in ["never", "metadata", "always"] {
        std::fs::write(&config, format!("{original}virtiofs_cache = \"{mode}\"\n")).unwrap();
        let v = cocoon_tests::volume_bench::figures(
            c,
            &format!("vol-cocoon-{mode}"),
            &rts[0].args,
            Target::Volume(&vol),
            runs,
        );
        println!("volumes cocoon {mode}: {v}");
        out.insert(format!("cocoon (virtiofs_cache={mode})"), v);
    }
    std::fs::write(&config, original).unwrap();
    Value::Object(out)
}

/// I/O on the container's own root filesystem for every runtime (`rootfs_io`, issue #29):
/// keyed by runtime name (cocoon, runc, gvisor), like the issue asks.
fn rootfs_io(c: &Containerd, rts: &[Runtime], runs: usize) -> Value {
    let layout = c.dir.path().join("bench-image.tar");
    cocoon_tests::volume_bench::build_bench_image(&layout);
    let out = c.ctr(&["images", "import", &layout.to_string_lossy()]);
    if !out.status.success() {
        return json!({"error": String::from_utf8_lossy(&out.stderr).trim()});
    }
    let mut res = serde_json::Map::new();
    for rt in rts {
        let v = cocoon_tests::volume_bench::figures(
            c,
            &format!("rootfs-{}", rt.name),
            &rt.args,
            Target::Rootfs,
            runs,
        );
        println!("rootfs_io {}: {v}", rt.name);
        res.insert(rt.name.to_owned(), v);
    }
    Value::Object(res)
}

fn markdown(r: &Value) -> String {
    let f = |v: &Value| format!("{:.0}", v.as_f64().unwrap_or(f64::NAN));
    let row = |name: &str, v: &Value| {
        format!(
            "| {name} | {} | {} | {} |\n",
            f(&v["median"]),
            f(&v["p90"]),
            f(&v["min"])
        )
    };
    let mut s = format!(
        "Machine: {}. Guest: {} vCPU, {} MiB.\n\n",
        r["machine"].as_str().unwrap_or(""),
        r["guest"]["vcpus"],
        r["guest"]["memory_mib"]
    );
    s += "| cold `ctr run --rm … true` (ms) | median | p90 | min |\n|---|---|---|---|\n";
    for (k, v) in r["cold_start_ms"].as_object().into_iter().flatten() {
        s += &row(k, v);
    }
    s += &row(
        "bare boot-to-init floor (Cocoon's kernel+initramfs)",
        &r["bare_boot_to_init_ms"],
    );
    s += "\n| Cocoon phase (ms, from shim log) | median | p90 | min |\n|---|---|---|---|\n";
    for (k, v) in r["cocoon_phases_ms"].as_object().into_iter().flatten() {
        s += &row(k, v);
    }
    s += "\n| `ctr task exec … true` (ms) | median | p90 | min |\n|---|---|---|---|\n";
    for (k, v) in r["exec_ms"].as_object().into_iter().flatten() {
        s += &row(k, v);
    }
    s += "\n| stdout, 256 MiB from dd (MB/s) | median | p90 | min |\n|---|---|---|---|\n";
    for (k, v) in r["stdout_mb_per_s"].as_object().into_iter().flatten() {
        s += &row(k, v);
    }
    s += "\n| 10 pods at once | succeeded | all ready (ms) | p50 (ms) | p99 (ms) |\n|---|---|---|---|---|\n";
    for (k, v) in r["density_10_pods"].as_object().into_iter().flatten() {
        s += &format!(
            "| {k} | {}/10 | {} | {} | {} |\n",
            v["succeeded"],
            f(&v["all_ready_ms"]),
            f(&v["p50_ms"]),
            f(&v["p99_ms"])
        );
    }
    s += "\n### VM template against kernel boot\n\n";
    s += &cocoon_tests::template_bench::markdown(&r["template"]);
    s += &cocoon_tests::cri_bench::markdown(&r["cri"]);
    s += &cocoon_tests::volume_bench::markdown(&r["volumes"]);
    s += &cocoon_tests::volume_bench::rootfs_markdown(&r["rootfs_io"]);
    s += &cocoon_tests::layer_bench::markdown(&r["layer_images"]);
    s += &cocoon_tests::docker_bench::markdown(&r["docker"]);
    s += "\n| Cocoon idle pods | guest memory (MiB) | PSS per pod, plus guest RAM no process maps (MiB) | by process (MiB per pod) | shim RSS (MiB) |\n|---|---|---|---|---|\n";
    for v in r["idle_pod_memory"].as_array().into_iter().flatten() {
        let by: Vec<String> = v["pss_by_process_mib_per_pod"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, x)| format!("{k} {:.1}", x.as_f64().unwrap_or(0.0)))
            .collect();
        s += &format!(
            "| {} | {} | {:.1} | {} | {:.1} |\n",
            v["pods"],
            v["guest_memory_mib"],
            v["pss_per_pod_mib"].as_f64().unwrap_or(0.0),
            by.join(", "),
            v["shim_rss_max_mib"].as_f64().unwrap_or(0.0)
        );
    }
    s
}
