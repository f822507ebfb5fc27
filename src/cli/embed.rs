//! `wemoe-engine embed`: pooled outputs and image embeddings of a dataset (with its labels and class names
//! when it has them), to safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::data::{Dataset, Preprocess};
use wemoe_engine::device::{self, DeviceChoice};
use wemoe_engine::eval::{embed_dataset, Batching};
use wemoe_engine::output::{check_file_target, check_not_an_input, write_safetensors_with_integers, NamedTensor};

use super::progress;
use super::weights::{LoadedEncoder, Weights};

pub struct Args {
    pub model: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    pub batching: Batching,
    pub weights: Weights,
}

/// The longest list of file names written into an output's header.
const MAX_FILES_METADATA: usize = 64 << 20;

pub fn run(args: &Args, device: DeviceChoice, quiet: bool) -> Result<()> {
    anyhow::ensure!(args.batching.size > 0, "--batch-size must be positive");
    check_file_target("--out", &args.out)?;
    let dir = ModelDir::open(&args.model)?;
    check_not_an_input("--out", &args.out, &[dir.files(), vec![args.images.clone()]].concat())?;
    let preprocess = Preprocess::for_model(&dir.path, dir.config.image_size)?;
    let data = Dataset::open(&args.images, &preprocess, dir.config.image_size)?;
    let be = device::open(device, quiet)?;
    let loading = std::time::Instant::now();
    let model = LoadedEncoder::load(be.as_ref(), &dir, args.weights, quiet)?;
    let mut loaded = loading.elapsed().as_secs_f64();
    let computing = std::time::Instant::now();
    let bar = progress::images("embed", data.len(), quiet);
    let result =
        embed_dataset(be.as_ref(), model.encoder(), &data, args.batching, &mut |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    // A streamed pass loads the layers as it goes: that time is loading, not the forward's.
    let computed = computing.elapsed().as_secs_f64() - model.layer_load_seconds();
    loaded += model.layer_load_seconds();
    let how = match model {
        LoadedEncoder::Resident(_) => "",
        LoadedEncoder::Streamed(_) => ", layer by layer",
    };
    let n = data.len();
    let mut tensors = vec![NamedTensor {
        name: "pooler_output".into(),
        shape: vec![n, dir.config.hidden_size],
        values: result.pooled,
    }];
    if let Some(embeds) = result.image_embeds {
        let p = embeds.len() / n;
        tensors.push(NamedTensor { name: "image_embeds".into(), shape: vec![n, p], values: embeds });
    }
    if !result.routing_weights.is_empty() {
        let layers = result.routing_weights.len();
        let experts = result.routing_weights[0].len() / n;
        tensors.push(NamedTensor {
            name: "routing_weights".into(),
            shape: vec![layers, n, experts],
            values: result.routing_weights.concat(),
        });
    }
    // The labels and class names, when the data has them, so that rows can be matched to classes; and a
    // folder's files, one per row (sorted), so that rows can be matched to images.
    let labels: Vec<(&str, &[i64])> = data.labels().map(|l| ("labels", l)).into_iter().collect();
    let mut metadata = BTreeMap::new();
    if let Some(classes) = data.classes() {
        metadata.insert("classes".to_string(), serde_json::to_string(classes)?);
    }
    if let Some(files) = data.files() {
        let list = serde_json::to_string(&files)?;
        // safetensors readers refuse headers over 100 MB.
        if list.len() <= MAX_FILES_METADATA {
            metadata.insert("files".to_string(), list);
        } else if !quiet {
            eprintln!("note: the files' names ({} MB) are left out of the output's metadata", list.len() >> 20);
        }
    }
    write_safetensors_with_integers(&args.out, &tensors, &labels, metadata)?;
    if !quiet {
        eprintln!(
            "wrote {} ({} in {computed:.2} s, {:.2} images/s; model loaded in {loaded:.2} s{how})",
            args.out.display(),
            super::images(n),
            n as f64 / computed
        );
    }
    Ok(())
}
