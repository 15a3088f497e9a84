//! Lays the release binary's steady-state code out together (`src/hot-code.order`).
//!
//! Once the daemon serves, the kernel maps its code back 64 KiB at a time around each page it
//! touches (fault-around), so what stays resident is every 64-KiB window that holds one hot
//! function: with the linker's default layout, which follows symbol hashes, the code a
//! passthrough daemon runs at 1,000 users (2.7 MiB of pages) kept 5.2-7.4 MiB of the 9.2-MiB
//! text resident. Listing those functions first packs them into as few windows as possible
//! (docs/BENCHMARKS.md, "Passthrough at 1,000 users under 20 MiB";
//! `scripts/bench/hot-code-order.sh` measures and rewrites the list).
//!
//! The list is a hint: a function it names that the build does not have (a dependency or the
//! compiler changed) is skipped, and the layout is only less tight. LLD reads it; the build
//! uses the LLD that ships with the Rust toolchain, and skips the list where there is none
//! (or when `AWS_PGBOUNCER_HOT_CODE_ORDER=0`), since other linkers reject the option.
//! `AWS_PGBOUNCER_LINK_MAP=FILE` has LLD write where each function went, with the names the
//! list needs (the generator reads it; a stripped binary has no names left).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const ORDER_FILE: &str = "src/hot-code.order";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    println!("cargo:rerun-if-env-changed=AWS_PGBOUNCER_HOT_CODE_ORDER");
    println!("cargo:rerun-if-env-changed=AWS_PGBOUNCER_LINK_MAP");
    if env::var("AWS_PGBOUNCER_HOT_CODE_ORDER").as_deref() == Ok("0")
        || env::var("PROFILE").as_deref() != Ok("release")
        || env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux")
    {
        return;
    }
    let Some(lld_dir) = toolchain_lld_dir() else {
        println!("cargo:warning=no LLD in the Rust toolchain: {ORDER_FILE} not applied");
        return;
    };
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join(ORDER_FILE);
    let mut args = vec![
        format!("-B{}", lld_dir.display()),
        "-fuse-ld=lld".to_owned(),
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    if let Ok(map) = env::var("AWS_PGBOUNCER_LINK_MAP") {
        args.extend([format!("-Wl,-Map={map}"), "-Wl,--no-demangle".to_owned()]);
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}

/// The directory of the toolchain's `ld.lld` wrapper, the one rustc itself links with by
/// default on x86_64 Linux since Rust 1.90, for the host the build runs on.
fn toolchain_lld_dir() -> Option<PathBuf> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(sysroot.stdout).ok()?;
    let host = env::var("HOST").ok()?;
    let dir = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin/gcc-ld");
    dir.join("ld.lld").is_file().then_some(dir)
}
