//! `wemoe-engine info`: what a model directory holds, from its config and headers alone.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde_json::json;
use wemoe_engine::checkpoint::ModelDir;

pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let dir = ModelDir::open(path)?;
    let c = &dir.config;
    let store = &dir.store;
    let vision_tensors = store.names().filter(|n| n.starts_with("vision_model.")).count();
    let vision_params = store.count_params("vision_model.");
    let projection = store.shape("visual_projection.weight").map(<[usize]>::to_vec);
    let logit_scale = dir.logit_scale()?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for name in store.names() {
        if let Some(d) = store.dtype(name) {
            *dtypes.entry(format!("{d:?}")).or_default() += 1;
        }
    }
    let files: Vec<String> =
        store.files().iter().map(|f| f.path().file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
    if as_json {
        let report = json!({
            "path": path.display().to_string(),
            "kind": dir.kind.hf_name(),
            "config": c.to_json(),
            "tokens": c.tokens(),
            "vision_tensors": vision_tensors,
            "vision_parameters": vision_params,
            "projection": projection,
            "logit_scale": logit_scale,
            "files": files,
            "dtypes": dtypes,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model       {}", path.display());
    println!("kind        {}", dir.kind.hf_name());
    println!(
        "vision      width {}, mlp {}, layers {}, heads {}, image {}, patch {}, tokens {}, {:?}, eps {:e}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.image_size,
        c.patch_size,
        c.tokens(),
        c.hidden_act,
        c.layer_norm_eps
    );
    println!("parameters  {vision_params} in {vision_tensors} vision tensors");
    match &projection {
        Some(s) => println!("projection  {} -> {} (visual_projection.weight)", s[1], s[0]),
        None => println!("projection  none"),
    }
    if let Some(s) = logit_scale {
        println!("logit_scale {s:.4} (exp {:.2})", s.exp());
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    println!("files       {} ({})", files.join(", "), dtypes.join(", "));
    Ok(())
}
