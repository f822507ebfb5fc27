//! The image side of CLIP: the vision tower, then `visual_projection` when the checkpoint has one.

use anyhow::{ensure, Result};

use super::{ClipVision, Routing, WeightSource};
use crate::checkpoint::ModelDir;
use crate::config::VisionConfig;
use crate::device::{Backend, LinearWeight};
use crate::tensor::Tensor;

/// A vision tower with its optional projection and `logit_scale`.
pub struct ImageEncoder {
    /// The vision tower.
    pub vision: ClipVision,
    /// `visual_projection.weight` `[P, D]`, no bias.
    pub projection: Option<LinearWeight>,
    /// HF's raw `logit_scale`.
    pub logit_scale: Option<f32>,
}

/// What one batch gives.
pub struct EncoderOutput {
    /// `post_layernorm(CLS)`, `[B, D]`.
    pub pooled: Tensor,
    /// `pooled · projectionᵀ`, `[B, P]`, not normalised; when a projection is known.
    pub image_embeds: Option<Tensor>,
    /// Per WEMoE layer, the merge coefficients used (`[B, T]`, or `[1, T]` for one merge per batch).
    pub routing_weights: Vec<Tensor>,
}

impl ImageEncoder {
    /// Loads the vision tower and, if present, the projection and `logit_scale` of a model directory.
    pub fn load(be: &dyn Backend, dir: &ModelDir) -> Result<Self> {
        let mut encoder = Self::load_without_layers(be, dir)?;
        encoder.vision.layers = ClipVision::load_layers(be, &dir.store, &dir.config, dir.wemoe.as_ref())?;
        Ok(encoder)
    }

    /// [`Self::load`] without the encoder layers, for [`crate::model::StreamedEncoder`], which loads them one at a
    /// time.
    pub fn load_without_layers(be: &dyn Backend, dir: &ModelDir) -> Result<Self> {
        let vision = ClipVision::load_without_layers(be, &dir.store, &dir.config)?;
        let projection = if dir.has_projection() {
            let shape = [dir.config.projection_dim, dir.config.hidden_size];
            Some(be.prepare_linear(dir.store.get("visual_projection.weight", &shape)?)?)
        } else {
            None
        };
        Ok(ImageEncoder { vision, projection, logit_scale: dir.logit_scale()? })
    }

    /// A seeded random model of `config`'s shape, with a projection (for benchmarks and tests); a WEMoE
    /// model when `wemoe` is given.
    pub fn random(
        be: &dyn Backend,
        config: &VisionConfig,
        wemoe: Option<&super::WemoeSpec>,
        seed: u64,
    ) -> Result<Self> {
        let src = super::RandomWeights::new(seed);
        let vision = ClipVision::load(be, &src, config, wemoe)?;
        let projection =
            be.prepare_linear(src.get("visual_projection.weight", &[config.projection_dim, config.hidden_size])?)?;
        Ok(ImageEncoder { vision, projection: Some(projection), logit_scale: Some(100f32.ln()) })
    }

    /// Pooled output and, with a projection, the image embeddings of `pixels` `[B, C, S, S]`; WEMoE layers
    /// route under `routing` (batch routing averages over this call's batch).
    pub fn encode(&self, be: &dyn Backend, pixels: &Tensor, routing: Routing) -> Result<EncoderOutput> {
        self.check_pixels(pixels)?;
        let out = self.vision.forward(be, pixels, routing)?;
        let image_embeds = self.projection.as_ref().map(|p| be.linear(&out.pooled, p, None)).transpose()?;
        Ok(EncoderOutput { pooled: out.pooled, image_embeds, routing_weights: out.routing_weights })
    }

    /// An error unless `pixels` is `[B, C, S, S]` with the model's channels and image size.
    pub fn check_pixels(&self, pixels: &Tensor) -> Result<()> {
        let c = &self.vision.config;
        let s = pixels.shape();
        ensure!(
            s.len() == 4 && s[1] == c.num_channels && s[2] == c.image_size && s[3] == c.image_size,
            "pixel values of shape {s:?} do not fit the model's [B, {}, {}, {}]",
            c.num_channels,
            c.image_size,
            c.image_size
        );
        Ok(())
    }
}
