//! Links this crate's binary as a PVH unikernel image.
fn main() {
    ssc_image_link::link_image();
}
