//! HF `CLIPVisionTransformer`: embeddings, `pre_layrnorm`, pre-norm encoder layers, `post_layernorm`
//! of the class token.

use anyhow::{ensure, Result};

use super::wemoe::{Routing, WemoeMlp, WemoeSpec};
use super::WeightSource;
use crate::config::VisionConfig;
use crate::device::{Activation, Backend, LinearWeight};
use crate::tensor::Tensor;

/// Loads `name` with `shape` from `src` onto `be`'s device.
fn load(be: &dyn Backend, src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor> {
    be.upload(src.get(name, shape)?)
}

/// A PyTorch `Linear`: weight `[out, in]` (as prepared by the backend), optional bias `[out]`.
pub struct Linear {
    /// The weight, in the backend's layout.
    pub weight: LinearWeight,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let weight = be.prepare_linear(src.get(&name, &[out, inp])?)?;
        src.release(&name);
        let bias = if bias { Some(load(be, src, &format!("{prefix}.bias"), &[out])?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// `x · weightᵀ + bias`.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        be.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A PyTorch `LayerNorm` over the last axis.
pub struct LayerNorm {
    /// `[D]`.
    pub weight: Tensor,
    /// `[D]`.
    pub bias: Tensor,
    /// Epsilon added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(be: &dyn Backend, src: &dyn WeightSource, prefix: &str, width: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: load(be, src, &format!("{prefix}.weight"), &[width])?,
            bias: load(be, src, &format!("{prefix}.bias"), &[width])?,
            eps,
        })
    }

    /// The normalised input.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        be.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// HF `CLIPVisionEmbeddings`.
pub struct Embeddings {
    /// `[D]`.
    pub class_embedding: Tensor,
    /// Convolution weight `[D, C, P, P]`, no bias.
    pub patch_embedding: Tensor,
    /// `[N, D]`.
    pub position_embedding: Tensor,
}

/// HF `CLIPAttention`.
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    /// Number of heads.
    pub heads: usize,
}

impl ClipAttention {
    /// Self-attention of `x` `[B, N, D]`.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(be, x)?;
        let k = self.k_proj.forward(be, x)?;
        let v = self.v_proj.forward(be, x)?;
        let a = be.attention(&q, &k, &v, self.heads)?;
        self.out_proj.forward(be, &a)
    }
}

/// HF `CLIPMLP`: `fc2(act(fc1(x)))`.
pub struct ClipMlp {
    /// `[I, D]`.
    pub fc1: Linear,
    /// `[D, I]`.
    pub fc2: Linear,
    /// The activation between them.
    pub activation: Activation,
}

impl ClipMlp {
    /// The MLP of `x`.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(be, x)?;
        let h = be.activation(h, self.activation)?;
        self.fc2.forward(be, &h)
    }
}

/// An encoder layer's feed-forward block: CLIP's dense MLP, or a WEMoE MLP.
#[allow(clippy::large_enum_variant)] // one per layer, never moved in a hot path
pub enum Mlp {
    /// HF `CLIPMLP`.
    Dense(ClipMlp),
    /// FusionBench's `WeightEnsemblingMoE`.
    Wemoe(WemoeMlp),
}

impl Mlp {
    /// The block's output and, for WEMoE, the merge coefficients used.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor, routing: Routing) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Mlp::Dense(mlp) => Ok((mlp.forward(be, x)?, None)),
            Mlp::Wemoe(moe) => moe.forward(be, x, routing).map(|(y, c)| (y, Some(c))),
        }
    }

    /// The block's output at token `index` of `x` `[B, N, D]` alone, `[B, D]`, and the merge coefficients:
    /// a WEMoE router still reads every token, but the products run on `B` rows instead of `B·N`.
    pub fn forward_token(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        index: usize,
        routing: Routing,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let token = be.select_token(x, index)?;
        match self {
            Mlp::Dense(mlp) => Ok((mlp.forward(be, &token)?, None)),
            Mlp::Wemoe(moe) => {
                let coefficients = moe.coefficients(be, x, routing)?;
                Ok((moe.mix(be, &token, &coefficients)?, Some(coefficients)))
            }
        }
    }
}

/// HF `CLIPEncoderLayer` (pre-norm).
pub struct ClipEncoderLayer {
    /// Before attention.
    pub layer_norm1: LayerNorm,
    /// Multi-head self-attention.
    pub self_attn: ClipAttention,
    /// Before the MLP (and, in WEMoE, the router's input).
    pub layer_norm2: LayerNorm,
    /// The feed-forward block.
    pub mlp: Mlp,
}

