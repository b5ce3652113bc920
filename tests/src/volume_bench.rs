//! `make bench`'s volume figures: I/O on a bind-mounted host directory, Cocoon (virtio-fs, per
//! `virtiofs_cache` mode) side by side with runc and gVisor; and the same workload on the
//! container's own root filesystem (`rootfs_io`, issue #29), from an image that carries the
//! archive (`BENCH_IMAGE`), so no host directory is involved. Timed inside the container from
//! `/proc/uptime` (10 ms steps; every workload here takes far longer), so VM boot is not in it:
//! - sequential write of a 128 MiB file (`dd … conv=fsync`) and its read back (the host's
//!   page cache holds it for every runtime: this is the transport's cost, not the disk's);
//! - small files: unpack a tar of 2000 files of 1–4 KiB in 20 directories (create), then
//!   `find` them with their sizes (stat) and `cat` them all (read).

use std::path::Path;

use serde_json::{json, Value};

use crate::containerd::{Containerd, IMAGE};

/// Files in the small-file archive.
pub const SMALL_FILES: usize = 2000;
/// The sequential file's size on a volume, and on the root filesystem (the 256 MiB).
const VOLUME_MIB: u64 = 128;
const ROOTFS_MIB: u64 = 256;

/// The image for `rootfs_io`: the test image's busybox with the archive at `/bench/small.tar`.
pub const BENCH_IMAGE: &str = "docker.io/library/cocoon-bench:latest";

/// The workload in `dir`, unpacking `tar`; prints five uptimes and the file count.
fn script(dir: &str, tar: &str, mib: u64) -> String {
    format!(
        "up() {{ cut -d' ' -f1 /proc/uptime; }}; mkdir -p {dir}; \
         a=$(up); dd if=/dev/zero of={dir}/big bs=1M count={mib} conv=fsync 2>/dev/null; b=$(up); \
         dd if={dir}/big of=/dev/null bs=1M 2>/dev/null; c=$(up); \
         mkdir {dir}/out && tar xf {tar} -C {dir}/out; d=$(up); \
         n=$(find {dir}/out -type f -size -5k | wc -l); cat {dir}/out/*/* > /dev/null; e=$(up); \
         rm -rf {dir}/out {dir}/big; echo $a $b $c $d $e $n"
    )
}

/// Writes [`BENCH_IMAGE`]'s OCI layout tarball at `out`.
pub fn build_bench_image(out: &Path) {
    let root = tempfile::tempdir().unwrap();
    crate::oci::busybox_rootfs(root.path());
    std::fs::create_dir(root.path().join("bench")).unwrap();
    make_archive(&root.path().join("bench")).unwrap();
    let config =
        json!({"Env": [crate::containerd::DEFAULT_PATH], "Cmd": ["sh"], "WorkingDir": "/"});
    crate::containerd::write_image_layout(out, BENCH_IMAGE, root.path(), config, None);
}

/// Builds the small-file archive in `dir`.
pub fn make_archive(dir: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(dir.join("small.tar"))?;
    let mut tar = tar::Builder::new(file);
    for i in 0..SMALL_FILES {
        let body = vec![b'a' + (i % 26) as u8; 1024 + (i * 37) % 3072];
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("d{}/f{i}", i % 20), body.as_slice())?;
    }
    tar.finish()
}

/// Where one run does its I/O.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A bind-mounted host directory (holding the archive), at `/vol`.
    Volume(&'a Path),
    /// A directory of the container's own root filesystem, with [`BENCH_IMAGE`].
    Rootfs,
}

/// One run of the workload with `runtime_args` (`--runtime …` and friends): MB/s and seconds.
pub fn run_once(c: &Containerd, id: &str, runtime_args: &[String], target: Target<'_>) -> Value {
    let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
    args.extend(runtime_args.iter().cloned());
    let (image, script, mib) = match target {
        Target::Volume(vol) => {
            let mount = crate::containerd::bind_mount(vol, "/vol", "rbind:rw");
            args.extend(["--mount".into(), mount]);
            (
                IMAGE,
                script("/vol", "/vol/small.tar", VOLUME_MIB),
                VOLUME_MIB,
            )
        }
        Target::Rootfs => (
            BENCH_IMAGE,
            script("/root/io", "/bench/small.tar", ROOTFS_MIB),
            ROOTFS_MIB,
        ),
    };
    args.extend([image.into(), id.into(), "sh".into(), "-c".into(), script]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = c.ctr(&refs);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    if !out.status.success() || v.len() != 6 || v[5] as usize != SMALL_FILES {
        return json!({"error": format!("{}{}", text.trim(), String::from_utf8_lossy(&out.stderr).trim())});
    }
    let secs = |from: usize| (v[from + 1] - v[from]).max(0.01);
    json!({
        "seq_write_mb_s": mib as f64 * 1.048_576 / secs(0),
        "seq_read_mb_s": mib as f64 * 1.048_576 / secs(1),
        "untar_s": secs(2),
        "stat_read_s": secs(3),
    })
}

/// `runs` runs of the workload; the median of each figure, or the first error.
pub fn figures(
    c: &Containerd,
    id: &str,
    runtime_args: &[String],
    target: Target<'_>,
    runs: usize,
) -> Value {
    let mut samples = vec![];
    for i in 0..runs.max(1) {
        let v = run_once(c, &format!("{id}-{i}"), runtime_args, target);
        if v.get("error").is_some() {
            return v;
        }
        samples.push(v);
    }
    let median = |key: &str| {
        let mut xs: Vec<f64> = samples.iter().filter_map(|v| v[key].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied()
    };
    json!({
        "seq_write_mb_s": median("seq_write_mb_s"),
        "seq_read_mb_s": median("seq_read_mb_s"),
        "untar_s": median("untar_s"),
        "stat_read_s": median("stat_read_s"),
        "n": samples.len(),
    })
}

/// The markdown rows for the volume figures, one per runtime (and cache mode).
pub fn markdown(r: &Value) -> String {
    table(
        r,
        &format!("volume I/O, bind-mounted host dir ({VOLUME_MIB} MiB sequential)"),
    )
}

/// The markdown rows for `rootfs_io`, one per runtime.
pub fn rootfs_markdown(r: &Value) -> String {
    table(
        r,
        &format!("root filesystem I/O ({ROOTFS_MIB} MiB sequential)"),
    )
}

fn table(r: &Value, title: &str) -> String {
    let mut s = format!(
        "\n| {title} | seq write MB/s | seq read MB/s | untar {SMALL_FILES} files (s) | find + cat them (s) |\n|---|---|---|---|---|\n"
    );
    let Some(rows) = r.as_object() else {
        return s;
    };
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    let f2 = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    for (name, v) in rows {
        if let Some(e) = v["error"].as_str() {
            s += &format!("| {name} | failed: {e} | | | |\n");
            continue;
        }
        s += &format!(
            "| {name} | {} | {} | {} | {} |\n",
            f(&v["seq_write_mb_s"]),
            f(&v["seq_read_mb_s"]),
            f2(&v["untar_s"]),
            f2(&v["stat_read_s"])
        );
    }
    s
}
