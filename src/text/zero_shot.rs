//! Zero-shot class embeddings as FusionBench computes its classification heads
//! (`HFCLIPClassifier.set_classification_task`): every template filled with the class name, each prompt's
//! projected text embedding L2-normalised, their mean normalised again; one row per class.

use anyhow::{ensure, Context, Result};

use super::{ClipText, ClipTokenizer};
use crate::device::Backend;

/// FusionBench's template where a task names none (`fusion_bench.models.hf_clip.default_templates`).
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}";

/// One task's classes and the templates their prompts fill (each holding `{}`, replaced by the name).
pub struct TaskPrompts<'a> {
    /// Named in errors.
    pub name: &'a str,
    /// The class names, in the head's row order.
    pub classes: &'a [String],
    /// The prompts' templates, each holding `{}`.
    pub templates: &'a [String],
}

/// Every task's class embeddings, `[classes, P]` with unit rows, and the prompts' token counts.
pub struct ClassEmbeddings {
    /// One per task, in the order given.
    pub heads: Vec<Vec<f32>>,
    /// Prompts in all.
    pub prompts: usize,
    /// Tokens in all, up to each prompt's pooled one.
    pub tokens: usize,
    /// Tokens the text tower ran: beginnings prompts share run once ([`ClipText::embed`]).
    pub computed: usize,
}

/// The class embeddings of every task's classes under its templates, all tasks' prompts through the text tower
/// together (prompts of several tasks may begin alike). `done` is told how many prompts have been embedded.
pub fn class_embeddings(
    be: &dyn Backend,
    model: &ClipText,
    tokenizer: &ClipTokenizer,
    tasks: &[TaskPrompts],
    done: &mut dyn FnMut(usize),
) -> Result<ClassEmbeddings> {
    let mut prompts = Vec::new();
    for task in tasks {
        let at = || format!("task {}", task.name);
        ensure!(!task.classes.is_empty(), "{}: no class names", at());
        ensure!(!task.templates.is_empty(), "{}: no templates", at());
        for t in task.templates {
            ensure!(t.contains("{}"), "{}: template {t:?} has no {{}} for the class name", at());
        }
        for class in task.classes {
            for template in task.templates {
                let ids = tokenizer
                    .encode(&template.replace("{}", class))
                    .with_context(|| format!("{}, class {class:?}", at()))?;
                model
                    .check_prompt(&ids)
                    .with_context(|| format!("{}, class {class:?} in template {template:?}", at()))?;
                prompts.push(ids);
            }
        }
    }
    let embedded = model.embed(be, &prompts, done)?;
    let p = model.config().projection_dim;
    let mut rows = embedded.values.chunks_exact(p);
    let heads = tasks
        .iter()
        .map(|task| {
            let mut head = Vec::with_capacity(task.classes.len() * p);
            for _ in task.classes {
                let class: Vec<&[f32]> = rows.by_ref().take(task.templates.len()).collect();
                head.extend(average_of_unit_rows(&class));
            }
            head
        })
        .collect();
    Ok(ClassEmbeddings { heads, prompts: prompts.len(), tokens: embedded.tokens, computed: embedded.computed })
}

/// Each row L2-normalised, their mean normalised again.
fn average_of_unit_rows(rows: &[&[f32]]) -> Vec<f32> {
    let mut mean = vec![0.0f64; rows[0].len()];
    for row in rows {
        let norm = l2(row.iter().map(|&v| v as f64));
        mean.iter_mut().zip(*row).for_each(|(m, &v)| *m += v as f64 / norm);
    }
    let n = rows.len() as f64;
    let norm = l2(mean.iter().map(|m| m / n));
    mean.iter().map(|m| (m / n / norm) as f32).collect()
}

fn l2(values: impl Iterator<Item = f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}