impl ClipEncoderLayer {
    fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        prefix: &str,
        c: &VisionConfig,
        wemoe: Option<&WemoeSpec>,
    ) -> Result<Self> {
        let (d, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let lin = |name: &str, out, inp| Linear::load(be, src, &format!("{prefix}.{name}"), out, inp, true);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(be, src, &format!("{prefix}.layer_norm1"), d, eps)?,
            self_attn: ClipAttention {
                q_proj: lin("self_attn.q_proj", d, d)?,
                k_proj: lin("self_attn.k_proj", d, d)?,
                v_proj: lin("self_attn.v_proj", d, d)?,
                out_proj: lin("self_attn.out_proj", d, d)?,
                heads: c.num_attention_heads,
            },
            layer_norm2: LayerNorm::load(be, src, &format!("{prefix}.layer_norm2"), d, eps)?,
            mlp: match wemoe {
                None => Mlp::Dense(ClipMlp {
                    fc1: lin("mlp.fc1", i, d)?,
                    fc2: lin("mlp.fc2", d, i)?,
                    activation: c.hidden_act,
                }),
                Some(spec) => Mlp::Wemoe(WemoeMlp::load(be, src, &format!("{prefix}.mlp"), c, spec)?),
            },
        })
    }

    /// `h = x + attn(ln1(x)); h + mlp(ln2(h))`, and the MLP's merge coefficients for WEMoE.
    pub fn forward(&self, be: &dyn Backend, x: &Tensor, routing: Routing) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.attention_residual(be, x)?;
        let (m, coefficients) = self.mlp.forward(be, &self.layer_norm2.forward(be, &h)?, routing)?;
        Ok((be.add(m, &h)?, coefficients))
    }

    /// `x + attn(ln1(x))`, every token.
    fn attention_residual(&self, be: &dyn Backend, x: &Tensor) -> Result<Tensor> {
        let a = self.self_attn.forward(be, &self.layer_norm1.forward(be, x)?)?;
        // attn(...) + x rather than x + attn(...): the sum reuses the fresh buffer, not the input.
        be.add(a, x)
    }

    /// [`Self::forward`]'s output at the class token alone, `[B, D]`: all the last layer's output the pooled
    /// output reads. Attention and a WEMoE router see every token as before; the MLP, two thirds of the
    /// layer's products, runs on the class tokens only.
    pub fn forward_class_token(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        routing: Routing,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let h = self.attention_residual(be, x)?;
        let (m, coefficients) = self.mlp.forward_token(be, &self.layer_norm2.forward(be, &h)?, 0, routing)?;
        Ok((be.add(m, &be.select_token(&h, 0)?)?, coefficients))
    }
}

/// The vision tower's outputs.
pub struct VisionOutput {
    /// `post_layernorm(CLS)`, `[B, D]`.
    pub pooled: Tensor,
    /// Per WEMoE layer, the merge coefficients used: `[B, T]`, or `[1, T]` when one merge served the batch.
    /// Empty for a dense model.
    pub routing_weights: Vec<Tensor>,
}

/// HF `CLIPVisionTransformer`, the vision tower up to the pooled output.
pub struct ClipVision {
    /// Its dimensions.
    pub config: VisionConfig,
    /// Patch, class and position embeddings.
    pub embeddings: Embeddings,
    /// LayerNorm before the encoder (HF's spelling).
    pub pre_layrnorm: LayerNorm,
    /// The encoder layers.
    pub layers: Vec<ClipEncoderLayer>,
    /// LayerNorm of the class token.
    pub post_layernorm: LayerNorm,
}

impl ClipVision {
    /// Loads every tensor under `vision_model.`, checking each shape against `config`; with `wemoe`,
    /// every layer's MLP is a WEMoE MLP.
    pub fn load(
        be: &dyn Backend,
        src: &dyn WeightSource,
        config: &VisionConfig,
        wemoe: Option<&WemoeSpec>,
    ) -> Result<Self> {
        let mut vision = Self::load_without_layers(be, src, config)?;
        vision.layers = Self::load_layers(be, src, config, wemoe)?;
        Ok(vision)
    }

    /// Every encoder layer, in order ([`Self::load_layer`] for each).
    pub fn load_layers(
        be: &dyn Backend,
        src: &dyn WeightSource,
        config: &VisionConfig,
        wemoe: Option<&WemoeSpec>,
    ) -> Result<Vec<ClipEncoderLayer>> {
        (0..config.num_hidden_layers).map(|l| Self::load_layer(be, src, config, wemoe, l)).collect()
    }

