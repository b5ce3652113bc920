//! `make bench`'s Docker figure: cold `docker run --rm … true` on the default bridge, for
//! Cocoon (daemon.json alias), runc and gVisor (`runsc` as a runc-compatible runtime path,
//! the way gVisor documents Docker), side by side against one private dockerd.

use std::time::Instant;

use serde_json::{json, Value};

use crate::docker::{Docker, ALIAS, DOCKER_IMAGE};
use crate::stats::summary;

/// The runtimes measured: (row name, `--runtime` value).
const RUNTIMES: [(&str, &str); 3] = [("cocoon", ALIAS), ("runc", "runc"), ("gVisor", "runsc")];

/// `runs` cold starts per runtime (after one warm-up each); the first error instead where one
/// fails.
pub fn figures(runs: usize) -> Value {
    let d = match Docker::start() {
        Ok(d) => d,
        Err(e) => return json!({"error": e}),
    };
    d.load_test_image();
    let mut out = serde_json::Map::new();
    for (name, rt) in RUNTIMES {
        let mut samples = vec![];
        let mut error = None;
        for i in 0..=runs {
            let t0 = Instant::now();
            let o = d.docker(&["run", "--rm", "--runtime", rt, DOCKER_IMAGE, "true"]);
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if !o.status.success() {
                error = Some(String::from_utf8_lossy(&o.stderr).trim().to_owned());
                break;
            }
            if i > 0 {
                samples.push(ms);
            }
        }
        let v = match error {
            Some(e) => json!({"error": e}),
            None => summary(&samples),
        };
        println!("docker run {name}: {v}");
        out.insert(name.into(), v);
    }
    Value::Object(out)
}

pub fn markdown(r: &Value) -> String {
    let mut s = String::from(
        "\n| cold `docker run --rm … true`, default bridge (ms) | median | p90 | min |\n|---|---|---|---|\n",
    );
    if let Some(e) = r["error"].as_str() {
        return s + &format!("| (no dockerd: {e}) | | | |\n");
    }
    for (k, v) in r.as_object().into_iter().flatten() {
        match v["error"].as_str() {
            Some(e) => s += &format!("| {k} | failed: {e} | | |\n"),
            None => {
                let f = |x: &Value| format!("{:.0}", x.as_f64().unwrap_or(f64::NAN));
                s += &format!(
                    "| {k} | {} | {} | {} |\n",
                    f(&v["median"]),
                    f(&v["p90"]),
                    f(&v["min"])
                );
            }
        }
    }
    s
}
