//! Running a model over datasets: embeddings, and accuracy through the classification heads.

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, ensure, Result};

use crate::data::Dataset;
use crate::device::Backend;
use crate::model::{Classifier, EncoderOutput, Heads, ImageEncoder};
use crate::tensor::Tensor;

/// Encodes `data` in consecutive batches of `batch_size` on `be`, handing each batch's image range and
/// output to `each`, then telling `progress` the images done so far.
fn for_each_batch(
    be: &dyn Backend,
    model: &ImageEncoder,
    data: &Dataset,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
    mut each: impl FnMut(Range<usize>, EncoderOutput) -> Result<()>,
) -> Result<()> {
    ensure!(batch_size > 0, "--batch-size must be positive");
    for start in (0..data.len()).step_by(batch_size) {
        let end = (start + batch_size).min(data.len());
        let pixels: Tensor = be.upload(data.batch(start..end)?)?;
        each(start..end, model.encode(be, &pixels)?)?;
        progress(end);
    }
    Ok(())
}

/// The embeddings of a whole dataset, row-major.
pub struct DatasetEmbeddings {
    /// `[N, D]`.
    pub pooled: Vec<f32>,
    /// `[N, P]`, when the model has a projection.
    pub image_embeds: Option<Vec<f32>>,
}

/// Embeds `data` in batches of `batch_size`, calling `progress` with the images done so far.
pub fn embed_dataset(
    be: &dyn Backend,
    model: &ImageEncoder,
    data: &Dataset,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<DatasetEmbeddings> {
    let mut pooled = Vec::new();
    let mut embeds = model.projection.as_ref().map(|_| Vec::new());
    for_each_batch(be, model, data, batch_size, progress, |_, out| {
        pooled.extend(be.to_host(&out.pooled)?);
        if let (Some(all), Some(e)) = (embeds.as_mut(), out.image_embeds.as_ref()) {
            all.extend(be.to_host(e)?);
        }
        Ok(())
    })?;
    Ok(DatasetEmbeddings { pooled, image_embeds: embeds })
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
    model: &'a ImageEncoder,
    heads: &'a Heads,
    classifier: Classifier<'a>,
}

impl<'a> Evaluator<'a> {
    /// Checks that `heads` fit `model` (`model_path` names it in errors) and prepares the classifier.
    pub fn new(be: &'a dyn Backend, model: &'a ImageEncoder, heads: &'a Heads, model_path: &Path) -> Result<Self> {
        Ok(Evaluator { be, model, heads, classifier: heads.classifier(model, model_path)? })
    }

    /// Top-1 accuracy on one task's labelled `data`, in batches of `batch_size`, calling `progress`
    /// with the images done so far.
    pub fn task(
        &self,
        task: &str,
        data: &Dataset,
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<TaskAccuracy> {
        let be = self.be;
        let head = self.heads.head(task)?;
        let classes = head.out_features();
        let Some(labels) = data.labels() else {
            bail!("{}: has no labels, which eval needs (task '{task}')", data.origin().display());
        };
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            bail!("{}: label {bad} is out of range for head '{task}' with {classes} classes", data.origin().display());
        }
        let mut correct = 0;
        for_each_batch(be, self.model, data, batch_size, progress, |range, out| {
            let logits = be.to_host(&self.classifier.logits(be, &out.pooled, head)?)?;
            let predictions = argmax_rows(&logits, classes);
            correct += predictions.iter().zip(&labels[range]).filter(|(p, &l)| **p == l as usize).count();
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
