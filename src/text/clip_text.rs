//! HF `CLIPTextTransformer` and `text_projection`: token and position embeddings, pre-norm encoder layers
//! under a causal mask, `final_layer_norm` at the pooled token, then the projection. On the CPU backend:
//! it runs once per heads file, over a few thousand short prompts.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::Value;

use super::shared_prefix::prefix_groups;
use crate::config::{hidden_act, layer_norm_eps, positive_int};
use crate::device::{Activation, Backend, Device};
use crate::model::{ClipMlp, LayerNorm, Linear, WeightSource};
use crate::ops::attention::{attend, Span};
use crate::tensor::Tensor;

/// Rows (prompts × tokens) per forward pass: large enough for the products to run at speed, small enough
/// that activations stay a few tens of MB at ViT-L widths.
const ROWS_PER_PASS: usize = 4096;

/// Every dimension of a CLIP text tower, and its pooling rule.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// The longest prompt in tokens, `<|startoftext|>` and `<|endoftext|>` included.
    pub max_position_embeddings: usize,
    /// Width of the joint space.
    pub projection_dim: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// The MLP's activation.
    pub hidden_act: Activation,
    /// `eos_token_id`: the pooled token is its first occurrence, or, where a checkpoint says 2 (those saved
    /// before transformers fixed the field, OpenAI's among them), the position of the largest id.
    pub eos_token_id: u32,
}

impl TextConfig {
    /// Reads the text tower of a `config.json`: a `CLIPModel`'s `text_config` (with the top-level
    /// `projection_dim`) or a `CLIPTextModelWithProjection`'s fields; HF's defaults for absent fields.
    pub fn from_model_json(json: &Value, origin: &Path) -> Result<Self> {
        static ABSENT: Value = Value::Null;
        let (object, projection) = match json.get("model_type").and_then(Value::as_str) {
            Some("clip") => (json.get("text_config").unwrap_or(&ABSENT), json),
            Some("clip_text_model") => (json, json),
            other => bail!(
                "{}: model_type {} has no text tower; zero-shot heads need the full CLIPModel (text tower and \
                 projections), e.g. the pretrained openai/clip-vit-base-patch32",
                origin.display(),
                other.map_or("(none)".to_string(), |t| format!("'{t}'"))
            ),
        };
        let int = |from: &Value, key: &str, default: usize| positive_int(from, key, default, origin, "text ");
        let config = TextConfig {
            vocab_size: int(object, "vocab_size", 49408)?,
            hidden_size: int(object, "hidden_size", 512)?,
            intermediate_size: int(object, "intermediate_size", 2048)?,
            num_hidden_layers: int(object, "num_hidden_layers", 12)?,
            num_attention_heads: int(object, "num_attention_heads", 8)?,
            max_position_embeddings: int(object, "max_position_embeddings", 77)?,
            projection_dim: int(projection, "projection_dim", 512)?,
            layer_norm_eps: layer_norm_eps(object, 1e-5, origin, "text ")?,
            hidden_act: hidden_act(object, origin)?,
            eos_token_id: int(object, "eos_token_id", 49407)? as u32,
        };
        ensure!(
            config.hidden_size.is_multiple_of(config.num_attention_heads),
            "{}: text hidden_size {} is not divisible by num_attention_heads {}",
            origin.display(),
            config.hidden_size,
            config.num_attention_heads
        );
        Ok(config)
    }

    /// The position whose output is pooled, as transformers' `CLIPTextTransformer` picks it.
    pub fn pooled_position(&self, ids: &[u32]) -> Option<usize> {
        if self.eos_token_id == 2 {
            let max = ids.iter().max()?;
            ids.iter().position(|id| id == max)
        } else {
            ids.iter().position(|&id| id == self.eos_token_id)
        }
    }
}

/// One pre-norm encoder layer of the text tower.
struct TextLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

/// The text tower with its projection, ready to embed prompts.
pub struct ClipText {
    config: TextConfig,
    /// `[V, D]`, `[P, D]`, on the host.
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<TextLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
}