    /// Everything but the encoder layers (`layers` left empty): the embeddings and both LayerNorms, for a
    /// pass that loads the layers one at a time ([`Self::load_layer`]).
    pub fn load_without_layers(be: &dyn Backend, src: &dyn WeightSource, config: &VisionConfig) -> Result<Self> {
        let c = config;
        let (d, p) = (c.hidden_size, c.patch_size);
        let embeddings = Embeddings {
            class_embedding: load(be, src, "vision_model.embeddings.class_embedding", &[d])?,
            patch_embedding: load(
                be,
                src,
                "vision_model.embeddings.patch_embedding.weight",
                &[d, c.num_channels, p, p],
            )?,
            position_embedding: load(be, src, "vision_model.embeddings.position_embedding.weight", &[c.tokens(), d])?,
        };
        let pre_layrnorm = LayerNorm::load(be, src, "vision_model.pre_layrnorm", d, c.layer_norm_eps)?;
        let post_layernorm = LayerNorm::load(be, src, "vision_model.post_layernorm", d, c.layer_norm_eps)?;
        Ok(ClipVision { config: config.clone(), embeddings, pre_layrnorm, layers: Vec::new(), post_layernorm })
    }

    /// The name prefix of encoder layer `l`'s tensors.
    pub fn layer_prefix(l: usize) -> String {
        format!("vision_model.encoder.layers.{l}")
    }

    /// Encoder layer `l` (a WEMoE layer with `wemoe`), its shapes checked against `config`.
    pub fn load_layer(
        be: &dyn Backend,
        src: &dyn WeightSource,
        config: &VisionConfig,
        wemoe: Option<&WemoeSpec>,
        l: usize,
    ) -> Result<ClipEncoderLayer> {
        ClipEncoderLayer::load(be, src, &Self::layer_prefix(l), config, wemoe)
    }

    /// The encoder's input for `pixels` `[B, C, S, S]`: patch, class and position embeddings, then
    /// `pre_layrnorm`; `[B, N, D]`.
    pub fn embed(&self, be: &dyn Backend, pixels: &Tensor) -> Result<Tensor> {
        let e = &self.embeddings;
        let x = be.patch_embed(pixels, &e.patch_embedding, &e.class_embedding, &e.position_embedding)?;
        self.pre_layrnorm.forward(be, &x)
    }

    /// The pooled output: `post_layernorm` of the class token `[B, D]` that the last layer gave
    /// ([`ClipEncoderLayer::forward_class_token`]).
    pub fn pool(&self, be: &dyn Backend, class_token: &Tensor) -> Result<Tensor> {
        let shape = class_token.shape();
        ensure!(
            shape.len() == 2 && shape[1] == self.config.hidden_size,
            "pool: expected the class tokens [B, {}], got {shape:?}",
            self.config.hidden_size
        );
        self.post_layernorm.forward(be, class_token)
    }

    /// The pooled output (`post_layernorm` of the class token) of `pixels` `[B, C, S, S]`, and the WEMoE
    /// layers' merge coefficients under `routing`.
    pub fn forward(&self, be: &dyn Backend, pixels: &Tensor, routing: Routing) -> Result<VisionOutput> {
        let mut x = self.embed(be, pixels)?;
        if self.layers.is_empty() {
            // A config made in code (files need a positive count): pool the embeddings' class token.
            x = be.select_token(&x, 0)?;
        }
        let mut routing_weights = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (y, coefficients) = if l + 1 == self.layers.len() {
                layer.forward_class_token(be, &x, routing)?
            } else {
                layer.forward(be, &x, routing)?
            };
            x = y;
            routing_weights.extend(coefficients);
        }
        Ok(VisionOutput { pooled: self.pool(be, &x)?, routing_weights })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CpuBackend;
    use crate::model::ImageEncoder;

    #[test]
    fn pool_takes_the_class_tokens_the_last_layer_gave() {
        let config = VisionConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            projection_dim: 4,
            ..VisionConfig::default()
        };
        let be = CpuBackend::new();
        let vision = ImageEncoder::random(&be, &config, None, 3).unwrap().vision;
        let pixels = Tensor::from_vec(&[2, 3, 8, 8], (0..384).map(|i| (i % 7) as f32 * 0.1).collect()).unwrap();
        let hidden = vision.embed(&be, &pixels).unwrap();
        // The whole hidden state, as `pool` took it before the last layer gave its class tokens alone.
        let err = vision.pool(&be, &hidden).unwrap_err().to_string();
        assert!(err.contains("expected the class tokens [B, 8], got [2, 5, 8]"), "{err}");
        let pooled = vision.forward(&be, &pixels, Routing::Sample).unwrap().pooled;
        assert_eq!(pooled.shape(), [2, 8]);
    }
}
