//! critest's results side by side: ginkgo's JSON report for each runtime handler, read into
//! one state per spec, and the verdict the issue asks for: every spec runc passes passes
//! under Cocoon, except those a VM boundary rules out, each listed here with its reason.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// Specs that cannot pass across a VM boundary, matched by a substring of the full spec
/// text, with the reason docs/conformance.md gives.
pub const VM_INHERENT: &[(&str, &str)] = &[
    (
        "HostNetwork",
        "the pod's network is the guest's; the host's network stack can't be shared into a \
         VM (refused at create, naming the field)",
    ),
    (
        "portforward in host network",
        "needs a host-network pod: the pod's network is the guest's (refused at create, \
         naming the field)",
    ),
    (
        "HostIpc is true",
        "SysV IPC and POSIX shared memory live in the host kernel, which a guest never \
         shares (refused at create, naming the field)",
    ),
    (
        "propagation from host to container and vice versa",
        "host to container works (virtiofsd's mount namespace is a slave of the host's and \
         announces submounts); a mount made in the container is a mount of the guest's \
         kernel, which the host can't see",
    ),
];

/// critest's skip message when containerd's CRI reports no recursive read-only mounts for the
/// handler (its RRO specs then skip).
pub const NO_RRO_REPORTED: &str = "runtime does not implement recursive readonly mounts";

/// Why containerd `version` (its `--version` line) reports no runtime features for Cocoon,
/// if it is one that asks only `io.containerd.runc.v2` shims (`introspectRuntimeFeatures` in
/// `internal/cri/server/service.go` before 2.2; containerd PR #13504 asks any shim's `-info`).
pub fn features_not_asked(version: &str) -> Option<&'static str> {
    let release = version.split_whitespace().nth(2)?;
    let mut parts = release.trim_start_matches('v').split(['.', '~', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    ((major, minor) < (2, 2)).then_some(
        "this containerd's CRI asks only runc.v2 shims for runtime features, so it reports no \
         recursive read-only support for any other runtime (2.2 and later ask the shim's \
         `-info`, which lists rro; rro itself works: volumes.rs)",
    )
}

/// One spec's outcome under one handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// ginkgo's state: passed, failed, skipped, pending, panicked, timedout, ...
    pub state: String,
    /// The failure message's first line, if it failed.
    pub message: String,
    pub seconds: f64,
}

/// Reads a ginkgo `--json-report` into spec text → outcome (`It` nodes only).
pub fn read(path: &Path) -> Result<BTreeMap<String, Outcome>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let suites: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut specs = BTreeMap::new();
    for suite in suites.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut name: Vec<&str> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            name.push(spec["LeafNodeText"].as_str().unwrap_or_default());
            let message = spec["Failure"]["Message"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            specs.insert(
                name.join(" "),
                Outcome {
                    state: spec["State"].as_str().unwrap_or("unknown").to_owned(),
                    message,
                    seconds: spec["RunTime"].as_f64().unwrap_or(0.0) / 1e9,
                },
            );
        }
    }
    Ok(specs)
}

/// How many specs ended in each state.
pub fn tally(specs: &BTreeMap<String, Outcome>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for o in specs.values() {
        *t.entry(o.state.clone()).or_default() += 1;
    }
    t
}

/// Why a spec can't pass in a VM, if it is one of [`VM_INHERENT`].
pub fn vm_inherent(spec: &str) -> Option<&'static str> {
    VM_INHERENT
        .iter()
        .find(|(m, _)| spec.contains(m))
        .map(|(_, why)| *why)
}

