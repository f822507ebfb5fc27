//! The vision configuration, read from an HF `config.json` with HF's defaults for absent fields.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::device::Activation;

/// Every dimension of a CLIP vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Width of the residual stream, D.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Encoder layers, L.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Image channels.
    pub num_channels: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Width of the joint space (used when the model has a projection).
    pub projection_dim: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// The MLP's activation.
    pub hidden_act: Activation,
}

impl Default for VisionConfig {
    /// HF's `CLIPVisionConfig` defaults (ViT-B/32).
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            projection_dim: 512,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        }
    }
}

/// `object[key]` as a positive integer, `default` when absent or null; `what` ("text ", say) comes before the
/// key in errors, which name `origin`.
pub(crate) fn positive_int(object: &Value, key: &str, default: usize, origin: &Path, what: &str) -> Result<usize> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .with_context(|| format!("{}: {what}\"{key}\" must be a positive integer, got {v}", origin.display())),
    }
}

/// `object["layer_norm_eps"]`, `default` when absent or null; errors as [`positive_int`]'s.
pub(crate) fn layer_norm_eps(object: &Value, default: f32, origin: &Path, what: &str) -> Result<f32> {
    match object.get("layer_norm_eps") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            Ok(v.as_f64().filter(|e| e.is_finite() && *e >= 0.0).with_context(|| {
                format!("{}: {what}\"layer_norm_eps\" must be a non-negative number", origin.display())
            })? as f32)
        }
    }
}

/// An f32 as the JSON number of its shortest decimal, as a user wrote it (`1e-5`, not the f64 of the f32,
/// `9.999999747378752e-6`), which reads back as the same f32; null when not finite, as serde_json writes those.
pub fn json_f32(x: f32) -> Value {
    x.to_string().parse::<f64>().ok().filter(|v| v.is_finite()).map_or(Value::Null, Value::from)
}

/// `"hidden_act"` of a CLIP tower's config object (quick_gelu when absent, as HF's CLIP configs default).
pub(crate) fn hidden_act(object: &Value, origin: &Path) -> Result<Activation> {
    let name = match object.get("hidden_act") {
        None | Some(Value::Null) => "quick_gelu",
        Some(v) => v.as_str().with_context(|| format!("{}: \"hidden_act\" {v} is not a name", origin.display()))?,
    };
    Ok(match name {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        other => bail!("{}: unsupported \"hidden_act\" '{other}'", origin.display()),
    })
}

impl VisionConfig {
    /// Reads the vision fields of `object` (a `CLIPVisionConfig`); `origin` names the file in errors.
    pub fn from_json(object: &Value, origin: &Path) -> Result<Self> {
        let d = VisionConfig::default();
        let int = |key: &str, default: usize| positive_int(object, key, default, origin, "");
        let layer_norm_eps = layer_norm_eps(object, d.layer_norm_eps, origin, "")?;
        let hidden_act = hidden_act(object, origin)?;
        let config = VisionConfig {
            hidden_size: int("hidden_size", d.hidden_size)?,
            intermediate_size: int("intermediate_size", d.intermediate_size)?,
            num_hidden_layers: int("num_hidden_layers", d.num_hidden_layers)?,
            num_attention_heads: int("num_attention_heads", d.num_attention_heads)?,
            num_channels: int("num_channels", d.num_channels)?,
            image_size: int("image_size", d.image_size)?,
            patch_size: int("patch_size", d.patch_size)?,
            projection_dim: int("projection_dim", d.projection_dim)?,
            layer_norm_eps,
            hidden_act,
        };
        ensure!(
            config.hidden_size.is_multiple_of(config.num_attention_heads),
            "{}: hidden_size {} is not divisible by num_attention_heads {}",
            origin.display(),
            config.hidden_size,
            config.num_attention_heads
        );
        ensure!(
            config.patch_size <= config.image_size,
            "{}: patch_size {} exceeds image_size {}",
            origin.display(),
            config.patch_size,
            config.image_size
        );
        Ok(config)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the patches and the class token.
    pub fn tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The same fields as HF writes them in `config.json`.
    pub fn to_json(&self) -> Value {
        let act = match self.hidden_act {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        };
        serde_json::json!({
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "projection_dim": self.projection_dim,
            "layer_norm_eps": json_f32(self.layer_norm_eps),
            "hidden_act": act,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_fields_take_hf_defaults_and_bad_ones_are_named() {
        let p = Path::new("config.json");
        let c = VisionConfig::from_json(&serde_json::json!({"hidden_size": 48, "num_attention_heads": 4}), p).unwrap();
        assert_eq!((c.hidden_size, c.intermediate_size, c.tokens()), (48, 3072, 50));
        let err = VisionConfig::from_json(&serde_json::json!({"hidden_size": 50, "num_attention_heads": 4}), p);
        assert!(format!("{:#}", err.unwrap_err()).contains("not divisible"));
        let err = VisionConfig::from_json(&serde_json::json!({"hidden_act": "swish"}), p).unwrap_err();
        assert!(format!("{err:#}").contains("swish"));
        // Not a name: refused, not read as the default.
        let err = VisionConfig::from_json(&serde_json::json!({"hidden_act": 5}), p).unwrap_err();
        assert_eq!(format!("{err:#}"), "config.json: \"hidden_act\" 5 is not a name");
    }

    #[test]
    fn f32_settings_are_written_as_their_shortest_decimals_and_read_back_exactly() {
        let c = VisionConfig::from_json(&serde_json::json!({"layer_norm_eps": 1e-5}), Path::new("config.json"));
        assert_eq!(c.unwrap().to_json()["layer_norm_eps"], serde_json::json!(1e-5));
        assert_eq!((json_f32(0.3), json_f32(f32::NAN)), (serde_json::json!(0.3), Value::Null));
        // Every 9973rd bit pattern: the written number, read as JSON readers read it, is the same f32.
        for bits in (0..u32::MAX).step_by(9973) {
            let x = f32::from_bits(bits);
            if x.is_finite() {
                let text = serde_json::to_string(&json_f32(x)).unwrap();
                assert_eq!(text.parse::<f64>().unwrap() as f32, x, "{x:e} written as {text}");
            }
        }
    }
}