impl ClipText {
    /// Loads `text_model.*` and `text_projection.weight` from `src` onto `be`, which must be the CPU backend.
    pub fn load(be: &dyn Backend, src: &dyn WeightSource, config: &TextConfig) -> Result<Self> {
        ensure!(be.device() == Device::Cpu, "the text tower runs on the CPU backend, not {}", be.device());
        let c = config;
        let (d, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let prefix = format!("text_model.encoder.layers.{l}");
                let lin = |name: &str, out, inp| Linear::load(be, src, &format!("{prefix}.{name}"), out, inp, true);
                Ok(TextLayer {
                    layer_norm1: LayerNorm::load(be, src, &format!("{prefix}.layer_norm1"), d, eps)?,
                    q_proj: lin("self_attn.q_proj", d, d)?,
                    k_proj: lin("self_attn.k_proj", d, d)?,
                    v_proj: lin("self_attn.v_proj", d, d)?,
                    out_proj: lin("self_attn.out_proj", d, d)?,
                    layer_norm2: LayerNorm::load(be, src, &format!("{prefix}.layer_norm2"), d, eps)?,
                    mlp: ClipMlp { fc1: lin("mlp.fc1", i, d)?, fc2: lin("mlp.fc2", d, i)?, activation: c.hidden_act },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipText {
            config: config.clone(),
            token_embedding: src.get("text_model.embeddings.token_embedding.weight", &[c.vocab_size, d])?,
            position_embedding: src
                .get("text_model.embeddings.position_embedding.weight", &[c.max_position_embeddings, d])?,
            layers,
            final_layer_norm: LayerNorm::load(be, src, "text_model.final_layer_norm", d, eps)?,
            text_projection: Linear::load(be, src, "text_projection", c.projection_dim, d, false)?,
        })
    }

    /// The tower's dimensions.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The tokens of `ids` the tower runs, up to and including the pooled one; an error for an id outside
    /// the vocabulary, no end-of-text token, or more tokens than the tower has positions.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<usize> {
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} is outside the text tower's {} embeddings", c.vocab_size);
        }
        let pooled = c.pooled_position(ids).context("no end-of-text token")?;
        ensure!(
            pooled < c.max_position_embeddings,
            "{} tokens, more than the text tower's {} positions",
            pooled + 1,
            c.max_position_embeddings
        );
        Ok(pooled + 1)
    }

    /// The projected text embedding (`get_text_features`) of each prompt's token ids, `[prompts, P]`,
    /// unnormalised, with the tokens that took. `done` is told how many prompts have been embedded so far.
    ///
    /// Each prompt runs unpadded and only up to its pooled token: the mask is causal, so later tokens (padding
    /// in a batch, in transformers) cannot change that token's output. For the same reason prompts that begin
    /// alike share those tokens' keys and values in every layer: each group's shared beginning runs once, in a
    /// first pass that keeps them, and the members run only their own tokens after it. Prompts of any lengths
    /// run together, as rows of one batch (everything but attention works row by row).
    pub fn embed(&self, be: &dyn Backend, prompts: &[Vec<u32>], done: &mut dyn FnMut(usize)) -> Result<Embedded> {
        let mut used = Vec::with_capacity(prompts.len());
        for (p, ids) in prompts.iter().enumerate() {
            let len = self.check_prompt(ids).with_context(|| format!("prompt {p}"))?;
            used.push(&ids[..len]);
        }
        let groups = prefix_groups(&used);
        // The shared beginnings, their keys and values kept (the `k`th for the `k`th group that shares).
        let beginnings: Vec<Piece> = groups
            .iter()
            .filter(|g| g.shared > 0)
            .map(|g| Piece { ids: &used[g.members[0]][..g.shared], after: None })
            .collect();
        let mut kept = Vec::with_capacity(beginnings.len());
        for chunk in chunks(&beginnings) {
            kept.extend(self.run(be, chunk, &[], true)?.1);
        }
        // Every prompt's own tokens, after its group's beginning.
        let (mut pieces, mut owner) = (Vec::with_capacity(prompts.len()), Vec::with_capacity(prompts.len()));
        let mut k = 0;
        for group in &groups {
            let after = (group.shared > 0).then_some((k, group.shared));
            k += usize::from(group.shared > 0);
            for &m in &group.members {
                pieces.push(Piece { ids: &used[m][group.shared..], after });
                owner.push(m);
            }
        }
        let p_dim = self.config.projection_dim;
        let mut values = vec![0.0f32; prompts.len() * p_dim];
        let mut finished = 0;
        for chunk in chunks(&pieces) {
            let (embeds, _) = self.run(be, chunk, &kept, false)?;
            for (row, &m) in embeds.chunks_exact(p_dim).zip(&owner[finished..]) {
                values[m * p_dim..][..p_dim].copy_from_slice(row);
            }
            finished += chunk.len();
            done(finished);
        }
        let rows = |pieces: &[Piece]| pieces.iter().map(|p| p.ids.len()).sum::<usize>();
        let tokens = used.iter().map(|u| u.len()).sum();
        Ok(Embedded { values, tokens, computed: rows(&beginnings) + rows(&pieces) })
    }

    /// One pass over `pieces` as rows of one batch: the projected embedding of each piece's last token
    /// `[pieces, P]` (none when `keep`), and with `keep` each piece's keys and values in every layer.
    fn run(&self, be: &dyn Backend, pieces: &[Piece], kept: &[Kept], keep: bool) -> Result<(Vec<f32>, Vec<Kept>)> {
        let c = &self.config;
        let d = c.hidden_size;
        let (tokens, positions) = (self.token_embedding.host()?, self.position_embedding.host()?);
        let rows: usize = pieces.iter().map(|p| p.ids.len()).sum();
        let mut x = Vec::with_capacity(rows * d);
        for piece in pieces {
            let start = piece.after.map_or(0, |(_, shared)| shared);
            for (t, &id) in piece.ids.iter().enumerate() {
                let (token, position) = (&tokens[id as usize * d..][..d], &positions[(start + t) * d..][..d]);
                x.extend(token.iter().zip(position).map(|(a, b)| a + b));
            }
        }
        // Each piece's first row.
        let firsts: Vec<usize> =
            pieces.iter().scan(0, |at, p| Some(std::mem::replace(at, *at + p.ids.len()))).collect();
        let mut new_kept: Vec<Kept> = if keep { pieces.iter().map(|_| Kept::default()).collect() } else { Vec::new() };
        let mut x = Tensor::from_vec(&[rows, d], x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.layer_norm1.forward(be, &x)?;
            let (q, k, v) =
                (layer.q_proj.forward(be, &h)?, layer.k_proj.forward(be, &h)?, layer.v_proj.forward(be, &h)?);
            let (q, k, v) = (q.host()?, k.host()?, v.host()?);
            let mut a = vec![0.0f32; rows * d];
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(pieces.len());
            let mut rest = a.as_mut_slice();
            for piece in pieces {
                let (head, tail) = rest.split_at_mut(piece.ids.len() * d);
                outs.push(head);
                rest = tail;
            }
            outs.into_par_iter().zip(pieces.par_iter().zip(&firsts)).try_for_each(|(out, (piece, &first))| {
                let own = first * d..(first + piece.ids.len()) * d;
                let (keys, values) = match piece.after {
                    None => (k[own.clone()].to_vec(), v[own.clone()].to_vec()),
                    Some((index, _)) => {
                        let before = &kept[index];
                        ([&before.keys[l], &k[own.clone()]].concat(), [&before.values[l], &v[own.clone()]].concat())
                    }
                };
                let span = Span {
                    queries: piece.ids.len(),
                    keys: keys.len() / d,
                    width: d,
                    heads: c.num_attention_heads,
                    causal: true,
                };
                attend(&q[own], &keys, &values, span, out)
            })?;
            if keep {
                for ((piece, &first), kept) in pieces.iter().zip(&firsts).zip(&mut new_kept) {
                    let own = first * d..(first + piece.ids.len()) * d;
                    kept.keys.push(k[own.clone()].to_vec());
                    kept.values.push(v[own].to_vec());
                }
                if l + 1 == self.layers.len() {
                    break; // the last layer's keys and values kept: its output is no one's input
                }
            }
            let a = layer.out_proj.forward(be, &Tensor::from_vec(&[rows, d], a)?)?;
            x = be.add(x, &a)?;
            let h = layer.layer_norm2.forward(be, &x)?;
            x = be.add(x, &layer.mlp.forward(be, &h)?)?;
        }
        if keep {
            return Ok((Vec::new(), new_kept));
        }
        let hidden = x.host()?;
        let mut last = Vec::with_capacity(pieces.len() * d);
        for (piece, &first) in pieces.iter().zip(&firsts) {
            last.extend_from_slice(&hidden[(first + piece.ids.len() - 1) * d..][..d]);
        }
        let pooled = self.final_layer_norm.forward(be, &Tensor::from_vec(&[pieces.len(), d], last)?)?;
        Ok((be.to_host(&self.text_projection.forward(be, &pooled)?)?, Vec::new()))
    }
}

