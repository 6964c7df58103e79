//! Called from an image crate's `build.rs`: links its binary as a static,
//! non-relocatable ELF at 1 MiB with the runtime's PVH link script
//! (`kernels/runtime/linker.ld`), without the C runtime or libc.

/// Emits the cargo directives that link the crate's binaries as images.
pub fn link_image() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    for arg in ["-nostartfiles", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none", "-Wl,-n"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
