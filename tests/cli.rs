//! The command line on the fixtures: info, embed, eval, merge's notes, device selection, doctor (demo:
//! tests/demo.rs).

mod common;

use std::path::Path;

use common::*;
use wemoe_engine::checkpoint::SafetensorsFile;
use wemoe_engine::eval::argmax_rows;

#[test]
fn info_reports_what_transformers_counts() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected_info.json")).unwrap()).unwrap();
    for (model, kind, projection) in [
        ("clip_a", "CLIPModel", Some([24, 48])),
        ("clip_b", "CLIPVisionModel", Some([20, 36])),
        ("clip_c", "CLIPVisionModel", None),
    ] {
        let (ok, out, err) = engine(&["info", s(&fixture(model)), "--json"]);
        assert!(ok, "{err}");
        let info: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(info["kind"], kind);
        assert_eq!(info["vision_parameters"], expected[model]["vision_parameters"], "{model}");
        assert_eq!(info["vision_tensors"], expected[model]["vision_tensors"], "{model}");
        assert_eq!(info["projection"], serde_json::json!(projection), "{model}");
        // f32 bytes: every weight resident; streamed, all but one encoder layer (a layer's count from its shapes:
        // q, k, v, out projections with biases, two LayerNorms, fc1 and fc2 with biases).
        let (c, all) = (&info["config"], expected[model]["vision_parameters"].as_u64().unwrap());
        let [d, m, layers] = ["hidden_size", "intermediate_size", "num_hidden_layers"].map(|k| c[k].as_u64().unwrap());
        let layer = 4 * (d * d + d) + 2 * 2 * d + (d * m + m) + (m * d + d);
        let resident = 4 * (all + projection.map_or(0, |[p, d]| p * d));
        let want = serde_json::json!({"resident": resident, "streamed": resident - 4 * (layers - 1) * layer});
        assert_eq!(info["weights_bytes"], want, "{model}");
    }
    let (_, out, _) = engine(&["info", s(&fixture("clip_a")), "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &info["config"];
    assert_eq!(
        (c["hidden_size"].as_u64(), c["intermediate_size"].as_u64(), c["num_attention_heads"].as_u64()),
        (Some(48), Some(80), Some(4))
    );
    assert_eq!(
        (c["image_size"].as_u64(), c["patch_size"].as_u64(), info["tokens"].as_u64()),
        (Some(32), Some(8), Some(17))
    );
    assert_eq!(info["files"].as_array().unwrap().len(), 5);
    assert!((info["logit_scale"].as_f64().unwrap() - 100f64.ln()).abs() < 1e-5);
    let (ok, text, _) = engine(&["info", s(&fixture("clip_b"))]);
    assert!(ok && text.contains("30620") && text.contains("36 -> 20"), "{text}");
}

#[test]
fn info_describes_a_full_clips_text_tower_and_tokenizer() {
    let (ok, out, err) = engine(&["info", s(&fixture("heads_tool/clip")), "--json"]);
    assert!(ok, "{err}");
    let text = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["text"];
    // transformers: sum(p.numel() for p in m.text_model.parameters()) is 14080, m.text_projection's 768.
    assert_eq!(text["parameters"], 14080 + 768);
    assert_eq!((text["num_hidden_layers"].as_u64(), text["vocab_size"].as_u64()), (Some(1), Some(94)));
    assert_eq!(text["tokenizer"], "vocab.json + merges.txt");
    let (ok, out, _) = engine(&["info", s(&fixture("clip_a")), "--json"]);
    assert!(ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["text"]["tokenizer"].is_null(), "{out}");
    let (ok, out, _) = engine(&["info", s(&fixture("clip_b")), "--json"]);
    assert!(ok && serde_json::from_str::<serde_json::Value>(&out).unwrap()["text"].is_null(), "a vision model");
    let (ok, out, _) = engine(&["info", s(&fixture("heads_tool/clip_deep"))]);
    assert!(
        ok && out.contains("text        width 32, mlp 48, layers 3, heads 4, vocab 94, positions 40, Gelu"),
        "{out}"
    );
    assert!(out.contains("tokenizer   vocab.json + merges.txt (wemoe-engine heads can"), "{out}");
}

#[test]
fn info_describes_a_heads_file() {
    // tools/make_heads.py's file: a FusionBench task, the parquet's ClassLabel names, its CLIP's projection.
    let (ok, out, err) = engine(&["info", s(&fixture("heads_tool/heads.safetensors")), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["kind"], "heads");
    assert_eq!(info["tasks"]["pets"]["class_names"], serde_json::json!(["cat", "dog", "fish"]));
    assert_eq!(
        (info["tasks"]["mnist"]["classes"].as_u64(), info["tasks"]["mnist"]["width"].as_u64()),
        (Some(10), Some(24))
    );
    assert_eq!(info["projection"], serde_json::json!([24, 48]));
    let file = SafetensorsFile::open(&fixture("heads_tool/heads.safetensors")).unwrap();
    let scale = file.f32("logit_scale").unwrap().host().unwrap()[0];
    assert_eq!(info["logit_scale"].as_f64().map(|v| v as f32), Some(scale), "the same f32, as its shortest decimal");
    // Random heads with a logit scale, no projection, no names.
    let (ok, text, _) = engine(&["info", s(&fixture("heads_a.safetensors"))]);
    assert!(ok && text.contains("alpha  7 classes × 24: no class names"), "{text}");
    assert!(text.contains("projection  none (the model's is used)") && text.contains("logit_scale 3.0000"), "{text}");
}

/// `embed` of fixture `clip_{key}` on its pixels into `out`, on the CPU, quietly, with `env` set.
fn embed_fixture(env: &[(&str, &str)], key: &str, out: &std::path::Path) -> (bool, String, String) {
    let (model, images) = (fixture(&format!("clip_{key}")), fixture(&format!("pixels_{key}.safetensors")));
    let args = ["--model", s(&model), "--images", s(&images), "--out", s(out), "--batch-size", "2"];
    engine_with_env(env, &[&["embed"][..], &args, &["--device", "cpu", "--quiet"]].concat())
}

#[test]
fn embed_writes_the_reference_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    for (key, has_projection) in [("b", true), ("c", false)] {
        let out = tmp.path().join(format!("{key}.safetensors"));
        let (ok, _, err) = embed_fixture(&[], key, &out);
        assert!(ok, "{err}");
        assert!(err.is_empty(), "--quiet printed: {err}");
        let file = SafetensorsFile::open(&out).unwrap();
        let expected = format!("expected_{key}.safetensors");
        let got = file.f32("pooler_output").unwrap();
        assert_close("pooler_output", got.host().unwrap(), &reference(&expected, "pooler_output").1);
        assert_eq!(file.info("image_embeds").is_some(), has_projection);
        if has_projection {
            let got = file.f32("image_embeds").unwrap();
            assert_close("image_embeds", got.host().unwrap(), &reference(&expected, "image_embeds").1);
        }
    }
}

/// Where stderr is not a terminal (a log), the progress bar's line comes every `WEMOE_PROGRESS_SECONDS` (a
/// minute by default), never before: a short run's log holds its closing line alone.
#[test]
fn progress_reaches_a_log_as_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, images) = (fixture("clip_b"), fixture("pixels_b.safetensors"));
    let out = tmp.path().join("e.safetensors");
    let args = ["embed", "--model", s(&model), "--images", s(&images), "--out", s(&out), "--batch-size", "2"];
    let args = [&args[..], &["--device", "cpu"]].concat();
    let (ok, _, err) = engine_with_env(&[("WEMOE_PROGRESS_SECONDS", "0")], &args);
    assert!(ok, "{err}");
    let bar = |l: &&str| l.starts_with("embed [") && l.contains(" images, ");
    assert!(err.lines().any(|l| bar(&l) && l.contains("] 2/")), "{err}");
    assert!(err.lines().last().unwrap().starts_with("wrote "), "{err}");
    let (ok, _, err) = engine_with_env(&[("WEMOE_PROGRESS_SECONDS", "a minute")], &args);
    assert!(ok, "{err}");
    assert!(!err.lines().any(|l| bar(&l)), "{err}");
    let note =
        "note: WEMOE_PROGRESS_SECONDS='a minute' is not a whole number of seconds; progress lines come every 60 s";
    assert!(err.lines().any(|l| l == note), "{err}");
}

