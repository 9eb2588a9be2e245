//! Builds the XDP program (crate `lb-ebpf`) for the BPF target and puts the object in OUT_DIR.
//!
//! The nested build uses Debian's rustc (toolchain path `/usr`, which ships the library sources
//! `-Z build-std=core` needs) with RUSTC_BOOTSTRAP=1 for that build only: rustup's toolchains
//! here have no `rust-src`. `cargo xtask setup` installs both. Set LB_EBPF_TOOLCHAIN to use
//! another toolchain (e.g. `nightly` with rust-src).
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    // aya-build watches lb-ebpf's own folder only: a change to the types it shares with
    // userspace must rebuild the object too, or the kernel side keeps the old layout.
    println!("cargo:rerun-if-changed=../lb-common/src");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf has no directory"))?;
    // SAFETY: build scripts are single-threaded; this only affects the nested cargo build.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