/// Prompts' text embeddings, and what computing them took.
pub struct Embedded {
    /// `[prompts, P]`, unnormalised.
    pub values: Vec<f32>,
    /// Tokens in all, up to each prompt's pooled one.
    pub tokens: usize,
    /// Tokens the tower ran: each shared beginning once, then every prompt's own.
    pub computed: usize,
}

/// Tokens one pass runs for one prompt or shared beginning: `ids`, after, when `after` is `(index, shared)`,
/// the first `shared` tokens whose keys and values the first pass kept at `index`.
struct Piece<'a> {
    ids: &'a [u32],
    after: Option<(usize, usize)>,
}

/// A shared beginning's keys and values, `[shared, D]` each, per layer.
#[derive(Default)]
struct Kept {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// `pieces` in runs of about [`ROWS_PER_PASS`] rows (at least one piece each).
fn chunks<'a, 'b>(pieces: &'b [Piece<'a>]) -> Vec<&'b [Piece<'a>]> {
    let mut out = Vec::new();
    let (mut start, mut rows) = (0, 0);
    for (i, piece) in pieces.iter().enumerate() {
        if rows > 0 && rows + piece.ids.len() > ROWS_PER_PASS {
            out.push(&pieces[start..i]);
            (start, rows) = (i, 0);
        }
        rows += piece.ids.len();
    }
    if start < pieces.len() {
        out.push(&pieces[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: Value) -> Result<TextConfig> {
        TextConfig::from_model_json(&json, Path::new("config.json"))
    }

    #[test]
    fn a_clip_configs_text_tower_and_top_level_projection() {
        let c = config(serde_json::json!({
            "model_type": "clip", "projection_dim": 24,
            "text_config": {"hidden_size": 32, "num_attention_heads": 2, "eos_token_id": 2, "hidden_act": "gelu"},
        }))
        .unwrap();
        assert_eq!((c.hidden_size, c.projection_dim, c.eos_token_id, c.hidden_act), (32, 24, 2, Activation::Gelu));
        assert_eq!((c.vocab_size, c.max_position_embeddings, c.num_hidden_layers), (49408, 77, 12));
        let c = config(serde_json::json!({"model_type": "clip_text_model", "projection_dim": 16})).unwrap();
        assert_eq!((c.hidden_size, c.projection_dim, c.eos_token_id), (512, 16, 49407));
        let e = config(serde_json::json!({"model_type": "clip_vision_model"})).unwrap_err();
        assert!(e.to_string().contains("model_type 'clip_vision_model' has no text tower"), "{e}");
        let e = config(
            serde_json::json!({"model_type": "clip", "text_config": {"hidden_size": 30, "num_attention_heads": 4}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not divisible"), "{e}");
    }

    #[test]
    fn the_pooled_token_follows_transformers_rule() {
        let mut c = config(serde_json::json!({"model_type": "clip", "text_config": {"eos_token_id": 7}})).unwrap();
        // The first end-of-text token, wherever a larger id is.
        assert_eq!(c.pooled_position(&[5, 9, 7, 3, 7]), Some(2));
        assert_eq!(c.pooled_position(&[5, 9]), None);
        // eos_token_id 2 (checkpoints saved before transformers fixed the field): the first largest id.
        c.eos_token_id = 2;
        assert_eq!(c.pooled_position(&[5, 9, 7, 9, 2]), Some(1));
    }
}
