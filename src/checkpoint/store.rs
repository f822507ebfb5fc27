//! The tensors of a model, over one file or many shards, under canonical HF names.
//!
//! transformers ≥ 5 may save a `CLIPVisionModel` without the `vision_model.` prefix; the store accepts
//! both spellings and answers under the prefixed one. `position_ids` buffers are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::SafetensorsFile;
use crate::tensor::Tensor;

/// Top-level modules of the vision tower, as found in unprefixed checkpoints.
const VISION_ROOTS: [&str; 4] = ["embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."];

/// The canonical name of a stored key.
fn canonical(key: &str) -> String {
    if VISION_ROOTS.iter().any(|root| key.starts_with(root)) {
        format!("vision_model.{key}")
    } else {
        key.to_string()
    }
}

/// A model's tensors across one or more safetensors files.
pub struct TensorStore {
    origin: PathBuf,
    files: Vec<SafetensorsFile>,
    /// canonical name -> (file index, stored key)
    index: BTreeMap<String, (usize, String)>,
}

impl TensorStore {
    /// The tensors of an HF model directory: `model.safetensors`, or the shards that
    /// `model.safetensors.index.json` lists; else `pytorch_model.bin` or the shards of
    /// `pytorch_model.bin.index.json` (read without running their pickles).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let paths = if let Some(shards) = Self::shards(dir, "model.safetensors.index.json")? {
            shards
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else if let Some(shards) = Self::shards(dir, "pytorch_model.bin.index.json")? {
            shards
        } else if dir.join("pytorch_model.bin").exists() {
            vec![dir.join("pytorch_model.bin")]
        } else {
            let names = ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json"];
            for name in names.iter().chain(&["pytorch_model.bin"]) {
                crate::hub_cache::check_not_dangling(&dir.join(name))?;
            }
            bail!("{}: no model.safetensors, pytorch_model.bin or their index.json", dir.display());
        };
        Self::open_files(dir, &paths)
    }

    /// The shard files an index (`model.safetensors.index.json`) of `dir` lists, if `dir` has it.
    fn shards(dir: &Path, index: &str) -> Result<Option<Vec<PathBuf>>> {
        let index_path = dir.join(index);
        if !index_path.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&index_path).with_context(|| format!("{}: cannot read", index_path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index_path.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no \"weight_map\" object", index_path.display()))?;
        let mut shards = BTreeSet::new();
        for (key, file) in map {
            let file =
                file.as_str().with_context(|| format!("{}: shard of '{key}' is not a string", index_path.display()))?;
            if Path::new(file).components().count() != 1 {
                bail!("{}: shard name '{file}' must be a plain file name", index_path.display());
            }
            shards.insert(dir.join(file));
        }
        Ok(Some(shards.into_iter().collect()))
    }

    /// The tensors of a single safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(path, &[path.to_path_buf()])
    }

    fn open_files(origin: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = SafetensorsFile::open_any(path)?;
            for key in file.names() {
                if key.ends_with("position_ids") {
                    continue;
                }
                let name = canonical(key);
                // A prefixed key wins over an unprefixed duplicate.
                if index.contains_key(&name) && name != key {
                    continue;
                }
                index.insert(name, (files.len(), key.to_string()));
            }
            files.push(file);
        }
        Ok(TensorStore { origin: origin.to_path_buf(), files, index })
    }

    /// The directory or file the store was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The files behind the store.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// True when the store has `name` (canonical spelling).
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every canonical name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let (file, key) = self.index.get(name)?;
        self.files[*file].info(key).map(|i| i.shape.as_slice())
    }

    /// The stored dtype of `name`.
    pub fn dtype(&self, name: &str) -> Option<safetensors::Dtype> {
        let (file, key) = self.index.get(name)?;
        self.files[*file].info(key).map(|i| i.dtype)
    }

    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &str)> {
        let (file, key) =
            self.index.get(name).with_context(|| format!("{}: missing tensor '{name}'", self.origin.display()))?;
        Ok((&self.files[*file], key))
    }

    /// Tensor `name` as f32, checked to have `shape` and only finite values.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (file, key) = self.locate(name)?;
        let stored = &file.info(key).expect("indexed key exists").shape;
        // A scalar may be stored as [] or [1].
        let scalar_ok = shape.iter().product::<usize>() == 1 && stored.iter().product::<usize>() == 1;
        if stored.as_slice() != shape && !scalar_ok {
            bail!("{}: tensor '{key}' has shape {stored:?}, expected {shape:?}", file.path().display());
        }
        let tensor = file.f32(key)?;
        if let Some((at, value)) = tensor.first_non_finite()? {
            bail!("{}: tensor '{key}' holds a non-finite value ({value} at element {at})", file.path().display());
        }
        tensor.reshape(shape)
    }

    /// Tensor `name` as f32 with whatever shape it has, checked for non-finite values.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let shape = self.shape(name).map(<[usize]>::to_vec).unwrap_or_default();
        self.get(name, &shape)
    }

    /// Drops the resident pages of tensor `name` (see [`SafetensorsFile::release`]).
    pub fn release(&self, name: &str) {
        if let Some((file, key)) = self.index.get(name) {
            self.files[*file].release(key);
        }
    }

    /// [`Self::release`] for every tensor whose canonical name starts with `prefix`.
    pub fn release_prefix(&self, prefix: &str) {
        self.index.keys().filter(|name| name.starts_with(prefix)).for_each(|name| self.release(name));
    }

    /// Total number of elements over the tensors whose canonical name starts with `prefix`.
    pub fn count_params(&self, prefix: &str) -> usize {
        self.index
            .keys()
            .filter(|name| name.starts_with(prefix))
            .filter_map(|name| self.shape(name))
            .map(|s| s.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn unprefixed_vision_keys_gain_the_prefix() {
        assert_eq!(canonical("encoder.layers.0.mlp.fc1.weight"), "vision_model.encoder.layers.0.mlp.fc1.weight");
        assert_eq!(canonical("vision_model.pre_layrnorm.bias"), "vision_model.pre_layrnorm.bias");
        assert_eq!(canonical("visual_projection.weight"), "visual_projection.weight");
        assert_eq!(canonical("logit_scale"), "logit_scale");
    }
}
