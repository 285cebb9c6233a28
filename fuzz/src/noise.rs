//! The noise SPEC grammar (`noise --kind`, a training config's `noise`, the web app's samples).

use denoise_data::noise::NoiseSpec;

pub struct Noise;

impl super::Target for Noise {
    fn run(&self, data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(spec) = text.parse::<NoiseSpec>() else {
            return;
        };
        // What parses prints back to a spec that parses to the same value.
        let printed = spec.to_string();
        let again: NoiseSpec = printed
            .parse()
            .unwrap_or_else(|e| panic!("'{text}' printed as '{printed}', which fails: {e}"));
        assert_eq!(again, spec, "'{text}' printed as '{printed}'");
        assert_eq!(again.to_string(), printed);
        // A spec that passes validation applies to an image and gives finite samples.
        if spec.validate().is_ok() {
            let clean = denoise_data::Image::from_fn(3, 8, 8, |c, y, x| {
                ((c + 2 * y + 3 * x) % 9) as f32 / 8.0
            });
            let noisy = spec.apply(&clean, data.len() as u64);
            assert_eq!(noisy.image.shape(), clean.shape());
            assert!(
                noisy.image.data().iter().all(|v| v.is_finite()),
                "'{text}' gives samples that are not finite"
            );
        }
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        [
            "gaussian:25",
            "gaussian:0-55",
            "gaussian-map:5-50",
            "located:10-40:0.3",
            "salt-pepper:0.05",
            "impulse:0.02",
            "poisson-gaussian:30:5",
            "speckle:0.1",
            "jpeg:50",
            "method1",
            "method2",
            "camera:iso=800-6400:jpeg=75-95:chroma=420",
            "gaussian:25+clip",
            "gaussian:25+round",
            "camera|gaussian:0-55+round",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;

    #[test]
    fn seeds_parse_and_their_mutations_run_clean() {
        for seed in Noise.seeds() {
            let text = String::from_utf8(seed).unwrap();
            text.parse::<NoiseSpec>().expect("a seed parses");
        }
        for input in crate::mutations(&Noise.seeds()) {
            Noise.run(&input);
        }
    }
}
