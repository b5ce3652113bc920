//! Generates the protobuf types and async ttrpc stubs for `proto/agent.proto` into OUT_DIR.
#![allow(clippy::expect_used)] // a build script reports failure by panicking

use std::{fs, io::Write, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .out_dir(&out)
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(true))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("generating the agent ttrpc code failed");

    // The generated mod.rs lists only the message module; the service module has to be added.
    let mod_rs = out.join("mod.rs");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&mod_rs)
        .expect("codegen writes mod.rs");
    writeln!(f, "pub mod agent_ttrpc;").expect("append to mod.rs");
}
