//! `make install`'s registration of the CRI handler `cocoon` with an existing containerd
//! config (scripts/containerd-imports.sh), on copies of the shapes such a config takes. Each
//! result must parse, and containerd must then see the handler.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs the script on `conf`; returns what it printed.
fn register(conf: &Path) -> String {
    let drop_in = repo().join("config/containerd-cocoon.toml");
    let out = Command::new(repo().join("scripts/containerd-imports.sh"))
        .env("CONTAINERD_CONFIG", conf)
        .env("COCOON_IMPORT_GLOB", &drop_in)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The handler as containerd reads `conf`.
fn sees_cocoon(conf: &Path) -> bool {
    let out = Command::new("containerd")
        .arg("--config")
        .arg(conf)
        .args(["config", "dump"])
        .output()
        .expect("containerd is missing: run `make setup`");
    assert!(
        out.status.success(),
        "{conf:?} does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).contains("runtimes.cocoon]")
}

#[test]
fn every_shape_of_containerd_config_gets_the_cocoon_handler_once() {
    let d = tempfile::tempdir().unwrap();
    let debian = "version = 2\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n";
    let cases = [
        ("debian", Some(debian)),
        (
            "imports",
            Some("imports = [\"/nonexistent/*.toml\"]\nversion = 2\n"),
        ),
        ("no-version", Some("[grpc]\n  address = \"/run/x.sock\"\n")),
        ("missing", None),
    ];
    for (name, content) in cases {
        let conf = d.path().join(format!("{name}.toml"));
        if let Some(c) = content {
            std::fs::write(&conf, c).unwrap();
            assert!(!sees_cocoon(&conf), "{name}: handler before registering");
        }
        let first = register(&conf);
        assert!(sees_cocoon(&conf), "{name}: no handler after `{first}`");
        let again = register(&conf);
        assert!(
            again.contains("already imports"),
            "{name}: not idempotent: {again}"
        );
        if let Some(c) = content {
            let backup = d.path().join(format!("{name}.toml.before-cocoon"));
            assert_eq!(
                std::fs::read_to_string(backup).unwrap(),
                c,
                "{name}: backup"
            );
        }
    }
}