#[test]
fn embed_keeps_the_labels_and_class_names() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("photos.safetensors");
    let (model, photos) = (fixture("clip_a"), fixture("photos"));
    let (ok, _, err) = engine(&[
        "embed",
        "--model",
        s(&model),
        "--images",
        s(&photos),
        "--out",
        s(&out),
        "--device",
        "cpu",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let classes = header.metadata().as_ref().and_then(|m| m.get("classes")).cloned();
    assert_eq!(classes.as_deref(), Some(r#"["class_0","class_1"]"#));
    let file = SafetensorsFile::open(&out).unwrap();
    assert_eq!(file.integers("labels").unwrap(), [0, 0, 1, 1]);
    assert_eq!(file.info("pooler_output").unwrap().shape, [4, 48]);
    // Labelled pixel values: their labels, and no class names (no metadata at all).
    let (ok, _, err) = embed_fixture(&[], "c", &out);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&out).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let want = SafetensorsFile::open(&fixture("pixels_c.safetensors")).unwrap().integers("labels").unwrap();
    assert_eq!(SafetensorsFile::open(&out).unwrap().integers("labels").unwrap(), want);
    assert!(header.metadata().is_none());
}

#[test]
fn embed_of_a_folder_of_images_equals_its_image_folder_less_the_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat");
    let names = photos_flat(&flat);
    let model = fixture("clip_a");
    let embed = |images: &std::path::Path, out: &std::path::Path| {
        let args =
            ["embed", "--model", s(&model), "--images", s(images), "--out", s(out), "--device", "cpu", "--quiet"];
        let (ok, _, err) = engine(&args);
        assert!(ok, "{err}");
        SafetensorsFile::open(out).unwrap()
    };
    let tree = embed(&fixture("photos"), &tmp.path().join("tree.safetensors"));
    let loose = embed(&flat, &tmp.path().join("flat.safetensors"));
    let pooled = |f: &SafetensorsFile| f.f32("pooler_output").unwrap().host().unwrap().to_vec();
    assert_eq!(pooled(&tree), pooled(&loose), "the same images in the same order give the same rows");
    assert!(loose.info("labels").is_none() && loose.metadata("classes").is_none());
    // Each output names its files, one per row, relative to the folder.
    let files = |f: &SafetensorsFile| serde_json::from_str::<Vec<String>>(f.metadata("files").unwrap()).unwrap();
    assert_eq!(files(&loose), names);
    assert_eq!(files(&tree), PHOTOS);
    // One image given alone is a dataset of one: the folder's row for it (up to the rounding of a product one row
    // high), its name in the header.
    let last = names.len() - 1;
    let one = embed(&flat.join(&names[last]), &tmp.path().join("one.safetensors"));
    let width = pooled(&one).len();
    let err = rel_err(&pooled(&one), &pooled(&loose)[last * width..]);
    assert!(err < FORWARD_REL_TOL, "{err}");
    assert_eq!(files(&one), [names[last].clone()]);
    // An image in a format the engine does not read is refused as such, not as a broken safetensors file.
    let heic = tmp.path().join("photo.heic");
    std::fs::write(&heic, b"\0\0\0\x18ftypheic").unwrap();
    let (ok, _, err) =
        engine(&["embed", "--model", s(&model), "--images", s(&heic), "--out", s(&heic.with_extension("st"))]);
    assert!(!ok && err.contains("photo.heic: an image in a format the engine does not read"), "{err}");
}

/// `WEMOE_OP_TIMES=1` prints the backend's operations when the command exits, each counted as often as the
/// forward runs it: per batch one patch embedding, per layer one attention and two LayerNorms, plus the
/// pre- and post-LayerNorms; the "all" row sums the rows; and the last line totals the products (the rows
/// with a rate), its rate their FLOPs over their time.
#[test]
fn op_times_count_every_backend_operation() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, _, err) = embed_fixture(&[("WEMOE_OP_TIMES", "1")], "b", &tmp.path().join("b.safetensors"));
    assert!(ok && err.starts_with("backend operation"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let (products, table) = lines[1..].split_last().unwrap();
    // (name, calls, seconds, share in %, rate in GFLOP/s for a product)
    let rows: Vec<(String, u64, f64, f64, Option<f64>)> = table
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let share = f.get(4).map_or(100.0, |s| s.trim_end_matches('%').parse().unwrap());
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                share,
                f.get(5).map(|r| r.parse().unwrap()),
            )
        })
        .collect();
    let calls = |op: &str| rows.iter().find(|r| r.0 == op).map_or(0, |r| r.1);
    let (batches, layers) = (calls("patch_embed"), calls("attention") / calls("patch_embed").max(1));
    assert!(batches > 0 && layers > 0, "{err}");
    assert_eq!(calls("layer_norm"), batches * (2 * layers + 2), "{err}");
    let (all, parts) = rows.split_last().unwrap();
    assert_eq!(all.0, "all");
    assert_eq!(all.1, parts.iter().map(|r| r.1).sum::<u64>(), "{err}");
    assert!((all.2 - parts.iter().map(|r| r.2).sum::<f64>()).abs() < 1e-3 * parts.len() as f64, "{err}");
    let rated: Vec<&str> = parts.iter().filter(|r| r.4.is_some()).map(|r| r.0.as_str()).collect();
    for op in ["patch_embed", "linear", "attention"] {
        assert!(rated.contains(&op), "{op} has a rate: {err}");
    }
    assert!(!rated.contains(&"layer_norm") && !rated.contains(&"add"), "{err}");
    // "products: X GFLOP in Y s (Z% of the time), W GFLOP/s"
    let f: Vec<&str> = products.split_whitespace().collect();
    assert_eq!((f[0], f[2], f[3], f[11]), ("products:", "GFLOP", "in", "GFLOP/s"), "{err}");
    let (gflop, seconds, share, rate): (f64, f64, f64, f64) = (
        f[1].parse().unwrap(),
        f[4].parse().unwrap(),
        f[6].trim_start_matches('(').trim_end_matches('%').parse().unwrap(),
        f[10].parse().unwrap(),
    );
    let rated_seconds: f64 = parts.iter().filter(|r| r.4.is_some()).map(|r| r.2).sum();
    assert!((seconds - rated_seconds).abs() < 1e-3 * rated.len() as f64, "{err}");
    // Shares are printed to 0.1%, from unrounded times: the products' is their rows'.
    let rated_share: f64 = parts.iter().filter(|r| r.4.is_some()).map(|r| r.3).sum();
    assert!((share - rated_share).abs() <= 0.05 * (rated.len() + 1) as f64, "{err}");
    // The time is printed to the millisecond, the rate to three figures.
    assert!(gflop > 0.0 && (gflop / rate - seconds).abs() <= 5e-4 + 0.01 * seconds, "{err}");
}

