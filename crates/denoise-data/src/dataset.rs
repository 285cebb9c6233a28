//! Directory datasets: deterministic recursive listing of image files, and loading a folder of
//! images into memory with explicit channel handling and a record of what was skipped.

use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::io::{self, DEFAULT_MAX_PIXELS, LoadedImage};
use crate::{DataError, Image, Result};

/// Extensions (lower-case, compared case-insensitively) that [`scan`] lists.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "tif", "tiff", "bmp", "webp"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`], in any case.
pub fn is_image_path(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| e.eq_ignore_ascii_case(known))
    })
}

/// All image files under `dir`, recursively, sorted by path so every machine and every run sees
/// the same order. Hidden entries (names starting with `.`) are skipped: they are editor
/// backups, macOS `._` resource forks and our own temporary files. Symlinked files are listed;
/// symlinked directories are not followed, so a link cycle cannot make the scan loop.
pub fn scan(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let meta = fs::metadata(dir).map_err(|source| DataError::Io {
        path: dir.into(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(DataError::Io {
            path: dir.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|source| DataError::Io {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| DataError::Io {
                path: d.clone(),
                source,
            })?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let file_type = entry.file_type().map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            if file_type.is_dir() {
                stack.push(path);
            } else if (file_type.is_file() || (file_type.is_symlink() && path.is_file()))
                && is_image_path(&path)
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Returns `image` with `channels` channels: unchanged when it already has them, converted
/// when `convert` allows it, and otherwise [`DataError::Channels`], because training a colour
/// model on silently replicated gray (or the reverse) is a mistake worth stopping for.
pub fn conform_channels(image: Image, channels: Option<usize>, convert: bool) -> Result<Image> {
    match channels {
        None => Ok(image),
        Some(c) if c == image.channels() => Ok(image),
        Some(c) if convert => image.to_channels(c),
        Some(c) => Err(DataError::Channels {
            expected: c,
            got: image.channels(),
        }),
    }
}

/// How a folder of images is loaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Required channel count (1 or 3); `None` keeps each image's own.
    pub channels: Option<usize>,
    /// Convert images whose channel count differs from `channels` instead of failing.
    pub convert_channels: bool,
    /// Fail on the first unreadable file instead of skipping it.
    pub strict: bool,
    /// Images above this many pixels are refused before decoding.
    pub max_pixels: u64,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            channels: None,
            convert_channels: false,
            strict: false,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// A file left out of a dataset, and why.
#[derive(Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub error: DataError,
}

/// One loaded image of a dataset.
#[derive(Clone, Debug)]
pub struct DatasetItem {
    pub path: PathBuf,
    /// The decoded image, already conformed to the configured channels (alpha, depth and
    /// format kept for writing results back).
    pub loaded: LoadedImage,
}

/// A folder (or list) of images held in memory, in [`scan`] order.
#[derive(Debug)]
pub struct Dataset {
    pub items: Vec<DatasetItem>,
    /// Unreadable files that were left out; print them (and their count) as a warning.
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    /// Loads every image under `dir` (see [`scan`]). Fails with [`DataError::EmptyDataset`] if
    /// nothing usable is found.
    pub fn load_dir(dir: impl AsRef<Path>, config: &DatasetConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let set = Self::load_paths(&scan(dir)?, config)?;
        if set.items.is_empty() {
            return Err(DataError::EmptyDataset { path: dir.into() });
        }
        Ok(set)
    }

    /// Loads the given files, in parallel, keeping their order. Unreadable files are skipped
    /// (or fail the load under `strict`); a channel mismatch always fails, since it is a
    /// configuration error rather than a bad file.
    pub fn load_paths(paths: &[PathBuf], config: &DatasetConfig) -> Result<Self> {
        if let Some(c) = config.channels
            && c != 1
            && c != 3
        {
            return Err(DataError::Config(format!(
                "channels must be 1 or 3, not {c}"
            )));
        }
        let results: Vec<Result<LoadedImage>> = paths
            .par_iter()
            .map(|path| {
                let mut loaded = io::load_with_limit(path, config.max_pixels)?;
                loaded.image =
                    conform_channels(loaded.image, config.channels, config.convert_channels)
                        .map_err(|e| match e {
                            DataError::Channels { expected, got } => DataError::FileChannels {
                                path: path.clone(),
                                expected,
                                got,
                            },
                            e => e,
                        })?;
                Ok(loaded)
            })
            .collect();
        let mut items = Vec::with_capacity(paths.len());
        let mut skipped = Vec::new();
        for (path, result) in paths.iter().zip(results) {
            match result {
                Ok(loaded) => items.push(DatasetItem {
                    path: path.clone(),
                    loaded,
                }),
                Err(e @ DataError::FileChannels { .. }) => return Err(e),
                Err(e) if config.strict => return Err(e),
                Err(error) => skipped.push(Skipped {
                    path: path.clone(),
                    error,
                }),
            }
        }
        Ok(Self { items, skipped })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// A one-line warning about skipped files, or `None` if nothing was skipped.
    pub fn skipped_warning(&self) -> Option<String> {
        let first = self.skipped.first()?;
        Some(format!(
            "skipped {} unreadable file(s), first: {}",
            self.skipped.len(),
            first.error
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BitDepth, save};

    fn gradient(channels: usize, h: usize, w: usize) -> Image {
        Image::from_fn(channels, h, w, |c, y, x| {
            ((c * 31 + y * 7 + x * 3) % 256) as f32 / 255.0
        })
    }

    #[test]
    fn scan_is_sorted_recursive_and_case_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/deep")).unwrap();
        fs::create_dir_all(root.join("a")).unwrap();
        fs::create_dir_all(root.join(".hidden")).unwrap();
        for name in [
            "z.png",
            "b/deep/x.JPG",
            "b/y.Tiff",
            "a/c.bmp",
            "a/notes.txt",
            "a/.d.png",
            ".hidden/e.png",
            "m.webp",
        ] {
            fs::write(root.join(name), b"x").unwrap();
        }
        let rel: Vec<String> = scan(root)
            .unwrap()
            .iter()
            .map(|p| {
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/")
            })
            .collect();
        assert_eq!(
            rel,
            ["a/c.bmp", "b/deep/x.JPG", "b/y.Tiff", "m.webp", "z.png"]
        );
    }

    #[test]
    fn scan_of_a_missing_dir_names_it() {
        let err = scan("/definitely/not/here").unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }

    #[test]
    fn load_dir_skips_bad_files_unless_strict() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path().join("a.png"),
            &gradient(3, 8, 9),
            None,
            BitDepth::Eight,
        )
        .unwrap();
        fs::write(dir.path().join("b.png"), b"not a png at all").unwrap();
        fs::write(dir.path().join("c.jpg"), b"").unwrap();

        let set = Dataset::load_dir(dir.path(), &DatasetConfig::default()).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.skipped.len(), 2);
        assert!(set.skipped[0].error.to_string().contains("b.png"));
        assert!(matches!(set.skipped[1].error, DataError::EmptyFile { .. }));
        assert!(set.skipped_warning().unwrap().starts_with("skipped 2"));

        let strict = DatasetConfig {
            strict: true,
            ..DatasetConfig::default()
        };
        let err = Dataset::load_dir(dir.path(), &strict).unwrap_err();
        assert!(err.to_string().contains("b.png"), "{err}");
    }

    #[test]
    fn channel_mismatch_needs_explicit_conversion() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path().join("g.png"),
            &gradient(1, 8, 8),
            None,
            BitDepth::Eight,
        )
        .unwrap();
        let rgb = DatasetConfig {
            channels: Some(3),
            ..DatasetConfig::default()
        };
        let err = Dataset::load_dir(dir.path(), &rgb).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::FileChannels {
                    expected: 3,
                    got: 1,
                    ..
                }
            ),
            "{err}"
        );

        let convert = DatasetConfig {
            convert_channels: true,
            ..rgb
        };
        let set = Dataset::load_dir(dir.path(), &convert).unwrap();
        assert_eq!(set.items[0].loaded.image.channels(), 3);
    }

    #[test]
    fn empty_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::load_dir(dir.path(), &DatasetConfig::default()).unwrap_err();
        assert!(matches!(err, DataError::EmptyDataset { .. }));
    }
}
