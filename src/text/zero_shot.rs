//! Zero-shot class embeddings as FusionBench computes its classification heads
//! (`HFCLIPClassifier.set_classification_task`): every template filled with the class name, each prompt's
//! projected text embedding L2-normalised, their mean normalised again; one row per class.

use anyhow::{ensure, Context, Result};

use super::{ClipText, ClipTokenizer};
use crate::device::Backend;

/// FusionBench's template where a task names none (`fusion_bench.models.hf_clip.default_templates`).
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}";

/// `template` with every `{}` replaced by `class`.
pub fn fill(template: &str, class: &str) -> String {
    template.replace("{}", class)
}

/// The class embeddings `[classes, P]` (unit rows) of `classes` under `templates` (each holding `{}`).
/// `done` is told how many prompts have been embedded.
pub fn class_embeddings(
    be: &dyn Backend,
    model: &ClipText,
    tokenizer: &ClipTokenizer,
    classes: &[String],
    templates: &[String],
    done: &mut dyn FnMut(usize),
) -> Result<Vec<f32>> {
    ensure!(!classes.is_empty(), "no class names");
    ensure!(!templates.is_empty(), "no templates");
    for t in templates {
        ensure!(t.contains("{}"), "template {t:?} has no {{}} for the class name");
    }
    let mut prompts = Vec::with_capacity(classes.len() * templates.len());
    for class in classes {
        for template in templates {
            let text = fill(template, class);
            let ids = tokenizer.encode(&text).with_context(|| format!("class {class:?}"))?;
            model.check_prompt(&ids).with_context(|| format!("class {class:?} in template {template:?}"))?;
            prompts.push(ids);
        }
    }
    let embeds = model.embed(be, &prompts, done)?;
    let p = model.config().projection_dim;
    let mut heads = Vec::with_capacity(classes.len() * p);
    for class in embeds.chunks_exact(templates.len() * p) {
        let mut mean = vec![0.0f64; p];
        for prompt in class.chunks_exact(p) {
            let norm = l2(prompt.iter().map(|&v| v as f64));
            mean.iter_mut().zip(prompt).for_each(|(m, &v)| *m += v as f64 / norm);
        }
        let n = templates.len() as f64;
        let norm = l2(mean.iter().map(|m| m / n));
        heads.extend(mean.iter().map(|m| (m / n / norm) as f32));
    }
    Ok(heads)
}

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}
