//! Where a model comes from: an artefact file, a training run's directory, or bytes built into a
//! program ([`ModelSource`]), and the models a program knows by name ([`Catalog`]).

use crate::artefact::{self, Metadata};
use crate::{Model, ModelError, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// A model artefact to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// An artefact file, or a run directory holding `model.safetensors`.
    Path(PathBuf),
    /// An artefact built into the program (`include_bytes!`), under its name.
    BuiltIn { name: String, bytes: &'static [u8] },
}

impl ModelSource {
    /// A run directory becomes its `model.safetensors`; anything else stays as it is.
    pub fn resolved(&self) -> Result<Self> {
        match self {
            ModelSource::Path(path) => Ok(ModelSource::Path(artefact::resolve(path)?)),
            built_in => Ok(built_in.clone()),
        }
    }

    /// Builds the model onto `device` at fp32 and fills it with the stored weights.
    pub fn load(&self, device: Device) -> Result<(Model, Metadata)> {
        match self {
            ModelSource::Path(path) => {
                let loaded = artefact::load(path, device)?;
                Ok((loaded.model, loaded.metadata))
            }
            ModelSource::BuiltIn { name, bytes } => {
                artefact::from_bytes(bytes, device).map_err(|e| named(e, name))
            }
        }
    }

    /// The metadata only (the header; no weights copied into tensors).
    pub fn metadata(&self) -> Result<Metadata> {
        match self {
            ModelSource::Path(path) => artefact::read_metadata(path),
            ModelSource::BuiltIn { name, bytes } => artefact::parse_metadata(bytes)
                .map_err(|message| named(ModelError::artefact(Path::new(name), message), name)),
        }
    }
}

/// An error about an artefact in memory, naming the built-in model it is.
fn named(err: ModelError, name: &str) -> ModelError {
    match err {
        ModelError::Artefact { message, .. } => {
            ModelError::artefact(Path::new(&format!("built-in model {name}")), message)
        }
        other => other,
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Path(path) => write!(f, "{}", path.display()),
            ModelSource::BuiltIn { name, .. } => write!(f, "{name} (built in)"),
        }
    }
}

/// Models known by name: a program's built-in set, a folder of artefacts, a server's list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Sorted by name, names unique.
    models: Vec<(String, ModelSource)>,
}

impl Catalog {
    /// The catalog of `models`; a later model of a name replaces an earlier one.
    pub fn new(models: impl IntoIterator<Item = (String, ModelSource)>) -> Self {
        let mut catalog = Self::default();
        for (name, source) in models {
            catalog.insert(name, source);
        }
        catalog
    }

    /// Every `NAME.safetensors` in `dir` (not its subfolders), as `NAME`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut models = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".safetensors"));
            if let Some(name) = name.filter(|_| path.is_file()) {
                models.push((name.to_owned(), ModelSource::Path(path.clone())));
            }
        }
        Ok(Self::new(models))
    }

    /// Adds `source` as `name`, replacing a model of that name.
    pub fn insert(&mut self, name: String, source: ModelSource) {
        match self.models.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => self.models[i].1 = source,
            Err(i) => self.models.insert(i, (name, source)),
        }
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|(name, _)| name.as_str())
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelSource> {
        self.models
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.models[i].1)
    }

    /// A model as a user names it: a file or directory that exists wins, else a name here.
    pub fn resolve(&self, spec: &str) -> Result<ModelSource> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(ModelSource::Path(path.to_path_buf()));
        }
        self.get(spec)
            .cloned()
            .ok_or_else(|| ModelError::UnknownModel {
                spec: spec.to_owned(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_bytes() -> Vec<u8> {
        let cfg = serde_json::from_str(r#"{"kind":"dncnn","depth":3,"features":8}"#).unwrap();
        let model = Model::new(&cfg, Device::Cpu).unwrap();
        artefact::to_bytes(&model, &Metadata::new(model.config())).unwrap()
    }

    #[test]
    fn a_model_in_memory_loads_as_its_file_does() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let bytes: &'static [u8] = Box::leak(tiny_bytes().into_boxed_slice());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(artefact::FILE_NAME);
        std::fs::write(&file, bytes).unwrap();
        let built_in = ModelSource::BuiltIn {
            name: "tiny".into(),
            bytes,
        };
        let run = ModelSource::Path(dir.path().to_path_buf());
        assert_eq!(run.resolved().unwrap(), ModelSource::Path(file.clone()));
        assert_eq!(built_in.resolved().unwrap(), built_in);
        assert_eq!(built_in.metadata().unwrap(), run.metadata().unwrap());
        let x = tch::Tensor::rand([1, 3, 8, 8], (tch::Kind::Float, Device::Cpu));
        let (a, _) = built_in.load(Device::Cpu).unwrap();
        let (b, _) = run.load(Device::Cpu).unwrap();
        assert_eq!(a.denoise(&x, None).unwrap(), b.denoise(&x, None).unwrap());
        assert_eq!(built_in.to_string(), "tiny (built in)");
        assert_eq!(run.to_string(), dir.path().display().to_string());

        let broken = ModelSource::BuiltIn {
            name: "broken".into(),
            bytes: &bytes[..bytes.len() - 10],
        };
        let err = broken.load(Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("built-in model broken"), "{err}");
    }

    #[test]
    fn a_catalog_finds_a_path_first_then_a_name_and_lists_what_it_knows() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.safetensors", "a.safetensors", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("c.safetensors")).unwrap();
        let catalog = Catalog::from_dir(dir.path()).unwrap();
        assert_eq!(catalog.names().collect::<Vec<_>>(), ["a", "b"]);
        let a = dir.path().join("a.safetensors");
        assert_eq!(catalog.resolve("a").unwrap(), ModelSource::Path(a.clone()));
        let notes = dir.path().join("notes.txt");
        let spec = notes.to_str().unwrap();
        assert_eq!(
            catalog.resolve(spec).unwrap(),
            ModelSource::Path(notes.clone())
        );
        let err = catalog.resolve("nope").unwrap_err().to_string();
        assert!(
            err.contains("no model 'nope'") && err.contains("(shipped: a, b)"),
            "{err}"
        );

        let mut catalog = Catalog::new([
            ("z".to_owned(), ModelSource::Path("z1".into())),
            ("y".to_owned(), ModelSource::Path("y".into())),
        ]);
        catalog.insert("z".into(), ModelSource::Path("z2".into()));
        assert_eq!(catalog.names().collect::<Vec<_>>(), ["y", "z"]);
        assert_eq!(catalog.get("z"), Some(&ModelSource::Path("z2".into())));
        assert!(Catalog::from_dir(&dir.path().join("missing")).is_err());
    }
}