/// Top-1 accuracy of reference logits against labels.
fn reference_accuracy(file: &str, name: &str, labels: &[i64]) -> f64 {
    let (shape, logits) = reference(file, name);
    let pred = argmax_rows(&logits, shape[1]);
    pred.iter().zip(labels).filter(|(p, &l)| **p == l as usize).count() as f64 / labels.len() as f64
}

#[test]
fn eval_reports_the_reference_accuracy_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("eval.json");
    let pixels = fixture("pixels_a.safetensors");
    let (ok, table, err) = engine(&[
        "eval",
        "--model",
        s(&fixture("clip_a")),
        "--heads",
        s(&fixture("heads_a.safetensors")),
        "--task",
        &format!("alpha={}", s(&pixels)),
        "--task",
        &format!("beta={}", s(&fixture("photos"))),
        "--json",
        s(&json),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let labels = SafetensorsFile::open(&pixels).unwrap().integers("labels").unwrap();
    let alpha = reference_accuracy("expected_a.safetensors", "logits.alpha", &labels);
    let beta = reference_accuracy("expected_a_images.safetensors", "logits_beta.folder", &[0, 0, 1, 1]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["tasks"]["alpha"]["accuracy"].as_f64().unwrap(), alpha);
    assert_eq!(report["tasks"]["alpha"]["count"], 3);
    assert_eq!(report["tasks"]["beta"]["accuracy"].as_f64().unwrap(), beta);
    assert_eq!(report["tasks"]["beta"]["count"], 4);
    assert!((report["average"].as_f64().unwrap() - (alpha + beta) / 2.0).abs() < 1e-12);
    assert!(table.contains("alpha") && table.contains("average"), "{table}");
    // The photographs' two class folders against beta's three classes: said, not refused.
    assert!(err.contains("photos names 2 classes, head 'beta' has 3"), "{err}");
}

#[test]
fn eval_json_dash_writes_the_json_alone_on_stdout() {
    // `--json -` is stdout, as for Unix tools: the JSON alone there (for a pipe into jq), the table on stderr,
    // and no file named '-' (as there used to be). A file's JSON is the same report, ending in a newline.
    let tmp = tempfile::tempdir().unwrap();
    let alpha = format!("alpha={}", s(&fixture("pixels_a.safetensors")));
    let (clip, heads) = (fixture("clip_a"), fixture("heads_a.safetensors"));
    let eval = |json: &str| {
        let args = ["eval", "--model", s(&clip), "--heads", s(&heads), "--task", &alpha, "--json", json];
        let out = engine_command().args(args).args(["--device", "cpu"]).current_dir(tmp.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (stdout, stderr) = eval("-");
    assert!(!tmp.path().join("-").exists());
    assert!(stderr.contains("alpha") && stderr.contains("average"), "the table: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (table, _) = eval("./eval.json");
    assert!(table.contains("average"), "{table}");
    let file = std::fs::read_to_string(tmp.path().join("eval.json")).unwrap();
    assert!(file.ends_with("}\n") && stdout == file, "{stdout} against {file}");
    assert_eq!(report["tasks"]["alpha"]["count"], 3);
}

/// A report that cannot reach stdout fails the command: under `> file` on a full disk (Linux's /dev/full) the
/// command used to exit 0 with its report lost. A closed pipe (`info | head -1`) still ends it quietly.
#[cfg(target_os = "linux")]
#[test]
fn a_report_lost_on_stdout_fails_the_command_but_a_closed_pipe_does_not() {
    let alpha = format!("alpha={}", s(&fixture("pixels_a.safetensors")));
    let (clip, heads) = (fixture("clip_a"), fixture("heads_a.safetensors"));
    let eval = ["eval", "--model", s(&clip), "--heads", s(&heads), "--task", &alpha, "--json", "-", "--quiet"];
    let info = ["info", s(&clip)];
    for args in [&eval[..], &info] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = engine_command().args(args).args(["--device", "cpu"]).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let want = "error: stdout: cannot write: No space left on device (os error 28)";
        assert!(!out.status.success() && err.lines().last() == Some(want), "{args:?}: {err}");
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = engine_command().args(args).args(["--device", "cpu"]).stdout(writer).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("error"), "{args:?}: {err}");
    }
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_any_work() {
    // Said at the start, in one line, not after an hour's embedding (it used to fail only when writing).
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-folder").join("out.safetensors");
    let folder = tmp.path();
    let (clip, pixels) = (fixture("clip_a"), fixture("pixels_a.safetensors"));
    let heads = fixture("heads_a.safetensors");
    let alpha = format!("alpha={}", s(&pixels));
    let strings = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let embed = |out: &Path| strings(&["embed", "--model", s(&clip), "--images", s(&pixels), "--out", s(out)]);
    let eval = |json: &Path| {
        strings(&["eval", "--model", s(&clip), "--heads", s(&heads), "--task", &alpha, "--json", s(json)])
    };
    let pets = format!("pets={}", s(&fixture("parquet/two_shards")));
    let zero_shot =
        |out: &Path| strings(&["heads", "--clip", s(&fixture("heads_tool/clip")), "--task", &pets, "--out", s(out)]);
    let folder_missing = format!("folder {} does not exist", s(missing.parent().unwrap()));
    let mut cases: Vec<(Vec<String>, String)> = vec![
        (embed(&missing), format!("--out {}: {folder_missing}", s(&missing))),
        (embed(folder), format!("--out {}: is a folder; give a file name", s(folder))),
        (eval(&missing), format!("--json {}: {folder_missing}", s(&missing))),
        (eval(folder), format!("--json {}: is a folder; give a file name", s(folder))),
        (zero_shot(&missing), format!("--out {}: {folder_missing}", s(&missing))),
    ];
    // A name ending in a slash is a folder's, even one that does not exist (it used to fail at the write).
    let slash = format!("{}/", s(&folder.join("new")));
    let names_a_folder = "names a folder (it ends with a slash); give a file name";
    cases.push((embed(Path::new(&slash)), format!("--out {slash}: {names_a_folder}")));
    cases.push((eval(Path::new(&slash)), format!("--json {slash}: {names_a_folder}")));
    // An output folder in a missing one: refused by every command, not made (adapt used to make the missing
    // folders, and left them behind when it failed).
    let run = missing.with_file_name("run");
    let no_parent = format!("{}: the parent directory of --out does not exist", s(&run));
    let (wemoe, adapt_heads) = (fixture("wemoe/fusionbench_d2"), fixture("adapt/heads.safetensors"));
    let left = format!("left={}", s(&fixture("adapt/left.safetensors")));
    let adapt =
        strings(&["adapt", "--model", s(&wemoe), "--heads", s(&adapt_heads), "--task", &left, "--out", s(&run)]);
    cases.push((adapt, no_parent.clone()));
    let expert = format!("alpha={}", s(&clip));
    cases.push((strings(&["merge", "--pretrained", s(&clip), "--expert", &expert, "--out", s(&run)]), no_parent));
    for (args, want) in cases {
        let (ok, out, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "{args:?} was accepted");
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert_eq!(last, format!("error: {want}"), "{args:?}: {err}");
        assert!(out.is_empty() && !err.contains("device:"), "{args:?} began its work: {out}{err}");
        assert!(!missing.parent().unwrap().exists(), "{args:?} made the missing folder");
    }
    // `-`, which --json takes for standard output, is no file name for a binary output (it used to write a file
    // named `-`): run in the scratch folder, where such a file would appear.
    for args in [embed(Path::new("-")), zero_shot(Path::new("-"))] {
        let run = engine_command().args(&args).current_dir(folder).output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        let want = "error: --out -: this output is a file, not standard output; give a file name (./- for a file";
        assert!(!run.status.success() && err.starts_with(want), "{args:?}: {err}");
        assert!(!folder.join("-").exists(), "{args:?} wrote a file named -");
    }
    // A folder that takes no new files (a read-only mount, no write permission; here /proc, whoever runs the test)
    // is found by making there the partial file the write will make. It used to be found after the work.
    let in_proc = [
        (embed(Path::new("/proc/out.safetensors")), "--out /proc/out.safetensors"),
        (eval(Path::new("/proc/out.json")), "--json /proc/out.json"),
        (zero_shot(Path::new("/proc/heads.safetensors")), "--out /proc/heads.safetensors"),
    ];
    for (args, flag) in in_proc {
        let (ok, out, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(!ok && last.starts_with(&format!("error: {flag}: cannot write in folder /proc: ")), "{args:?}: {err}");
        assert!(out.is_empty() && !err.contains("device:"), "{args:?} began its work: {out}{err}");
    }
    // A merge names the folder asked for, and the partial one it could not make (it used to name that alone).
    let (ok, _, err) = engine(&["merge", "--pretrained", s(&clip), "--expert", &expert, "--out", "/proc/merged"]);
    let want = "error: /proc/merged: cannot create (its partial folder /proc/.merged.tmp-";
    assert!(!ok && err.trim_end().lines().last().unwrap_or_default().starts_with(want), "{err}");
}

#[test]
fn an_output_that_would_replace_an_input_is_refused() {
    // `embed --images data.safetensors --out data.safetensors` used to replace the data with its embeddings, and
    // `eval --json model/config.json` the model's config. The inputs here are copies, so a failure loses nothing.
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let to = tmp.path().join(name);
        std::fs::copy(fixture(name), &to).unwrap();
        to
    };
    let (pixels, heads) = (copy("pixels_a.safetensors"), copy("heads_a.safetensors"));
    let clip = tmp.path().join("clip_a");
    std::fs::create_dir(&clip).unwrap();
    for file in std::fs::read_dir(fixture("clip_a")).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), clip.join(file.file_name())).unwrap();
    }
    let classes = tmp.path().join("classes.txt");
    std::fs::write(&classes, "cat\ndog\n").unwrap();
    let alpha = format!("alpha={}", s(&pixels));
    let pets = format!("pets={}", s(&classes));
    let strings = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let embed = |out: &Path| strings(&["embed", "--model", s(&clip), "--images", s(&pixels), "--out", s(out)]);
    let eval = |json: &Path| {
        strings(&["eval", "--model", s(&clip), "--heads", s(&heads), "--task", &alpha, "--json", s(json)])
    };
    let zero_shot =
        |out: &Path| strings(&["heads", "--clip", s(&fixture("heads_tool/clip")), "--task", &pets, "--out", s(out)]);
    // The same file by another name is refused too.
    let pixels_again = tmp.path().join(".").join("pixels_a.safetensors");
    let shard = clip.join("model-00003-of-00005.safetensors");
    let cases = [
        (embed(&pixels_again), "--out", pixels_again.clone(), pixels.clone()),
        (embed(&shard), "--out", shard.clone(), shard.clone()),
        (eval(&heads), "--json", heads.clone(), heads.clone()),
        (eval(&clip.join("config.json")), "--json", clip.join("config.json"), clip.join("config.json")),
        (eval(&pixels), "--json", pixels.clone(), pixels.clone()),
        (zero_shot(&classes), "--out", classes.clone(), classes.clone()),
    ];
    for (args, flag, given, input) in cases {
        let before = std::fs::read(&input).unwrap();
        let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "{args:?} was accepted");
        let want = format!(
            "error: {flag} {}: would replace {}, one of this command's inputs; give another file name",
            s(&given),
            s(&input)
        );
        assert_eq!(err.trim_end(), want, "{args:?}: {err}");
        assert_eq!(std::fs::read(&input).unwrap(), before, "{args:?} changed its input");
    }
    // A new file beside the inputs, even in the model's folder, is fine.
    let beside = clip.join("embeds.safetensors");
    let (ok, _, err) = engine(&embed(&beside).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && beside.exists(), "{err}");
}

