//! Running a model over datasets: embeddings, and accuracy through the classification heads.

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};

use crate::data::Dataset;
use crate::device::Backend;
use crate::model::{Classifier, EncoderOutput, Heads, ImageEncoder, Routing, StreamedEncoder};
use crate::tensor::Tensor;

/// How a dataset is cut into forward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Images per forward pass; consecutive and unshuffled.
    pub size: usize,
    /// How WEMoE layers route (batch routing averages over each pass's images).
    pub routing: Routing,
}

/// How one task's labels index its head's rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadRows {
    /// A label is the row.
    Ids,
    /// Label `l` is row `rows[l]`: the heads file and the data both name their classes (an ImageFolder, a
    /// parquet `ClassLabel`), and every class of the data is one of the head's, matched by name. A subset of
    /// class folders, or a head in another order, is then scored right.
    ByName(Vec<usize>),
}

impl HeadRows {
    /// The rows of `task`'s head that `data`'s labels stand for.
    pub fn for_task(heads: &Heads, task: &str, data: &Dataset) -> Self {
        let (Some(head), Some(classes)) = (heads.class_names(task), data.classes()) else { return HeadRows::Ids };
        let rows: Option<Vec<usize>> = classes.iter().map(|c| head.iter().position(|h| h == c)).collect();
        rows.map_or(HeadRows::Ids, HeadRows::ByName)
    }

    /// True when every label is its own row.
    pub fn is_identity(&self) -> bool {
        match self {
            HeadRows::Ids => true,
            HeadRows::ByName(rows) => rows.iter().enumerate().all(|(i, &r)| i == r),
        }
    }

    /// Each label's row, checked against the head's `classes` rows (`data` and `task` name them in errors).
    pub fn targets(&self, labels: &[i64], classes: usize, data: &Dataset, task: &str) -> Result<Vec<usize>> {
        labels
            .iter()
            .map(|&l| match self {
                HeadRows::Ids if (l as usize) < classes => Ok(l as usize),
                HeadRows::Ids => Err(anyhow!(
                    "{}: label {l} is out of range for head '{task}' with {classes} classes",
                    data.origin().display()
                )),
                HeadRows::ByName(rows) => rows.get(l as usize).copied().ok_or_else(|| {
                    anyhow!("{}: label {l} is beyond the {} classes it names", data.origin().display(), rows.len())
                }),
            })
            .collect()
    }
}

/// The labels `data` is scored against for `task`, or why it has none.
pub fn labels_to_score<'d>(data: &'d Dataset, task: &str) -> Result<&'d [i64]> {
    data.labels().ok_or_else(|| {
        let why = data.why_unlabelled().unwrap_or_default();
        anyhow!("{}: has no labels, which eval needs (task '{task}'): {why}", data.origin().display())
    })
}

/// The encoder a pass over a dataset runs.
#[derive(Clone, Copy)]
pub enum Encoder<'a> {
    /// Every layer loaded before the pass.
    Resident(&'a ImageEncoder),
    /// Layers loaded one at a time, once per span of batches ([`StreamedEncoder`]).
    Streamed(&'a StreamedEncoder<'a>),
}

impl<'a> Encoder<'a> {
    /// The encoder's resident parts (all of it when resident): projection, `logit_scale`, config.
    pub fn resident_parts(self) -> &'a ImageEncoder {
        match self {
            Encoder::Resident(model) => model,
            Encoder::Streamed(streamed) => &streamed.shell,
        }
    }
}

/// Encodes `data` in consecutive batches on `be`, handing each batch's image range and output to
/// `each`, then telling `progress` the images done so far (for a streamed encoder, the images' share of
/// the span's layers done).
fn for_each_batch(
    be: &dyn Backend,
    model: Encoder<'_>,
    data: &Dataset,
    batching: Batching,
    progress: &mut dyn FnMut(usize),
    mut each: impl FnMut(Range<usize>, EncoderOutput) -> Result<()>,
) -> Result<()> {
    ensure!(batching.size > 0, "--batch-size must be positive");
    let batches: Vec<Range<usize>> =
        (0..data.len()).step_by(batching.size).map(|start| start..(start + batching.size).min(data.len())).collect();
    match model {
        Encoder::Resident(model) => std::thread::scope(|scope| -> Result<()> {
            // The next batch decodes on another thread while this one computes (a GPU no longer idles
            // while images decode); the batches are the same either way.
            let load = |range: Range<usize>| scope.spawn(move || data.batch(range));
            let mut ranges = batches.into_iter();
            let mut next = ranges.next().map(|range| (range.clone(), load(range)));
            while let Some((range, loading)) = next.take() {
                let host = loading.join().map_err(|_| anyhow!("the image loader panicked"))??;
                next = ranges.next().map(|range| (range.clone(), load(range)));
                let pixels: Tensor = be.upload(host)?;
                let end = range.end;
                each(range, model.encode(be, &pixels, batching.routing)?)?;
                progress(end);
            }
            Ok(())
        })?,
        Encoder::Streamed(streamed) => {
            let layers = streamed.shell.vision.config.num_hidden_layers;
            for span in batches.chunks(streamed.batches_per_span(batching.size)) {
                let (first, images) = (span[0].start, span.last().expect("a span is not empty").end - span[0].start);
                let steps = layers * span.len();
                let mut pixels = |i: usize| be.upload(data.batch(span[i].clone())?);
                let outputs = streamed.encode(be, span.len(), &mut pixels, batching.routing, &mut |done| {
                    progress(first + images * done / steps.max(1));
                })?;
                for (range, out) in span.iter().zip(outputs) {
                    each(range.clone(), out)?;
                }
                progress(first + images);
            }
        }
    }
    Ok(())
}

