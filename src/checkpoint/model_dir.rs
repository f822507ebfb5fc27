//! An HF CLIP model directory: `config.json` and its safetensors, `CLIPVisionModel` or `CLIPModel`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::TensorStore;
use crate::config::VisionConfig;
use crate::model::WemoeSpec;

/// What a model directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// HF `CLIPVisionModel` (`model_type: clip_vision_model`), possibly with a projection.
    ClipVision,
    /// HF `CLIPModel` (`model_type: clip`): vision and text towers, projections, `logit_scale`.
    Clip,
    /// A CLIP vision model whose MLPs are WEMoE modules (FusionBench's layout).
    Wemoe,
}

impl ModelKind {
    /// The HF class name.
    pub fn hf_name(&self) -> &'static str {
        match self {
            ModelKind::ClipVision => "CLIPVisionModel",
            ModelKind::Clip => "CLIPModel",
            ModelKind::Wemoe => "WEMoE CLIPVisionModel",
        }
    }
}

/// An opened model directory: its parsed config and its tensors, mapped but not yet read.
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// What it holds.
    pub kind: ModelKind,
    /// The vision tower's dimensions.
    pub config: VisionConfig,
    /// The whole `config.json`.
    pub json: Value,
    /// The tensors.
    pub store: TensorStore,
    /// For a WEMoE model: its experts and routers.
    pub wemoe: Option<WemoeSpec>,
}

impl ModelDir {
    /// Opens `path`, reading `config.json` and mapping the safetensors files.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("{}: no such model directory", path.display());
        }
        if !path.is_dir() {
            // A model's own file given for its folder: name the folder.
            let folder = path.parent().filter(|f| f.join("config.json").is_file());
            let hint = folder.map_or(String::new(), |f| format!("; for the model in its folder, give {}", f.display()));
            bail!("{}: a model must be a directory holding config.json and model.safetensors{hint}", path.display());
        }
        let config_path = path.join("config.json");
        if !config_path.exists() {
            crate::hub_cache::check_not_dangling(&config_path)?;
            // An adapt or AdaMerging run's folder before its model: say so, and where the way on is.
            if let Some(file) = crate::adapt::run_checkpoint(path) {
                bail!(
                    "{}: holds a run's checkpoint ({}) but no model yet; `wemoe-engine info` of this folder \
                     prints the command that continues the run and writes its model",
                    path.display(),
                    file.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            bail!("{}: missing config.json", path.display());
        }
        let text =
            std::fs::read_to_string(&config_path).with_context(|| format!("{}: cannot read", config_path.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", config_path.display()))?;
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (kind, config) = match model_type {
            "clip_vision_model" => (ModelKind::ClipVision, VisionConfig::from_json(&json, &config_path)?),
            "clip" => {
                let mut vision = json.get("vision_config").cloned().unwrap_or_else(|| serde_json::json!({}));
                // CLIPConfig keeps the joint width at the top level.
                if let (Some(obj), Some(p)) = (vision.as_object_mut(), json.get("projection_dim")) {
                    obj.insert("projection_dim".into(), p.clone());
                }
                (ModelKind::Clip, VisionConfig::from_json(&vision, &config_path)?)
            }
            "" => bail!("{}: no \"model_type\"; expected clip or clip_vision_model", config_path.display()),
            other => bail!(
                "{}: model_type '{other}' is not a CLIP model (expected clip or clip_vision_model)",
                config_path.display()
            ),
        };
        let store = TensorStore::open_dir(path)?;
        // Ours say so in config.json; FusionBench's are recognised by their keys.
        let wemoe = match json.get("wemoe") {
            Some(object) => {
                let spec = WemoeSpec::from_json(object, &config_path)?;
                spec.check_tensors(&store, &config_path)?;
                Some(spec)
            }
            None => WemoeSpec::infer(&store),
        };
        let kind = if wemoe.is_some() { ModelKind::Wemoe } else { kind };
        Ok(ModelDir { path: path.to_path_buf(), kind, config, json, store, wemoe })
    }

    /// The files the model is read from: `config.json`, `preprocessor_config.json` and a shard index where
    /// present, and the tensors' files.
    pub fn files(&self) -> Vec<PathBuf> {
        let named =
            ["config.json", "preprocessor_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"];
        let mut files: Vec<PathBuf> = named.iter().map(|n| self.path.join(n)).filter(|p| p.is_file()).collect();
        files.extend(self.store.files().iter().map(|f| f.path().to_path_buf()));
        files
    }

    /// Bytes of the f32 weights a pass holds (the vision tower and its projection): `(resident, streamed)`, all of
    /// them, or all but the encoder layers and the largest of those (one layer at a time).
    pub fn weight_bytes(&self) -> (usize, usize) {
        let all = self.store.count_params("vision_model.") + self.store.count_params("visual_projection.");
        let layers: Vec<usize> = (0..self.config.num_hidden_layers)
            .map(|l| self.store.count_params(&format!("vision_model.encoder.layers.{l}.")))
            .collect();
        let streamed = all - layers.iter().sum::<usize>() + layers.iter().max().copied().unwrap_or(0);
        (4 * all, 4 * streamed)
    }

    /// True when the checkpoint carries `visual_projection.weight`.
    pub fn has_projection(&self) -> bool {
        self.store.contains("visual_projection.weight")
    }

    /// HF's raw `logit_scale` (the engine uses its exp), when the checkpoint has one.
    pub fn logit_scale(&self) -> Result<Option<f32>> {
        if !self.store.contains("logit_scale") {
            return Ok(None);
        }
        Ok(Some(self.store.get("logit_scale", &[1])?.host()?[0]))
    }
}