#[cfg(unix)]
#[test]
fn merge_notes_an_expert_that_is_the_pretrained_model_or_repeats_another() {
    // A slip in a long command: the pretrained folder given as an expert, or one expert's folder twice (here once
    // through a link). Merged all the same, as FusionBench would, with a note each.
    let tmp = tempfile::tempdir().unwrap();
    let (pretrained, red) = (fixture("wemoe/pretrained"), fixture("wemoe/red"));
    let again = tmp.path().join("red-again");
    std::os::unix::fs::symlink(&red, &again).unwrap();
    let out = tmp.path().join("merged");
    let expert = |name: &str, path: &Path| format!("{name}={}", s(path));
    let experts = [
        expert("base", &pretrained),
        expert("red", &red),
        expert("again", &again),
        expert("green", &fixture("wemoe/green")),
    ];
    let mut args = vec!["merge", "--method", "task-arithmetic", "--pretrained", s(&pretrained), "--out", s(&out)];
    experts.iter().for_each(|e| args.extend(["--expert", e.as_str()]));
    let (ok, _, err) = engine(&args);
    assert!(ok, "{err}");
    let base = format!("note: expert 'base' is the pretrained model ({}): its task vector is zero", s(&pretrained));
    let repeat = format!("note: experts 'red' and 'again' are the same model ({}): their task vectors", s(&again));
    assert!(err.contains(&base) && err.contains(&repeat), "{err}");
    assert_eq!(err.matches("note:").count(), 2, "green is neither: {err}");
}