/// The embeddings of a whole dataset, row-major.
pub struct DatasetEmbeddings {
    /// `[N, D]`.
    pub pooled: Vec<f32>,
    /// `[N, P]`, when the model has a projection.
    pub image_embeds: Option<Vec<f32>>,
    /// For a WEMoE model, `[L, N, T]`: each layer's merge coefficients per image (in batch routing, each
    /// image gets its batch's average). Empty otherwise.
    pub routing_weights: Vec<Vec<f32>>,
}

/// Embeds `data`, calling `progress` with the images done so far. An image whose outputs are not finite (a
/// model that overflows f32 on it) is an error that names it.
pub fn embed_dataset(
    be: &dyn Backend,
    model: Encoder<'_>,
    data: &Dataset,
    batching: Batching,
    progress: &mut dyn FnMut(usize),
) -> Result<DatasetEmbeddings> {
    let mut pooled = Vec::new();
    let mut embeds = model.resident_parts().projection.as_ref().map(|_| Vec::new());
    let mut routing: Vec<Vec<f32>> = Vec::new();
    for_each_batch(be, model, data, batching, progress, |range, out| {
        let values = be.to_host(&out.pooled)?;
        ensure_finite(data, range.clone(), &values, "output holds")?;
        pooled.extend(values);
        if let (Some(all), Some(e)) = (embeds.as_mut(), out.image_embeds.as_ref()) {
            let values = be.to_host(e)?;
            ensure_finite(data, range.clone(), &values, "image embedding holds")?;
            all.extend(values);
        }
        routing.resize_with(out.routing_weights.len(), Vec::new);
        for (layer, coefficients) in routing.iter_mut().zip(&out.routing_weights) {
            let values = be.to_host(coefficients)?;
            if coefficients.shape()[0] == 1 {
                // One merge served the batch: every image gets those coefficients.
                (0..range.len()).for_each(|_| layer.extend_from_slice(&values));
            } else {
                layer.extend(values);
            }
        }
        Ok(())
    })?;
    Ok(DatasetEmbeddings { pooled, image_embeds: embeds, routing_weights: routing })
}

/// Refuses a batch's values (`values`: `[range.len(), width]`, for images `range` of `data`) that hold a
/// non-finite value (`what`: the values and their verb, "logits hold"). With finite weights and pixels only a
/// model whose weights overflow f32 on the images (a merge with an extreme `--scaling`) makes one, and its
/// embeddings, or an argmax over NaN logits, would be garbage that looks like a result.
fn ensure_finite(data: &Dataset, range: Range<usize>, values: &[f32], what: &str) -> Result<()> {
    let Some(at) = values.iter().position(|v| !v.is_finite()) else { return Ok(()) };
    let image = range.start + at / (values.len() / range.len()).max(1);
    let file = data.files().and_then(|files| files.get(image).map(|f| format!(" ({f})"))).unwrap_or_default();
    bail!(
        "{}: image {image}{file}: the model's {what} a non-finite value ({}); its weights overflow f32 on \
         this image (merged with too large a --scaling?)",
        data.origin().display(),
        values[at]
    )
}

/// The accuracy of one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskAccuracy {
    /// The task's name (its head's).
    pub task: String,
    /// Correct predictions.
    pub correct: usize,
    /// Images.
    pub count: usize,
}

impl TaskAccuracy {
    /// Correct over count, in [0, 1].
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count.max(1) as f64
    }
}

/// Index of the largest value in each row of `[rows, width]` (first one on ties, like torch.argmax).
pub fn argmax_rows(values: &[f32], width: usize) -> Vec<usize> {
    values
        .chunks_exact(width)
        .map(|row| row.iter().enumerate().fold(0, |best, (i, &v)| if v > row[best] { i } else { best }))
        .collect()
}

/// Top-1 accuracy of a model through a set of heads.
pub struct Evaluator<'a> {
    be: &'a dyn Backend,
    model: Encoder<'a>,
    heads: &'a Heads,
    classifier: Classifier<'a>,
}

impl<'a> Evaluator<'a> {
    /// Checks that `heads` fit `model` (`model_path` names it in errors) and prepares the classifier.
    pub fn new(be: &'a dyn Backend, model: Encoder<'a>, heads: &'a Heads, model_path: &Path) -> Result<Self> {
        Ok(Evaluator { be, model, heads, classifier: heads.classifier(model.resident_parts(), model_path)? })
    }

    /// Top-1 accuracy on one task's labelled `data`, calling `progress` with the images done so far. An image
    /// whose logits are not finite is an error that names it, not a prediction.
    pub fn task(
        &self,
        task: &str,
        data: &Dataset,
        batching: Batching,
        progress: &mut dyn FnMut(usize),
    ) -> Result<TaskAccuracy> {
        let be = self.be;
        let head = self.heads.head(task)?;
        let classes = head.out_features();
        let labels = labels_to_score(data, task)?;
        let targets = HeadRows::for_task(self.heads, task, data).targets(labels, classes, data, task)?;
        let mut correct = 0;
        for_each_batch(be, self.model, data, batching, progress, |range, out| {
            let logits = be.to_host(&self.classifier.logits(be, &out.pooled, head)?)?;
            ensure_finite(data, range.clone(), &logits, "logits hold")?;
            let predictions = argmax_rows(&logits, classes);
            correct += predictions.iter().zip(&targets[range]).filter(|(p, t)| p == t).count();
            Ok(())
        })?;
        Ok(TaskAccuracy { task: task.to_string(), correct, count: data.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax_rows(&[0.1, 0.9, 0.9, -1.0, -2.0, -3.0], 3), vec![1, 0]);
    }
}
