//! Embeds an rpath to libtorch (see `denoise-build`).

fn main() {
    denoise_build::link_libtorch();
}