/// The comparison: specs runc passes that `other` does not, split into the VM-inherent ones
/// (with their reason) and the rest (regressions).
/// `not_asked` holds the RRO specs `other` skipped because this containerd never asked it for
/// its features ([`features_not_asked`]); on a containerd that asks, such a skip is a
/// regression like any other.
#[derive(Debug, Default)]
pub struct Diff {
    pub inherent: Vec<(String, Outcome, &'static str)>,
    pub not_asked: Vec<(String, Outcome, &'static str)>,
    pub regressions: Vec<(String, Outcome)>,
}

/// `containerd` is containerd's `--version` line.
pub fn compare(
    runc: &BTreeMap<String, Outcome>,
    other: &BTreeMap<String, Outcome>,
    containerd: &str,
) -> Diff {
    let mut diff = Diff::default();
    for (spec, r) in runc {
        if r.state != "passed" {
            continue;
        }
        let o = other.get(spec).cloned().unwrap_or(Outcome {
            state: "missing".to_owned(),
            message: String::new(),
            seconds: 0.0,
        });
        if o.state == "passed" {
            continue;
        }
        let unasked = features_not_asked(containerd)
            .filter(|_| o.state == "skipped" && o.message.contains(NO_RRO_REPORTED));
        match (vm_inherent(spec), unasked) {
            (Some(why), _) => diff.inherent.push((spec.clone(), o, why)),
            (None, Some(why)) => diff.not_asked.push((spec.clone(), o, why)),
            (None, None) => diff.regressions.push((spec.clone(), o)),
        }
    }
    diff
}

/// The result as Markdown: the tallies, then every spec whose state differs between the two.
pub fn markdown(
    handlers: &[(&str, &BTreeMap<String, Outcome>)],
    diff: &Diff,
    header: &str,
) -> String {
    let mut s = format!(
        "{header}\n\n| handler | passed | failed | skipped | other |\n|---|---|---|---|---|\n"
    );
    for (name, specs) in handlers {
        let t = tally(specs);
        let get = |k: &str| t.get(k).copied().unwrap_or(0);
        let other = specs.len() - get("passed") - get("failed") - get("skipped");
        s += &format!(
            "| {name} | {} | {} | {} | {other} |\n",
            get("passed"),
            get("failed"),
            get("skipped")
        );
    }
    if let [(_, first), rest @ ..] = handlers {
        s += "\nSpecs whose state differs between the handlers:\n\n| spec |";
        for (name, _) in handlers {
            s += &format!(" {name} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(handlers.len());
        s += "\n";
        for (spec, o) in first.iter() {
            let states: Vec<String> = rest
                .iter()
                .map(|(_, m)| {
                    m.get(spec)
                        .map_or("missing".to_owned(), |x| x.state.clone())
                })
                .collect();
            if states.iter().all(|x| *x == o.state) {
                continue;
            }
            s += &format!("| {spec} | {} | {} |\n", o.state, states.join(" | "));
        }
    }
    s += "\nVM-inherent (runc passes, Cocoon can't across a VM):\n\n";
    for (spec, o, why) in &diff.inherent {
        s += &format!("- `{spec}` ({}): {why}\n", o.state);
    }
    if !diff.not_asked.is_empty() {
        s += "\nNot asked by this containerd (runc passes, skipped for Cocoon):\n\n";
        for (spec, o, why) in &diff.not_asked {
            s += &format!("- `{spec}` ({}): {why}\n", o.state);
        }
    }
    s += &format!(
        "\nRegressions (runc passes, Cocoon fails, not VM-inherent): {}\n",
        diff.regressions.len()
    );
    for (spec, o) in &diff.regressions {
        s += &format!("- `{spec}` ({}): {}\n", o.state, o.message);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(state: &str) -> Outcome {
        Outcome {
            state: state.to_owned(),
            message: String::new(),
            seconds: 1.0,
        }
    }

    #[test]
    fn reads_ginkgo_json_its_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(
            &p,
            r#"[{"SuiteDescription":"CRI validation","SpecReports":[
              {"ContainerHierarchyTexts":["[k8s.io] Image Manager"],"LeafNodeType":"It",
               "LeafNodeText":"public image with tag should be pulled","State":"passed","RunTime":2000000000},
              {"ContainerHierarchyTexts":["[k8s.io] Security Context","NamespaceOption"],"LeafNodeType":"It",
               "LeafNodeText":"runtime should support HostIpc is true","State":"failed",
               "Failure":{"Message":"HostIpc: a VM\nmore"}},
              {"LeafNodeType":"BeforeSuite","State":"passed"}]}]"#,
        )
        .unwrap();
        let specs = read(&p).unwrap();
        assert_eq!(specs.len(), 2);
        let ipc = &specs
            ["[k8s.io] Security Context NamespaceOption runtime should support HostIpc is true"];
        assert_eq!(ipc.state, "failed");
        assert_eq!(ipc.message, "HostIpc: a VM");
        assert_eq!(
            specs["[k8s.io] Image Manager public image with tag should be pulled"].seconds,
            2.0
        );
    }

    #[test]
    fn only_what_runc_passes_counts_and_inherent_ones_are_named() {
        let mut runc = BTreeMap::new();
        let mut cocoon = BTreeMap::new();
        runc.insert("a passes".to_owned(), outcome("passed"));
        cocoon.insert("a passes".to_owned(), outcome("passed"));
        runc.insert("b HostIpc is true".to_owned(), outcome("passed"));
        cocoon.insert("b HostIpc is true".to_owned(), outcome("failed"));
        runc.insert("c exec".to_owned(), outcome("passed"));
        cocoon.insert("c exec".to_owned(), outcome("failed"));
        runc.insert("d flaky upstream".to_owned(), outcome("failed"));
        cocoon.insert("d flaky upstream".to_owned(), outcome("failed"));
        runc.insert("e gone".to_owned(), outcome("passed"));
        let d = compare(
            &runc,
            &cocoon,
            "containerd github.com/containerd/containerd 1.6.20~ds1",
        );
        assert_eq!(d.inherent.len(), 1);
        assert_eq!(d.inherent[0].0, "b HostIpc is true");
        let reg: Vec<&str> = d.regressions.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(reg, ["c exec", "e gone"]);
        let md = markdown(&[("runc", &runc), ("cocoon", &cocoon)], &d, "# r");
        assert!(md.contains("| runc | 4 | 1 | 0 | 0 |"), "{md}");
        assert!(md.contains("| c exec | passed | failed |"), "{md}");
        assert!(!md.contains("| a passes |"), "{md}");
    }

    #[test]
    fn an_rro_skip_is_excused_only_where_containerd_never_asks_the_shim() {
        let mut runc = BTreeMap::new();
        let mut cocoon = BTreeMap::new();
        runc.insert(
            "should support recursive readonly mounts".to_owned(),
            outcome("passed"),
        );
        let mut skipped = outcome("skipped");
        skipped.message = NO_RRO_REPORTED.to_owned();
        cocoon.insert(
            "should support recursive readonly mounts".to_owned(),
            skipped,
        );
        runc.insert("other skip".to_owned(), outcome("passed"));
        cocoon.insert("other skip".to_owned(), outcome("skipped"));
        let v21 = "containerd github.com/containerd/containerd/v2 2.1.9~ds1 2.1.9~ds1-1";
        let d = compare(&runc, &cocoon, v21);
        assert_eq!(d.not_asked.len(), 1);
        assert_eq!(
            d.regressions.len(),
            1,
            "a skip for another reason still counts"
        );
        for asks in [
            "containerd github.com/containerd/containerd/v2 v2.2.7 abc",
            "containerd github.com/containerd/containerd/v2 2.3.4 abc",
            "",
        ] {
            let d = compare(&runc, &cocoon, asks);
            assert!(d.not_asked.is_empty(), "{asks}");
            assert_eq!(d.regressions.len(), 2, "{asks}");
        }
        assert!(
            features_not_asked("containerd github.com/containerd/containerd 1.7.24~ds1 x")
                .is_some()
        );
    }
}