#[test]
fn auto_device_says_which_and_cuda_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("e.safetensors");
    let args = |device: &'static str| {
        vec![
            "embed".to_string(),
            "--model".into(),
            s(&fixture("clip_b")).into(),
            "--images".into(),
            s(&fixture("pixels_b.safetensors")).into(),
            "--out".into(),
            s(&out).into(),
            "--device".into(),
            device.into(),
        ]
    };
    let run = |a: Vec<String>| engine(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, err) = run(args("auto"));
    assert!(ok && err.lines().next().unwrap().starts_with("device: cpu"), "{err}");
    std::fs::remove_file(&out).unwrap();
    // A precision the CPU has no unit for: it computes in f32, and the line says so.
    let (ok, _, err) = run([args("auto"), vec!["--precision".into(), "tf32".into()]].concat());
    assert!(ok && err.lines().next().unwrap().contains("computing in f32: --precision tf32 needs a GPU"), "{err}");
    std::fs::remove_file(&out).unwrap();
    let (ok, _, err) = run(args("cuda"));
    // Here (no GPU) the one line says what is missing; on a GPU machine, what the CUDA backend lacks.
    assert!(
        !ok && err.contains("--device cuda:0: ") && err.contains("use --device cpu") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    let (ok, _, err) = run(args("tpu"));
    assert!(!ok && err.contains("unknown device 'tpu'"), "{err}");
    // TF32 is a GPU arithmetic: refused on the CPU; bf16 runs on the CPU where it has a unit for it (AMX, or
    // AVX-512 BF16 on AMD), else is refused.
    let mut tf32 = args("cpu");
    tf32.extend(["--precision".to_string(), "tf32".to_string()]);
    let (ok, _, err) = run(tf32);
    assert!(!ok && err.contains("--precision tf32 needs a GPU") && !out.exists(), "{err}");
    let mut bf16 = args("cpu");
    bf16.extend(["--precision".to_string(), "bf16".to_string()]);
    let (ok, _, err) = run(bf16);
    if wemoe_engine::ops::bf16::available() {
        assert!(ok && out.exists(), "{err}");
        std::fs::remove_file(&out).unwrap();
    } else {
        assert!(!ok && err.contains("--precision bf16 on the CPU needs AMX") && !out.exists(), "{err}");
    }
    let mut fp8 = args("cpu");
    fp8.extend(["--precision".to_string(), "fp8".to_string()]);
    let (ok, _, err) = run(fp8);
    assert!(!ok && err.contains("unknown precision 'fp8'"), "{err}");
}

