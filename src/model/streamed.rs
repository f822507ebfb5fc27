//! An image encoder whose encoder layers are loaded one at a time: for a span of batches, layer `l` is loaded
//! from the model directory's memory maps, runs every batch of the span, and is dropped (its pages of the
//! map with it) before layer `l + 1` is loaded. Peak memory is then one layer's weights and the span's
//! activations instead of the whole model: for a WEMoE model, whose task vectors are most of its size, a
//! fraction of it. The arithmetic is the resident forward's, op for op, so the outputs are identical.

use std::cell::Cell;
use std::time::Instant;

use anyhow::{bail, Result};

use super::{ClipVision, EncoderOutput, ImageEncoder, Routing};
use crate::checkpoint::{ModelDir, TensorStore};
use crate::device::Backend;
use crate::tensor::Tensor;

/// A model directory's encoder with only its small parts resident (embeddings, LayerNorms, projection).
pub struct StreamedEncoder<'a> {
    /// The encoder without its layers.
    pub shell: ImageEncoder,
    dir: &'a ModelDir,
    span_bytes: usize,
    layer_load_seconds: Cell<f64>,
}

/// The activations a pass keeps at once by default (a span's hidden states, `[images, tokens, hidden]` in
/// f32): 256 MiB is about 1,700 ViT-B/32 or 430 ViT-B/16 images, so a 2-core CPU loads each layer about
/// once per 100 s of forward.
pub const DEFAULT_SPAN_BYTES: usize = 256 << 20;

impl<'a> StreamedEncoder<'a> {
    /// Loads everything of `dir`'s encoder but its layers, and checks from the checkpoint's metadata that
    /// every later layer has layer 0's tensors with layer 0's shapes, so that a fault there is an error now
    /// rather than when the pass reaches it.
    pub fn load(be: &dyn Backend, dir: &'a ModelDir) -> Result<Self> {
        check_layers_alike(&dir.store, dir.config.num_hidden_layers)?;
        let shell = ImageEncoder::load_without_layers(be, dir)?;
        Ok(StreamedEncoder { shell, dir, span_bytes: DEFAULT_SPAN_BYTES, layer_load_seconds: Cell::new(0.0) })
    }

    /// The same encoder with at most `bytes` of hidden states per span (at least one batch).
    pub fn with_span_bytes(mut self, bytes: usize) -> Self {
        self.span_bytes = bytes;
        self
    }

    /// How many batches of `batch_size` images one span holds: as many as fit [`Self::with_span_bytes`]'s
    /// bound, at least one.
    pub fn batches_per_span(&self, batch_size: usize) -> usize {
        let c = &self.shell.vision.config;
        let image_bytes = c.tokens() * c.hidden_size * std::mem::size_of::<f32>();
        (self.span_bytes / (image_bytes * batch_size.max(1))).max(1)
    }

    /// The time spent loading layers so far, in seconds (reported apart from the forward's).
    pub fn layer_load_seconds(&self) -> f64 {
        self.layer_load_seconds.get()
    }

    /// The encoder outputs of `batches` batches, batch `i`'s pixel values `[B, C, S, S]` from `pixels(i)`
    /// (batch routing averages over each batch), every layer loaded once for all of them. Each batch's pixels
    /// are dropped once embedded, so only the hidden states stay. `progress` is told the (layer, batch) steps
    /// done out of `layers × batches`.
    pub fn encode(
        &self,
        be: &dyn Backend,
        batches: usize,
        pixels: &mut dyn FnMut(usize) -> Result<Tensor>,
        routing: Routing,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<EncoderOutput>> {
        let vision = &self.shell.vision;
        let (config, store) = (&self.dir.config, &self.dir.store);
        let mut hidden = Vec::with_capacity(batches);
        for i in 0..batches {
            let batch = pixels(i)?;
            self.shell.check_pixels(&batch)?;
            hidden.push(vision.embed(be, &batch)?);
        }
        let mut routing_weights: Vec<Vec<Tensor>> = (0..batches).map(|_| Vec::new()).collect();
        let mut done = 0;
        for l in 0..config.num_hidden_layers {
            let loading = Instant::now();
            let layer = ClipVision::load_layer(be, store, config, self.dir.wemoe.as_ref(), l)?;
            self.layer_load_seconds.set(self.layer_load_seconds.get() + loading.elapsed().as_secs_f64());
            for (x, weights) in hidden.iter_mut().zip(&mut routing_weights) {
                let (y, coefficients) = if l + 1 == config.num_hidden_layers {
                    layer.forward_class_token(be, x, routing)?
                } else {
                    layer.forward(be, x, routing)?
                };
                *x = y;
                weights.extend(coefficients);
                done += 1;
                progress(done);
            }
            drop(layer);
            // The biases and LayerNorms were views of the map; the prepared weights are gone with the layer.
            store.release_prefix(&format!("{}.", ClipVision::layer_prefix(l)));
        }
        hidden
            .iter()
            .zip(routing_weights)
            .map(|(x, routing_weights)| {
                let pooled = vision.pool(be, x)?;
                let image_embeds = self.shell.projection.as_ref().map(|p| be.linear(&pooled, p, None)).transpose()?;
                Ok(EncoderOutput { pooled, image_embeds, routing_weights })
            })
            .collect()
    }
}

/// An error naming the first tensor of layers 1.. that layer 0 has and that is missing or shaped otherwise.
/// The layers of a CLIP or WEMoE encoder all hold the same tensors, and layer 0's are checked against the
/// config when it loads, first in every pass; so a later layer's missing or misshapen tensor is found from
/// the metadata before the pass instead of when the pass reaches it. (A NaN in a later layer's values is
/// still found when that layer loads.)
fn check_layers_alike(store: &TensorStore, layers: usize) -> Result<()> {
    let first = format!("{}.", ClipVision::layer_prefix(0));
    let reference: Vec<(&str, &[usize])> = store
        .names()
        .filter_map(|name| Some((name.strip_prefix(&first)?, store.shape(name).expect("an indexed tensor"))))
        .collect();
    for l in 1..layers {
        let prefix = format!("{}.", ClipVision::layer_prefix(l));
        for (suffix, shape) in &reference {
            let name = format!("{prefix}{suffix}");
            match store.shape(&name) {
                None => bail!("{}: missing tensor '{name}' (layer 0 has '{first}{suffix}')", store.origin().display()),
                Some(found) if found != *shape => bail!(
                    "{}: tensor '{name}' has shape {found:?}, expected {shape:?} as in layer 0",
                    store.origin().display()
                ),
                Some(_) => {}
            }
        }
    }
    Ok(())
}
