//! Prints, for each image file given, what blind use reads of its noise: the patch estimate,
//! whether it passes the check across colour channels, and its whiteness (the 2x2 averages'
//! patch estimate over the image's: 0.5 for white noise).
//!
//! `cargo run --release -p denoise-data --example whiteness -- FILE...`

use denoise_data::estimate::{
    SPATIALLY_WHITE_RATIO, immerkaer_sigma, patch_covariance_sigma, white_noise_estimate, whiteness,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        return Err("usage: whiteness FILE...".into());
    }
    println!("file\tpatch\tfilter\twhiteness\twhite (at most {SPATIALLY_WHITE_RATIO})");
    for file in files {
        let image = denoise_data::io::load(&file)?.image;
        let show = |v: Option<f32>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        println!(
            "{file}\t{}\t{:.3}\t{}\t{}",
            show(patch_covariance_sigma(&image)),
            immerkaer_sigma(&image),
            show(whiteness(&image)),
            white_noise_estimate(&image).is_some()
        );
    }
    Ok(())
}
