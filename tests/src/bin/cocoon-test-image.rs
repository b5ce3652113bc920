//! Writes the test image (busybox-static, one layer) as an OCI layout tarball for
//! `ctr images import`: `cocoon-test-image OUT.tar`. Used by `make demo`.

fn main() {
    let Some(out) = std::env::args().nth(1) else {
        eprintln!(
            "usage: cocoon-test-image OUT.tar   (imports as {})",
            cocoon_tests::containerd::IMAGE
        );
        std::process::exit(2);
    };
    cocoon_tests::containerd::build_image(std::path::Path::new(&out));
    println!("wrote {out} ({})", cocoon_tests::containerd::IMAGE);
}
