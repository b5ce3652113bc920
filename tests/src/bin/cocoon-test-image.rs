//! Writes the test image (busybox-static, one layer) as an OCI layout tarball for
//! `ctr images import`: `cocoon-test-image OUT.tar`; with `--docker`, with Docker's
//! `manifest.json` too, for `docker load` (tagged `cocoon-test:latest`). Used by `make demo`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (docker, out) = match args.as_slice() {
        [flag, out] if flag == "--docker" => (true, out),
        [out] => (false, out),
        _ => {
            eprintln!(
                "usage: cocoon-test-image [--docker] OUT.tar   (imports as {}, loads as {})",
                cocoon_tests::containerd::IMAGE,
                cocoon_tests::docker::DOCKER_IMAGE
            );
            std::process::exit(2);
        }
    };
    let path = std::path::Path::new(out);
    if docker {
        cocoon_tests::containerd::build_docker_image(path, cocoon_tests::docker::DOCKER_IMAGE);
        println!("wrote {out} ({})", cocoon_tests::docker::DOCKER_IMAGE);
    } else {
        cocoon_tests::containerd::build_image(path);
        println!("wrote {out} ({})", cocoon_tests::containerd::IMAGE);
    }
}
