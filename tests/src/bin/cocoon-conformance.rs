//! `make conformance`: critest (the CRI validation suite) against runc and Cocoon side by side,
//! offline. One private containerd with CRI serves both handlers; the images critest pulls are
//! built locally and served by a registry on loopback under their upstream names.
//!
//!   cocoon-conformance --critest BIN --registry BIN --parts ROOT [--out DIR]
//!                      [--handlers runc,cocoon] [--focus REGEX] [--skip REGEX]...
//!
//! `--images DIR` only writes the image layouts there (for `ctr images import`) and lists
//! them. Writes DIR/<handler>.json (ginkgo's report), DIR/<handler>.log, DIR/summary.md and
//! DIR/results.json; exits 1 if Cocoon fails a spec runc passes that is not VM-inherent
//! (`conformance::report::VM_INHERENT`). Not part of `make test`: critest comes from a
//! cri-tools checkout, which CI can't fetch, and a full run takes about an hour here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a setup failure aborts the run

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use cocoon_tests::conformance::{self, images, registry::Registry, report};
use cocoon_tests::cri::TestNet;

/// Specs no local setup can pass: the image is pinned by an upstream digest that a locally
/// built image can't have.
const ALWAYS_SKIPPED: &[&str] = &["public image with digest"];

#[derive(Debug)]
struct Args {
    critest: PathBuf,
    registry: PathBuf,
    parts: PathBuf,
    out: PathBuf,
    handlers: Vec<String>,
    focus: Option<String>,
    skip: Vec<String>,
    images_only: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cocoon-conformance --critest BIN --registry BIN --parts ROOT [--out DIR] \
         [--handlers runc,cocoon] [--focus REGEX] [--skip REGEX]...\n       \
         cocoon-conformance --images DIR [--parts ROOT]"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut a = Args {
        critest: PathBuf::new(),
        registry: PathBuf::new(),
        parts: PathBuf::from("/"),
        out: PathBuf::from("target/conformance"),
        handlers: vec!["runc".into(), "cocoon".into()],
        focus: None,
        skip: ALWAYS_SKIPPED.iter().map(|s| s.to_string()).collect(),
        images_only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--critest" => a.critest = value().into(),
            "--registry" => a.registry = value().into(),
            "--parts" => a.parts = value().into(),
            "--out" => a.out = value().into(),
            "--handlers" => a.handlers = value().split(',').map(str::to_owned).collect(),
            "--focus" => a.focus = Some(value()),
            "--skip" => a.skip.push(value()),
            "--images" => a.images_only = Some(value().into()),
            _ => usage(),
        }
    }
    if a.images_only.is_none()
        && (a.critest.as_os_str().is_empty() || a.registry.as_os_str().is_empty())
    {
        usage();
    }
    a
}

fn main() {
    let args = parse();
    std::fs::create_dir_all(&args.out).unwrap();
    let work = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let parts = images::Parts {
        root: args.parts.clone(),
    };
    if let Some(dir) = &args.images_only {
        std::fs::create_dir_all(dir).unwrap();
        for image in images::build_all(dir, &parts) {
            println!("{} {}", image.layout.display(), image.refs.join(" "));
        }
        return;
    }
    let built = images::build_all(work.path(), &parts);
    let registry = Registry::start(&args.registry);
    let certs_d = work.path().join("certs.d");
    registry.write_hosts(&certs_d);
    let net = TestNet::new();
    let containerd = conformance::start_containerd(&net, &certs_d);
    registry.push_all(&containerd, &built);
    println!(
        "{} images on {} ({:.0} s)",
        built.len(),
        registry.addr,
        t0.elapsed().as_secs_f64()
    );

    let sock = format!("unix://{}", containerd.address.display());
    let mut results = BTreeMap::new();
    for handler in &args.handlers {
        let json = args.out.join(format!("{handler}.json"));
        let _ = std::fs::remove_file(&json);
        let log = std::fs::File::create(args.out.join(format!("{handler}.log"))).unwrap();
        let mut cmd = Command::new(&args.critest);
        cmd.arg(format!("-runtime-endpoint={sock}"))
            .arg(format!("-image-endpoint={sock}"))
            .arg(format!("-runtime-handler={handler}"))
            .arg("-ginkgo.no-color")
            .arg("-ginkgo.timeout=4h")
            .arg(format!("-ginkgo.json-report={}", json.display()));
        if let Some(f) = &args.focus {
            cmd.arg(format!("-ginkgo.focus={f}"));
        }
        for s in &args.skip {
            cmd.arg(format!("-ginkgo.skip={s}"));
        }
        let started = Instant::now();
        println!("critest -runtime-handler={handler} ...");
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .expect("critest");
        let specs = report::read(&json).unwrap_or_else(|e| {
            eprintln!("critest ({handler}) wrote no report ({status}): {e}");
            std::process::exit(1)
        });
        println!(
            "  {handler}: {:?} in {:.0} min",
            report::tally(&specs),
            started.elapsed().as_secs_f64() / 60.0
        );
        results.insert(handler.clone(), specs);
    }
    drop(containerd);

    // The verdict needs both runs; a run of one handler only reports.
    let containerd = containerd_version();
    let diff = match (results.get("runc"), results.get("cocoon")) {
        (Some(runc), Some(cocoon)) => report::compare(runc, cocoon, &containerd),
        _ => report::Diff::default(),
    };
    let header = format!(
        "# critest: {}\n\ncontainerd {}; skipped by the runner: {:?}; focus: {:?}",
        critest_version(&args.critest),
        containerd,
        args.skip,
        args.focus
    );
    let handlers: Vec<(&str, &BTreeMap<String, report::Outcome>)> =
        results.iter().map(|(h, s)| (h.as_str(), s)).collect();
    let md = report::markdown(&handlers, &diff, &header);
    std::fs::write(args.out.join("summary.md"), &md).unwrap();
    write_json(&args.out.join("results.json"), &results, &diff);
    println!("{md}");
    if !diff.regressions.is_empty() {
        std::process::exit(1);
    }
}

fn write_json(
    path: &Path,
    results: &BTreeMap<String, BTreeMap<String, report::Outcome>>,
    diff: &report::Diff,
) {
    let handlers: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(h, specs)| {
            let states: serde_json::Map<String, serde_json::Value> = specs
                .iter()
                .map(|(s, o)| (s.clone(), serde_json::json!(o.state)))
                .collect();
            (
                h.clone(),
                serde_json::json!({"tally": report::tally(specs), "specs": states}),
            )
        })
        .collect();
    let v = serde_json::json!({
        "handlers": handlers,
        "vm_inherent": diff.inherent.iter().map(|(s, _, why)| serde_json::json!({"spec": s, "why": why})).collect::<Vec<_>>(),
        "not_asked_by_containerd": diff.not_asked.iter().map(|(s, _, why)| serde_json::json!({"spec": s, "why": why})).collect::<Vec<_>>(),
        "regressions": diff.regressions.iter().map(|(s, o)| serde_json::json!({"spec": s, "state": o.state, "message": o.message})).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn critest_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("-version").output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("version"))
            .unwrap_or("critest")
            .trim()
            .to_owned()
    })
    .unwrap_or_else(|_| "critest".into())
}

fn containerd_version() -> String {
    let bin = cocoon_tests::containerd::containerd_bin("containerd");
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
