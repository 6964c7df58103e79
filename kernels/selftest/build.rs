//! Links the image as a static, non-relocatable ELF at 1 MiB with the
//! runtime's PVH link script (see kernels/runtime/linker.ld).
fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-n",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
