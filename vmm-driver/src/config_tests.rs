//! The config file: parsing, defaults, validation.

use super::*;

#[test]
fn empty_text_is_the_defaults() {
    assert_eq!(Config::parse("").unwrap(), Config::default());
}

/// The documented file that `make setup` installs must say exactly what the code defaults to.
#[test]
fn shipped_config_is_the_defaults() {
    let text = include_str!("../../config/config.toml");
    assert_eq!(Config::parse(text).unwrap(), Config::default());
}

#[test]
fn full_file_round_trips() {
    let text = toml::to_string(&Config::default()).unwrap();
    assert_eq!(Config::parse(&text).unwrap(), Config::default());
}

#[test]
fn sections_override_defaults() {
    let cfg = Config::parse(
        "accel = \"tcg\"\nvsock = \"hybrid\"\n[vm]\nvcpus = 2\nmemory_mib = 512\n[paths]\nqemu = \"/opt/q\"\n",
    )
    .unwrap();
    assert_eq!(cfg.accel, Accel::Tcg);
    assert_eq!(cfg.vsock, VsockMode::Hybrid);
    assert_eq!(cfg.vm.vcpus, 2);
    assert_eq!(cfg.vm.memory_mib, 512);
    assert_eq!(cfg.paths.qemu, PathBuf::from("/opt/q"));
    assert_eq!(cfg.paths.virtiofsd, PathBuf::from("virtiofsd"));
}

#[test]
fn the_share_is_on_demand_unless_the_handler_says_always() {
    assert_eq!(Config::default().vm.share, ShareMode::OnDemand);
    let cfg = Config::parse("[vm]\nshare = \"always\"\n").unwrap();
    assert_eq!(cfg.vm.share, ShareMode::Always);
    let err = Config::parse("[vm]\nshare = \"never\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("on-demand") && err.contains("always"), "{err}");
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse("[vm]\nvcpu = 2\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `vcpu`"), "{err}");
    assert!(err.contains("vcpus"), "should list the valid keys: {err}");
}

#[test]
fn bad_enum_value_lists_the_choices() {
    let err = Config::parse("accel = \"fast\"\n").unwrap_err().to_string();
    assert!(err.contains("fast") && err.contains("tcg"), "{err}");
}

#[test]
fn out_of_range_values_are_refused() {
    let err = Config::parse("[vm]\nvcpus = 0\n").unwrap_err().to_string();
    assert!(err.contains("vm.vcpus"), "{err}");
    let err = Config::parse("[vm]\nmemory_mib = 16\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("vm.memory_mib"), "{err}");
    let err = Config::parse("log_level = \"loud\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("log_level"), "{err}");
    let err = Config::parse("state_dir = \"run\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("state_dir"), "{err}");
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "bogus = 1\n").unwrap();
    let err = Config::from_file(&p).unwrap_err().to_string();
    assert!(
        err.contains(&p.display().to_string()) && err.contains("bogus"),
        "{err}"
    );
    let err = Config::from_file(&dir.path().join("none.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none.toml") && err.contains("cannot read"),
        "{err}"
    );
}