#[test]
fn threads_sizes_the_pool_and_changes_no_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let embed = |threads: &str, routing: &str| {
        let out = tmp.path().join(format!("{threads}-{routing}.safetensors"));
        let (model, images) = (fixture("wemoe/fusionbench_d2"), fixture("adapt/left.safetensors"));
        let (ok, _, err) = engine(&[
            "embed",
            "--model",
            s(&model),
            "--images",
            s(&images),
            "--out",
            s(&out),
            "--routing",
            routing,
            "--device",
            "cpu",
            "--threads",
            threads,
        ]);
        (ok, err, std::fs::read(&out).ok())
    };
    for routing in ["sample", "batch"] {
        let (ok, err, one) = embed("1", routing);
        assert!(ok, "{err}");
        let (ok, err, three) = embed("3", routing);
        assert!(ok, "{err}");
        assert!(one.is_some() && one == three, "{routing}: the outputs differ between 1 and 3 threads");
    }
    for (threads, says) in [("1", "cpu (1 thread,"), ("3", "cpu (3 threads,")] {
        let (ok, out, err) = engine(&["doctor", "--threads", threads]);
        assert!(ok && out.contains(says), "{out}{err}");
    }
    for refused in ["0", "1025"] {
        let (ok, err, written) = embed(refused, "sample");
        assert!(
            !ok && err.contains(&format!("invalid value '{refused}' for '--threads")) && written.is_none(),
            "{err}"
        );
    }
}

