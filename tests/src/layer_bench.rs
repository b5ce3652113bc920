//! `make bench`'s layer-image figure (issue #29): what the first pod of a new image pays to
//! turn its layers into EROFS images (a cold cache), against a pod of an image whose images
//! are cached (a warm cache: each image is only checked). Taken from the shim's own log line
//! ("… images N ms …"), for the bench image of `rootfs_io` (busybox and a 2000-file archive).

use serde_json::{json, Value};

use crate::containerd::{Containerd, RUNTIME};
use crate::stats::summary;
use crate::volume_bench::BENCH_IMAGE;

/// `(images built now, ms spent on the images)` from the last "rootfs from" line in `log`.
fn last_images_line(log: &str) -> Option<(u32, f64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("images built now; images "))?;
    let built = line
        .split(" images built now")
        .next()?
        .rsplit('(')
        .next()?
        .trim()
        .parse()
        .ok()?;
    let ms = line
        .split("images built now; images ")
        .nth(1)?
        .split(" ms")
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some((built, ms))
}

/// Per run: a fresh cache, one pod (cold: every layer built), a second pod (warm).
pub fn figures(c: &Containerd, runs: usize) -> Value {
    let original = std::fs::read_to_string(&c.cocoon_config).unwrap_or_default();
    let (mut cold, mut warm) = (vec![], vec![]);
    let mut error = None;
    for i in 0..runs {
        let cache = c.dir.path().join(format!("layer-bench-cache-{i}"));
        let line = format!("rootfs.layer_cache_dir = \"{}\"\n", cache.display());
        if let Err(e) = std::fs::write(&c.cocoon_config, format!("{original}{line}")) {
            error = Some(format!("write the config: {e}"));
            break;
        }
        for (n, into) in [(0, &mut cold), (1, &mut warm)] {
            let id = format!("layer-bench-{i}-{n}");
            let out = c.ctr(&[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                BENCH_IMAGE,
                &id,
                "true",
            ]);
            match last_images_line(&c.log()) {
                Some((built, ms)) if out.status.success() && (built > 0) == (n == 0) => {
                    into.push(ms);
                }
                other => {
                    error = Some(format!(
                        "pod {id}: {} (log line: {other:?})",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&cache);
    }
    let _ = std::fs::write(&c.cocoon_config, original);
    match error {
        Some(e) => json!({"error": e}),
        None => json!({"cold_build_ms": summary(&cold), "warm_check_ms": summary(&warm)}),
    }
}

/// The figure as a markdown table.
pub fn markdown(r: &Value) -> String {
    let f = |v: &Value| {
        v["median"]
            .as_f64()
            .map_or("-".into(), |x| format!("{x:.0}"))
    };
    match r["error"].as_str() {
        Some(e) => format!("\n| layer images | failed: {e} |\n|---|---|\n"),
        None => format!(
            "\n| layer images of the bench image, per pod (ms, median) | cold cache: built | warm cache: checked |\n|---|---|---|\n| cocoon | {} | {} |\n",
            f(&r["cold_build_ms"]),
            f(&r["warm_check_ms"])
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_line_is_read() {
        let log = "x\ncontainer c: rootfs from 2 layer disks (2 images built now; images 190 ms, \
                   plugged in 40 ms), writes on a scratch disk\n\
                   container d: rootfs from 2 layer disks (0 images built now; images 12 ms, \
                   plugged in 30 ms), writes on a scratch disk\n";
        assert_eq!(last_images_line(log), Some((0, 12.0)));
        assert_eq!(last_images_line("nothing"), None);
    }
}