#[test]
fn doctor_runs_on_a_fresh_clone() {
    let (ok, out, err) = engine(&["doctor"]);
    assert!(ok && out.contains("cpu") && out.contains("threads"), "{out}{err}");
    let bf16 = match wemoe_engine::ops::bf16::unit() {
        Some(unit) => format!("{unit}: --precision bf16 runs"),
        None => "no AMX or AMD AVX-512 BF16".to_string(),
    };
    assert!(out.contains(&bf16), "{out}");
    let jpeg = if wemoe_engine::data::jpeg_simd() { "with its SIMD" } else { "without SIMD" };
    assert!(out.lines().any(|l| l.starts_with("jpeg") && l.contains(jpeg)), "{out}");
    // With NVRTC (tools/nvrtc-env.sh provides it), one row per kernel function with ptxas' registers.
    let row =
        out.lines().find(|l| l.trim_start().starts_with("expert_linear_forward")).unwrap_or_else(|| panic!("{out}"));
    let registers: u32 = row.split_whitespace().nth(1).and_then(|r| r.parse().ok()).unwrap_or(0);
    assert!(registers > 0, "no ptxas registers in doctor's row (is NVRTC loadable? source tools/nvrtc-env.sh): {row}");
    let (ok, _, err) = engine(&["doctor", "--arch", "90"]);
    assert!(!ok && err.contains("sm_XY"), "{err}");
    // Turing (a T4): the kernels that need sm_80 are named, not failures; the others are reported.
    let (ok, out, err) = engine(&["doctor", "--arch", "sm_75"]);
    assert!(ok && out.contains("  expert_linear_forward "), "{out}{err}");
    let mma =
        "  expert_linear_mma.cu needs sm_80 or later (mma.sync on TF32 and bf16 operands), not sm_75: not compiled";
    assert!(out.lines().any(|l| l == mma) && !out.contains("failed"), "{out}");
    // An architecture NVRTC does not compile for: one line with its list, before the report (it used to be the
    // report, then an invalid-option log for every kernel).
    let (ok, out, err) = engine(&["doctor", "--arch", "sm_1000"]);
    assert!(!ok && out.is_empty() && err.lines().count() == 1, "{out}{err}");
    assert!(err.starts_with("error: --arch: architecture 'sm_1000': NVRTC ") && err.contains(" sm_90, "), "{err}");
}
