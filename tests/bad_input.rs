//! Bad input: each case ends with one line on stderr naming the input at fault, a non-zero exit, no
//! panic, and no output file left behind.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wemoe_engine::checkpoint::SafetensorsFile;
use wemoe_engine::data::{decode_image, Dataset, Preprocess};
use wemoe_engine::output::{write_safetensors, write_safetensors_with_metadata, NamedTensor};

/// Runs the engine expecting failure; checks the error contract and that `culprit` is named.
fn fails(args: &[&str], culprit: &str) -> String {
    let (ok, _, err) = engine(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("device: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(culprit), "the error should name '{culprit}': {err}");
    lines[0].to_string()
}

/// A scratch folder with an output path that must not appear.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Scratch { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn out(&self) -> PathBuf {
        self.path("out.safetensors")
    }

    /// No output and no temporary file left in the scratch folder's top level.
    fn assert_no_output(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("out"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A copy of fixture model `name`.
    fn model(&self, name: &str) -> PathBuf {
        let dst = self.path(name);
        std::fs::create_dir_all(&dst).unwrap();
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
        dst
    }

    /// A copy of clip_b whose tensors went through `edit`.
    fn edited_model(&self, edit: impl FnOnce(&mut Vec<NamedTensor>)) -> PathBuf {
        self.edited("clip_b", edit)
    }

    /// A copy of fixture model `name` whose tensors went through `edit`.
    fn edited(&self, name: &str, edit: impl FnOnce(&mut Vec<NamedTensor>)) -> PathBuf {
        let dir = self.model(name);
        let path = dir.join("model.safetensors");
        let file = SafetensorsFile::open(&path).unwrap();
        let mut tensors: Vec<NamedTensor> = file
            .names()
            .map(|n| {
                let t = file.f32(n).unwrap();
                NamedTensor { name: n.to_string(), shape: t.shape().to_vec(), values: t.host().unwrap().to_vec() }
            })
            .collect();
        drop(file);
        edit(&mut tensors);
        write_safetensors(&path, &tensors).unwrap();
        dir
    }

    fn embed(&self, model: &Path, images: &Path, culprit: &str) -> String {
        let err = fails(
            &["embed", "--model", s(model), "--images", s(images), "--out", s(&self.out()), "--device", "cpu"],
            culprit,
        );
        self.assert_no_output();
        err
    }
}

const FC1: &str = "vision_model.encoder.layers.1.mlp.fc1.weight";

#[test]
fn truncated_safetensors() {
    let t = Scratch::new();
    let dir = t.model("clip_b");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = t.embed(&dir, &fixture("pixels_b.safetensors"), "model.safetensors");
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn corrupt_safetensors_header() {
    let t = Scratch::new();
    let dir = t.model("clip_b");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..24].copy_from_slice(b"this is no JSON!");
    std::fs::write(&file, &bytes).unwrap();
    fails(&["info", s(&dir)], "model.safetensors");
    t.embed(&dir, &fixture("pixels_b.safetensors"), "invalid JSON");
}

#[test]
fn header_length_past_the_end_of_the_file() {
    let t = Scratch::new();
    let dir = t.model("clip_b");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let past_end = bytes.len() as u64 + 10;
    bytes[..8].copy_from_slice(&past_end.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let err = fails(&["info", s(&dir)], "model.safetensors");
    assert!(err.contains("header"), "{err}");
}

#[test]
fn missing_config_json() {
    let t = Scratch::new();
    let dir = t.model("clip_b");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    t.embed(&dir, &fixture("pixels_b.safetensors"), "missing config.json");
}

#[test]
fn a_pytorch_model_bin_that_is_no_torch_save_file() {
    // (tests/pytorch_checkpoints.rs reads real ones and refuses the pickles a state dict never holds.)
    let t = Scratch::new();
    let dir = t.model("clip_b");
    std::fs::rename(dir.join("model.safetensors"), dir.join("pytorch_model.bin")).unwrap();
    t.embed(
        &dir,
        &fixture("pixels_b.safetensors"),
        "pytorch_model.bin: no end of central directory: not a zip archive",
    );
    std::fs::rename(dir.join("pytorch_model.bin"), dir.join("pytorch_model.bin.index.json")).unwrap();
    t.embed(&dir, &fixture("pixels_b.safetensors"), "pytorch_model.bin.index.json: cannot read");
    std::fs::remove_file(dir.join("pytorch_model.bin.index.json")).unwrap();
    t.embed(&dir, &fixture("pixels_b.safetensors"), "no model.safetensors, pytorch_model.bin or their index.json");
}

#[test]
fn missing_tensor() {
    let t = Scratch::new();
    let dir = t.edited_model(|ts| ts.retain(|x| x.name != FC1));
    t.embed(&dir, &fixture("pixels_b.safetensors"), &format!("missing tensor '{FC1}'"));
}

#[test]
fn wrong_shape() {
    let t = Scratch::new();
    let dir = t.edited_model(|ts| {
        let x = ts.iter_mut().find(|x| x.name == FC1).unwrap();
        x.shape = vec![36, 100];
    });
    t.embed(&dir, &fixture("pixels_b.safetensors"), &format!("tensor '{FC1}' has shape [36, 100], expected [100, 36]"));
}

/// A later layer's missing or misshapen tensor is found from the metadata when a streamed pass starts
/// (`StreamedEncoder::load`), not when the pass reaches that layer; a resident load names the same tensor.
#[test]
fn a_streamed_pass_checks_every_layer_before_it_starts() {
    use wemoe_engine::checkpoint::ModelDir;
    use wemoe_engine::device::CpuBackend;
    use wemoe_engine::model::StreamedEncoder;
    type Edit = fn(&mut Vec<NamedTensor>);
    let cases: [(Edit, String); 2] = [
        (|ts| ts.retain(|x| x.name != FC1), format!("missing tensor '{FC1}'")),
        (
            |ts| ts.iter_mut().find(|x| x.name == FC1).unwrap().shape = vec![36, 100],
            format!("tensor '{FC1}' has shape [36, 100], expected [100, 36]"),
        ),
    ];
    for (edit, culprit) in cases {
        let t = Scratch::new();
        let dir = t.edited("clip_b", edit);
        let model = ModelDir::open(&dir).unwrap();
        let err = StreamedEncoder::load(&CpuBackend::new(), &model).err().expect("the load fails");
        assert!(format!("{err:#}").contains(&culprit), "{err:#}");
        let out = dir.join("out.safetensors");
        let images = fixture("pixels_b.safetensors");
        let args = ["embed", "--model", s(&dir), "--images", s(&images), "--out", s(&out), "--weights", "resident"];
        fails(&args, &culprit);
        assert!(!out.exists());
    }
}

#[test]
fn a_projection_that_is_not_a_matrix() {
    // embed refuses it by name; info describes it (it used to panic indexing the shape's second side).
    let t = Scratch::new();
    let dir = t.edited_model(|ts| {
        let x = ts.iter_mut().find(|x| x.name == "visual_projection.weight").unwrap();
        x.shape = vec![x.values.len()];
    });
    t.embed(
        &dir,
        &fixture("pixels_b.safetensors"),
        "tensor 'visual_projection.weight' has shape [720], expected [20, 36]",
    );
    let (ok, out, err) = engine(&["info", s(&dir)]);
    assert!(ok, "{err}");
    let line = "projection  visual_projection.weight has shape [720], not [20, 36] (projection_dim, hidden_size)";
    assert!(out.contains(line), "{out}");
}

#[test]
fn non_finite_weights() {
    let t = Scratch::new();
    let dir = t.edited_model(|ts| ts.iter_mut().find(|x| x.name == FC1).unwrap().values[17] = f32::NAN);
    t.embed(
        &dir,
        &fixture("pixels_b.safetensors"),
        &format!("tensor '{FC1}' holds a non-finite value (NaN at element 17)"),
    );
}

#[test]
fn a_model_that_overflows_on_the_images_is_refused_rather_than_scored() {
    // Finite weights so large that the forward overflows f32 (as after a merge with an extreme --scaling) gave NaN
    // outputs, which `embed` wrote and `eval` scored: an argmax over NaN logits picks the first class.
    let t = Scratch::new();
    let dir =
        t.edited_model(|ts| ts.iter_mut().find(|x| x.name == FC1).unwrap().values.iter_mut().for_each(|v| *v *= 1e38));
    let pixels = fixture("pixels_b.safetensors");
    t.embed(&dir, &pixels, "pixels_b.safetensors: image 0: the model's output holds a non-finite value (NaN)");
    let task = format!("gamma={}", s(&pixels));
    let heads = fixture("heads_b.safetensors");
    let eval = |model: &Path, heads: &Path, culprit: &str| {
        let json = t.path("out.json");
        fails(&["eval", "--model", s(model), "--heads", s(heads), "--task", &task, "--json", s(&json)], culprit);
        t.assert_no_output();
    };
    eval(&dir, &heads, "pixels_b.safetensors: image 0: the model's logits hold a non-finite value (NaN)");
    // A logit scale past ln(f32::MAX) made every logit infinite: refused by name.
    let (_, values) = reference("heads_b.safetensors", "head.gamma");
    let hot = t.path("hot.safetensors");
    write_safetensors(
        &hot,
        &[
            NamedTensor { name: "head.gamma".into(), shape: vec![5, 20], values },
            NamedTensor { name: "logit_scale".into(), shape: vec![], values: vec![89.0] },
        ],
    )
    .unwrap();
    eval(&fixture("clip_b"), &hot, "hot.safetensors: logit_scale 89: its exp overflows f32");
    // Adaptation and AdaMerging stop at their first loss, and say that the model as given overflows (AdaMerging's
    // first model is the merge at --scaling).
    let fc1 = "encoder.layers.0.mlp.base_model.fc1.weight";
    let model = t.edited("wemoe/fusionbench_d2", |ts| {
        ts.iter_mut().find(|x| x.name == fc1).unwrap().values.iter_mut().for_each(|v| *v *= 1e38)
    });
    let (adapted, merged) = (t.path("adapted"), t.path("merged"));
    let why = "the loss turned non-finite at step 1 (NaN): the model as given overflows f32 on these images";
    let [mut adapt, adamerging] = training_commands(&fixture("adapt/left.safetensors"), &adapted, &merged);
    adapt[2] = s(&model).into();
    fails(&with(&adapt, &["--steps", "2"]), why);
    fails(&with(&adamerging, &["--steps", "2", "--scaling", "1e38"]), why);
    assert!(!adapted.exists() && !merged.exists());
}

#[test]
fn a_wemoe_description_that_its_tensors_contradict_is_refused_by_every_command() {
    // A config.json edited by hand, or copied from another run, was believed by `info` ("1 expert") while the
    // forward failed on the first tensor that did not fit it.
    let t = Scratch::new();
    let with_wemoe = |name: &str, wemoe: serde_json::Value| {
        let dir = t.model(name);
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        config["wemoe"] = wemoe;
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    };
    let pixels = fixture("wemoe/pixels.safetensors");
    for (wemoe, message) in [
        (serde_json::json!({"experts": ["a", "b"]}), "\"wemoe\".experts names 2 (a, b), but the tensors hold 3 task"),
        (
            serde_json::json!({"experts": ["a", "b", "c"], "router_layers": 1}),
            "\"wemoe\".router_layers is 1, but the routers' tensors are of depth 2",
        ),
    ] {
        let dir = with_wemoe("wemoe/fusionbench_d2", wemoe);
        fails(&["info", s(&dir)], message);
        t.embed(&dir, &pixels, message);
    }
    let dir = with_wemoe("wemoe/fusionbench_d2", serde_json::json!({"experts": ["a", "b", "c"]}));
    let (ok, text, err) = engine(&["info", s(&dir)]);
    assert!(ok && text.contains("3 experts: a, b, c"), "{err}");
    // A plain CLIP model described as WEMoE.
    let plain = with_wemoe("clip_b", serde_json::json!({"experts": ["a"]}));
    fails(&["info", s(&plain)], "has a \"wemoe\" object, but the model's tensors hold no WEMoE layer");
}

#[test]
fn images_of_the_wrong_size() {
    let t = Scratch::new();
    let err = t.embed(&fixture("clip_b"), &fixture("pixels_a.safetensors"), "pixels_a.safetensors");
    assert!(err.contains("[3, 3, 32, 32]") && err.contains("[N, 3, 30, 30]"), "{err}");
}

/// An ImageFolder with one good photo and one bad file named `name`.
fn folder_with(t: &Scratch, name: &str, bytes: &[u8]) -> PathBuf {
    let root = t.path("data");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::copy(fixture("photos/class_0/china_301x217.jpg"), root.join("a/good.jpg")).unwrap();
    std::fs::write(root.join("a").join(name), bytes).unwrap();
    root
}

#[test]
fn an_image_that_fails_to_decode() {
    let t = Scratch::new();
    let root = folder_with(&t, "broken.png", b"\x89PNG\r\n\x1a\nnot really a png");
    t.embed(&fixture("clip_b"), &root, "broken.png: cannot decode image");
}

#[test]
fn a_corrupt_jpeg_and_an_empty_file() {
    let t = Scratch::new();
    let mut jpeg = std::fs::read(fixture("photos/class_0/china_301x217.jpg")).unwrap();
    jpeg.truncate(200);
    jpeg.extend_from_slice(&[0x12; 300]);
    let root = folder_with(&t, "corrupt.jpg", &jpeg);
    t.embed(&fixture("clip_b"), &root, "corrupt.jpg: cannot decode image");
    let t = Scratch::new();
    let root = folder_with(&t, "empty.jpg", b"");
    t.embed(&fixture("clip_b"), &root, "empty.jpg: cannot decode image");
}

#[test]
fn a_jpeg_cut_short_is_refused_as_pillow_refuses_it() {
    // libjpeg warns, fakes the end and fills the rest grey; Pillow (so FusionBench) refuses the file: "image file
    // is truncated", for these bytes (checked with Pillow 13) as for the file without its end-of-image marker.
    let jpeg = std::fs::read(fixture("photos/class_0/china_301x217.jpg")).unwrap();
    for (name, bytes) in [("cut.jpg", &jpeg[..jpeg.len() * 2 / 3]), ("no_end.jpg", &jpeg[..jpeg.len() - 2])] {
        let t = Scratch::new();
        let root = folder_with(&t, name, bytes);
        t.embed(&fixture("clip_b"), &root, &format!("{name}: cannot decode image: truncated"));
    }
    // Corrupt data that libjpeg only warns about decodes, as in Pillow.
    let mut flipped = jpeg.clone();
    flipped[jpeg.len() / 2] ^= 0x5a;
    let t = Scratch::new();
    let root = folder_with(&t, "flipped.jpg", &flipped);
    let out = t.out();
    let (ok, _, err) = engine(&["embed", "--model", s(&fixture("clip_b")), "--images", s(&root), "--out", s(&out)]);
    assert!(ok && out.exists(), "{err}");
}

#[test]
fn a_png_damaged_where_pillow_does_not_look_decodes_as_pillow_decodes_it() {
    // Pillow (so FusionBench) checks the CRC of each chunk before the image data, but not the image data's, and
    // needs no IEND once the image is complete: these bytes open there with the intact file's pixels (checked with
    // Pillow 13). They used to be refused here. A broken header, or image data cut short, Pillow refuses too.
    let png = std::fs::read(fixture("photos/class_0/flower_121x143.png")).unwrap();
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    let length = u32::from_be_bytes(png[idat - 4..idat].try_into().unwrap()) as usize;
    let idat_crc = idat + 4 + length;
    assert_eq!(&png[idat_crc + 8..idat_crc + 12], b"IEND");
    let mut bad_crc = png.clone();
    bad_crc[idat_crc..idat_crc + 4].fill(0);
    let intact = decode_image(&png).unwrap();
    for (what, bytes) in [
        ("a wrong image-data CRC", &bad_crc[..]),
        ("no IEND", &png[..idat_crc + 4]),
        ("neither the image data's CRC nor IEND", &png[..idat_crc]),
    ] {
        assert!(decode_image(bytes).as_ref() == Ok(&intact), "{what}: not the intact file's pixels");
    }
    let mut bad_header = png.clone();
    bad_header[8 + 8 + 13] ^= 1; // IHDR's CRC
    let refused = [
        (&bad_header[..], "broken PNG file: a header chunk fails its CRC"),
        (&png[..idat + length / 2], "unexpected end of file"),
    ];
    for (bytes, want) in refused {
        let err = decode_image(bytes).unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn an_image_format_the_engine_does_not_read_is_refused_not_skipped() {
    let t = Scratch::new();
    let root = folder_with(&t, "photo.heic", b"\0\0\0\x18ftypheic");
    t.embed(&fixture("clip_b"), &root, "1 image(s) in a format the engine does not read, first");
    // Files that are not images stay ignored.
    let t = Scratch::new();
    let root = folder_with(&t, "notes.txt", b"not an image");
    let out = t.out();
    let (ok, _, err) = engine(&["embed", "--model", s(&fixture("clip_b")), "--images", s(&root), "--out", s(&out)]);
    assert!(ok && out.exists(), "{err}");
}

#[test]
fn folders_of_loose_images_mixed_with_classes_unreadable_or_unlabelled_for_eval() {
    let t = Scratch::new();
    // Images both in the folder and in a class subfolder: refused, neither set dropped.
    let root = folder_with(&t, "other.jpg", &std::fs::read(fixture("photos/class_1/china_61x47.jpg")).unwrap());
    std::fs::copy(fixture("photos/class_0/flower_121x143.png"), root.join("loose.png")).unwrap();
    let err = t.embed(&fixture("clip_b"), &root, "holds images both in it");
    assert!(err.contains("loose.png") && err.contains("good.jpg"), "{err}");
    // A format the engine does not read among loose images: refused, as in class folders.
    let t = Scratch::new();
    let flat = t.path("flat");
    photos_flat(&flat);
    std::fs::write(flat.join("photo.heic"), b"\0\0\0\x18ftypheic").unwrap();
    t.embed(&fixture("clip_b"), &flat, "1 image(s) in a format the engine does not read, first");
    // No images anywhere.
    let t = Scratch::new();
    let empty = t.path("empty");
    std::fs::create_dir_all(empty.join("a")).unwrap();
    t.embed(&fixture("clip_b"), &empty, "no images in it nor in class subfolders");
    // Loose images have no labels, which eval needs.
    let t = Scratch::new();
    let flat = t.path("flat");
    photos_flat(&flat);
    let (model, heads, task) = (fixture("clip_a"), fixture("heads_a.safetensors"), format!("alpha={}", s(&flat)));
    let args = ["eval", "--model", s(&model), "--heads", s(&heads), "--task", &task];
    fails(&args, "flat: has no labels, which eval needs (task 'alpha'): images straight in the folder, no class");
}

#[test]
fn a_file_of_another_kind_as_images() {
    // (One image file is a dataset of one: tests/cli.rs.)
    let t = Scratch::new();
    let csv = t.path("labels.csv");
    std::fs::write(&csv, "file,label\nphoto.jpg,0\n").unwrap();
    let err = t.embed(&fixture("clip_b"), &csv, "labels.csv: not a dataset the engine reads");
    assert!(err.contains("ImageFolder directory") && err.contains("one image"), "{err}");
    // A damaged file named .safetensors keeps the safetensors reader's own error.
    let cut = t.path("cut.safetensors");
    std::fs::write(&cut, &std::fs::read(fixture("pixels_b.safetensors")).unwrap()[..100]).unwrap();
    let err = t.embed(&fixture("clip_b"), &cut, "cut.safetensors: not a valid safetensors file");
    assert!(!err.contains("not a dataset"), "{err}");
}

#[test]
fn a_parquet_file_without_images() {
    let t = Scratch::new();
    let err = t.embed(&fixture("clip_b"), &fixture("parquet/no_image.parquet"), "no image column");
    assert!(err.contains("its columns: label, text"), "{err}");
    // A truncated parquet file: named, no panic.
    let bytes = std::fs::read(fixture("parquet/by_name.parquet")).unwrap();
    let cut = t.path("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    t.embed(&fixture("clip_b"), &cut, "cut.parquet: not a parquet file");
    // A row whose image is a path, or null, in a later row group: found when the file opens.
    t.embed(
        &fixture("clip_b"),
        &fixture("parquet/path_only.parquet"),
        "path_only.parquet row 3: the image is stored as a path (images/0003.jpg), not as bytes",
    );
    t.embed(
        &fixture("clip_b"),
        &fixture("parquet/null_image.parquet"),
        "null_image.parquet row 3: the image is missing",
    );
    for bad in ["path_only.parquet", "null_image.parquet"] {
        let opened = Dataset::open(&fixture(&format!("parquet/{bad}")), &Preprocess::clip(32), 32);
        assert!(opened.is_err(), "{bad}: refused when it opens, not at its batch");
    }
    // A folder with two splits' shards: which one is meant is asked, not guessed.
    let data = t.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for (from, to) in [
        ("two_shards/test-00000-of-00002.parquet", "test-00000-of-00001.parquet"),
        ("by_name.parquet", "train-00000-of-00001.parquet"),
    ] {
        std::fs::copy(fixture(&format!("parquet/{from}")), data.join(to)).unwrap();
    }
    let err = t.embed(&fixture("clip_b"), &data, "holds the shards of several splits (test, train)");
    assert!(err.contains("data/test"), "{err}");
}

fn eval(t: &Scratch, model: &str, heads: &str, task: &str) -> Vec<String> {
    let json = t.path("out.json");
    vec![
        "eval".into(),
        "--model".into(),
        s(&fixture(model)).into(),
        "--heads".into(),
        s(&fixture(heads)).into(),
        "--task".into(),
        task.into(),
        "--json".into(),
        s(&json).into(),
        "--device".into(),
        "cpu".into(),
    ]
}

fn fails_owned(args: Vec<String>, culprit: &str) -> String {
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), culprit)
}

#[test]
fn eval_without_labels() {
    let t = Scratch::new();
    let unlabelled = t.path("unlabelled.safetensors");
    let (shape, values) = reference("pixels_a.safetensors", "pixel_values");
    write_safetensors(&unlabelled, &[NamedTensor { name: "pixel_values".into(), shape, values }]).unwrap();
    fails_owned(
        eval(&t, "clip_a", "heads_a.safetensors", &format!("alpha={}", s(&unlabelled))),
        "unlabelled.safetensors: has no labels, which eval needs (task 'alpha'): no labels tensor",
    );
    t.assert_no_output();
    // A parquet test split whose labels are withheld (-1 in every row, as `datasets` marks them) says so.
    fails_owned(
        eval(&t, "clip_a", "heads_a.safetensors", &format!("alpha={}", s(&fixture("parquet/withheld_labels.parquet")))),
        "withheld_labels.parquet: has no labels, which eval needs (task 'alpha'): every row's label is -1 or null",
    );
    t.assert_no_output();
}

#[test]
fn a_task_the_heads_do_not_have() {
    let t = Scratch::new();
    let task = format!("gamma={}", s(&fixture("pixels_a.safetensors")));
    let err =
        fails_owned(eval(&t, "clip_a", "heads_a.safetensors", &task), "heads_a.safetensors: no head for task 'gamma'");
    assert!(err.contains("alpha, beta"), "the known tasks are listed: {err}");
    t.assert_no_output();
}

#[test]
fn no_projection_in_the_model_nor_the_heads() {
    let t = Scratch::new();
    let task = format!("gamma={}", s(&fixture("pixels_c.safetensors")));
    fails_owned(
        eval(&t, "clip_c", "heads_b.safetensors", &task),
        "has no visual_projection.weight, and neither has the model",
    );
    t.assert_no_output();
}

#[test]
fn paths_that_do_not_exist() {
    let t = Scratch::new();
    t.embed(&fixture("clip_b"), Path::new("/no/such/images.safetensors"), "/no/such/images.safetensors: no such file");
    t.embed(Path::new("/no/such/model"), &fixture("pixels_b.safetensors"), "/no/such/model: no such model directory");
    let task = format!("alpha={}", s(&fixture("pixels_a.safetensors")));
    fails_owned(
        eval(&t, "clip_a", "no_such_heads.safetensors", &task),
        "no_such_heads.safetensors: no such heads file",
    );
    let out = "/no/such/dir/out.safetensors";
    fails(
        &[
            "embed",
            "--model",
            s(&fixture("clip_b")),
            "--images",
            s(&fixture("pixels_b.safetensors")),
            "--out",
            out,
            "--quiet",
        ],
        out,
    );
}

#[test]
fn bad_arguments() {
    let t = Scratch::new();
    let task = format!("alpha={}", s(&fixture("pixels_a.safetensors")));
    let mut args = eval(&t, "clip_a", "heads_a.safetensors", &task);
    args.extend(["--task".to_string(), task.clone()]);
    fails_owned(args, "--task 'alpha' is given twice");
    fails_owned(eval(&t, "clip_a", "heads_a.safetensors", "alpha"), "--task 'alpha': expected NAME=DATA");
    let mut args = eval(&t, "clip_a", "heads_a.safetensors", &task);
    args.extend(["--batch-size".to_string(), "0".to_string()]);
    fails_owned(args, "--batch-size must be positive");
    t.assert_no_output();
}

/// `merge` of wemoe/pretrained with `experts` (NAME=PATH), expecting failure naming `culprit` and no output.
fn merge_fails(t: &Scratch, experts: &[String], culprit: &str) -> String {
    let out = t.path("out_moe");
    let mut args = vec!["merge".to_string(), "--pretrained".into(), s(&fixture("wemoe/pretrained")).into()];
    for e in experts {
        args.extend(["--expert".to_string(), e.clone()]);
    }
    args.extend(["--out".to_string(), s(&out).into()]);
    let err = fails_owned(args, culprit);
    t.assert_no_output();
    assert!(!out.exists());
    err
}

fn expert(name: &str, path: &Path) -> String {
    format!("{name}={}", s(path))
}

#[test]
fn merge_refuses_an_expert_of_another_architecture() {
    let t = Scratch::new();
    let err =
        merge_fails(&t, &[expert("red", &fixture("wemoe/red")), expert("odd", &fixture("clip_b"))], "expert 'odd'");
    assert!(err.contains("tensor 'vision_model.embeddings.class_embedding' has shape [36]"), "{err}");
    // Tensors of the same shapes, but a config that computes otherwise: another activation, another LayerNorm
    // epsilon.
    for (field, from, to, message) in [
        ("hidden_act", "\"quick_gelu\"", "\"gelu\"", "hidden_act Gelu differs from the pretrained model's QuickGelu"),
        ("layer_norm_eps", "1e-05", "1e-06", "layer_norm_eps 1e-6 differs from the pretrained model's 1e-5"),
    ] {
        let dir = t.model("wemoe/green");
        let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let (old, new) = (format!("\"{field}\": {from}"), format!("\"{field}\": {to}"));
        assert!(config.contains(&old), "{config}");
        std::fs::write(dir.join("config.json"), config.replace(&old, &new)).unwrap();
        let err = merge_fails(&t, &[expert("red", &fixture("wemoe/red")), expert("odd", &dir)], message);
        assert!(err.contains("expert 'odd'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn merge_refuses_a_truncated_expert() {
    let t = Scratch::new();
    let dir = t.model("wemoe/green");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    merge_fails(&t, &[expert("green", &dir)], "model.safetensors: not a valid safetensors file");
}

#[test]
fn merge_refuses_a_duplicate_name_and_no_expert() {
    let t = Scratch::new();
    let red = fixture("wemoe/red");
    merge_fails(&t, &[expert("a", &red), expert("a", &fixture("wemoe/blue"))], "expert name 'a' is given twice");
    merge_fails(&t, &[], "no --expert given");
    merge_fails(&t, &["red".to_string()], "--expert 'red': expected NAME=MODEL");
}

#[test]
fn merge_refuses_an_expert_tensor_of_the_wrong_shape() {
    let t = Scratch::new();
    let dir = t.edited("wemoe/blue", |ts| {
        let x = ts.iter_mut().find(|x| x.name.ends_with("layers.1.mlp.fc2.weight")).unwrap();
        x.shape = vec![48, 32];
    });
    merge_fails(
        &t,
        &[expert("blue", &dir)],
        "tensor 'vision_model.encoder.layers.1.mlp.fc2.weight' has shape [48, 32]",
    );
}

#[test]
fn merge_refuses_non_finite_expert_weights_and_leaves_nothing() {
    // Found only while streaming, after the output has been started: the partial output must vanish.
    let t = Scratch::new();
    let dir = t.edited("wemoe/red", |ts| {
        ts.iter_mut().find(|x| x.name.ends_with("post_layernorm.bias")).unwrap().values[3] = f32::INFINITY
    });
    merge_fails(&t, &[expert("red", &dir)], "holds a non-finite value (inf at element 3)");
    let left: Vec<_> = std::fs::read_dir(t.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with(".out")), "temporary output left: {left:?}");
}

#[test]
fn merge_refuses_an_existing_output() {
    let t = Scratch::new();
    let out = t.path("taken");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let (pretrained, red) = (fixture("wemoe/pretrained"), expert("red", &fixture("wemoe/red")));
    let args = ["merge", "--pretrained", s(&pretrained), "--expert", &red, "--out", s(&out)];
    fails(&args, "already exists");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    // An empty folder, made ahead, is taken as new.
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    let (ok, _, err) = engine(&args);
    assert!(ok && out.join("model.safetensors").exists() && out.join("config.json").exists(), "{err}");
}

#[test]
fn heads_whose_metadata_miscounts_or_repeats_their_classes() {
    let t = Scratch::new();
    let heads = SafetensorsFile::open(&fixture("heads_a.safetensors")).unwrap();
    let tensors: Vec<NamedTensor> = ["head.alpha", "head.beta"]
        .iter()
        .map(|&name| {
            let v = heads.f32(name).unwrap();
            NamedTensor { name: name.into(), shape: v.shape().to_vec(), values: v.host().unwrap().to_vec() }
        })
        .collect();
    let task = format!("alpha={}", s(&fixture("pixels_a.safetensors")));
    for (classes, culprit) in [
        (r#"{"alpha": ["a", "b"]}"#, "names 2 classes for task 'alpha', whose head has 7 rows"),
        (r#"{"beta": ["a", "b", "a"]}"#, "names a class twice for task 'beta'"),
        (r#"["a", "b"]"#, "its metadata's `classes` is not a JSON object"),
    ] {
        let path = t.path("heads.safetensors");
        let metadata = [("classes".to_string(), classes.to_string())].into_iter().collect();
        write_safetensors_with_metadata(&path, &tensors, metadata).unwrap();
        let err = fails_owned(eval(&t, "clip_a", s(&path), &task), culprit);
        assert!(err.contains("heads.safetensors"), "the file is named: {err}");
        std::fs::remove_file(&path).unwrap();
        t.assert_no_output();
    }
}

#[test]
fn info_of_a_file_other_than_heads_says_what_info_takes() {
    // A model's config.json used to fail as "header too large", a dataset as "a model must be a directory".
    let takes = "info takes a model directory, a heads file (safetensors of head.* tensors) or a run's checkpoint";
    let config = fixture("clip_b").join("config.json");
    let err = fails(&["info", s(&config)], "config.json: not a safetensors file");
    assert!(err.ends_with(&format!("{takes}; for the model in its folder, give {}", s(&fixture("clip_b")))), "{err}");
    let err = fails(&["info", s(&fixture("pixels_b.safetensors"))], "pixels_b.safetensors: holds no head.* tensors");
    assert!(err.ends_with(takes), "{err}");
    // A damaged heads file says how it is damaged.
    let t = Scratch::new();
    let damaged = t.path("heads.safetensors");
    std::fs::write(&damaged, &std::fs::read(fixture("heads_a.safetensors")).unwrap()[..100]).unwrap();
    fails(&["info", s(&damaged)], "not a valid safetensors file");
    let (ok, out, err) = engine(&["info", s(&fixture("heads_a.safetensors"))]);
    assert!(ok && out.starts_with("heads"), "{out}{err}");
}

#[test]
fn a_models_own_file_given_for_its_folder_names_the_folder() {
    let t = Scratch::new();
    let file = fixture("clip_b").join("model.safetensors");
    let err = t.embed(&file, &fixture("pixels_b.safetensors"), "a model must be a directory holding config.json");
    assert!(err.ends_with(&format!("; for the model in its folder, give {}", s(&fixture("clip_b")))), "{err}");
    // A file outside any model's folder gets no such hint.
    let err = t.embed(&fixture("pixels_a.safetensors"), &fixture("pixels_b.safetensors"), "a model must be");
    assert!(!err.contains("give"), "{err}");
}

#[test]
fn task_inputs_are_refused_before_the_device_opens() {
    // On a GPU the device takes seconds to open: eval, adapt and AdaMerging check their inputs first, so that
    // without --quiet (and with the default --device auto) a refusal is the only line, not the device's and then it.
    let t = Scratch::new();
    let (heads, left) = (fixture("adapt/heads.safetensors"), fixture("adapt/left.safetensors"));
    let task = format!("left={}", s(&left));
    let missing = t.path("missing.safetensors");
    let refused = |args: Vec<String>, culprit: &str| {
        let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "{args:?} was accepted");
        assert!(err.starts_with("error: ") && err.contains(culprit), "'{culprit}' not in: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{culprit}: one line: {err}");
    };
    let eval = |heads: &Path, task: &str| -> Vec<String> {
        let model = s(&fixture("wemoe/fusionbench_d2")).to_string();
        ["eval", "--model", &model, "--heads", s(heads), "--task", task].map(String::from).to_vec()
    };
    refused(eval(&missing, &task), "missing.safetensors: no such heads file");
    refused(eval(&heads, &format!("up={}", s(&left))), "no head for task 'up'");
    refused(eval(&heads, &format!("left={}", s(&missing))), "missing.safetensors: no such file");
    let adapt = |extra: &[&str]| -> Vec<String> {
        let mut args = eval(&heads, &task);
        args[0] = "adapt".into();
        args.extend(["--out", s(&t.path("adapted"))].iter().chain(extra).map(|a| a.to_string()));
        args
    };
    refused(adapt(&["--steps", "0"]), "--steps must be positive");
    refused(adapt(&["--lr", "nan"]), "--lr must be a positive number");
    refused(adapt(&["--task", &format!("right={}", s(&missing))]), "missing.safetensors: no such file");
    let adamerging = |out: &Path, extra: &[&str]| -> Vec<String> {
        let (pretrained, red) = (fixture("wemoe/pretrained"), format!("red={}", s(&fixture("wemoe/red"))));
        let args = ["merge", "--method", "adamerging", "--pretrained", s(&pretrained), "--expert", &red, "--heads"];
        let mut args: Vec<String> = args.map(String::from).to_vec();
        args.extend([s(&heads), "--task", &task, "--out", s(out)].iter().chain(extra).map(|a| a.to_string()));
        args
    };
    refused(adamerging(&t.path("merged"), &["--batch-size", "0"]), "--batch-size must be positive");
    refused(adamerging(&t.path("merged"), &["--expert", &format!("blue={}", s(&missing))]), "missing.safetensors");
    refused(adamerging(&fixture("wemoe"), &[]), "already exists; choose a new --out directory");
    assert!(!t.path("adapted").exists() && !t.path("merged").exists());
}

#[cfg(unix)]
#[test]
fn a_link_to_nothing_is_named_not_left_out() {
    // As a Hugging Face cache holds a download that did not finish: a snapshot's link to a blob that is not there.
    // A parquet split used to lose that shard silently, and an ImageFolder that image.
    use std::os::unix::fs::symlink;
    let t = Scratch::new();
    let nowhere = t.path("blobs").join("missing");
    let split = t.path("split");
    std::fs::create_dir(&split).unwrap();
    let shards = fixture("parquet/two_shards");
    std::fs::copy(shards.join("test-00000-of-00002.parquet"), split.join("test-00000-of-00002.parquet")).unwrap();
    symlink(&nowhere, split.join("test-00001-of-00002.parquet")).unwrap();
    let folder = t.path("photos");
    for class in ["class_0", "class_1"] {
        std::fs::create_dir_all(folder.join(class)).unwrap();
        for f in std::fs::read_dir(fixture("photos").join(class)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, folder.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    symlink(&nowhere, folder.join("class_1").join("zz.jpg")).unwrap();
    let model = t.model("clip_a");
    let out = t.out();
    let embed = |model: &Path, images: &Path| {
        ["embed", "--model", s(model), "--images", s(images), "--out", s(&out)].map(str::to_string).to_vec()
    };
    let link = |at: &Path| format!("{}: a link to {}, which does not exist", s(at), s(&nowhere));
    let refused = |args: Vec<String>, culprit: String| {
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &culprit);
    };
    refused(embed(&fixture("clip_a"), &split), link(&split.join("test-00001-of-00002.parquet")));
    refused(embed(&fixture("clip_a"), &folder), link(&folder.join("class_1").join("zz.jpg")));
    // clip_a is sharded: one shard's link to nothing.
    let shard = model.join("model-00003-of-00005.safetensors");
    std::fs::remove_file(&shard).unwrap();
    symlink(&nowhere, &shard).unwrap();
    refused(embed(&model, &fixture("pixels_a.safetensors")), link(&shard));
    // The tokenizer `heads` reads: it used to say the folder had none.
    let clip = t.model("heads_tool/clip");
    std::fs::remove_file(clip.join("vocab.json")).unwrap();
    symlink(&nowhere, clip.join("vocab.json")).unwrap();
    let names = t.path("names.txt");
    std::fs::write(&names, "cat\ndog\n").unwrap();
    let heads = ["heads", "--clip", s(&clip), "--task", &format!("pets={}", s(&names)), "--out", s(&out)];
    refused(heads.map(str::to_string).to_vec(), link(&clip.join("vocab.json")));
    t.assert_no_output();
}

/// The arguments of `adapt` (the FusionBench-made WEMoE fixture) and of AdaMerging (its pretrained model and
/// expert `red`) on one task, `left=DATA`, each writing to its `--out`.
fn training_commands(data: &Path, adapted: &Path, merged: &Path) -> [Vec<String>; 2] {
    let heads = s(&fixture("adapt/heads.safetensors")).to_string();
    let task = format!("left={}", s(data));
    let model = s(&fixture("wemoe/fusionbench_d2")).to_string();
    let (pretrained, red) = (s(&fixture("wemoe/pretrained")).to_string(), format!("red={}", s(&fixture("wemoe/red"))));
    let adapt = ["adapt", "--model", &model, "--heads", &heads, "--task", &task, "--out", s(adapted)];
    let adamerging = ["merge", "--method", "adamerging", "--pretrained", &pretrained, "--expert", &red, "--heads"];
    let adamerging = [&adamerging[..], &[&heads, "--task", &task, "--out", s(merged)]].concat();
    [adapt.map(str::to_string).to_vec(), adamerging.iter().map(|a| a.to_string()).collect()]
}

/// `command` and `more` as the `&str`s [`engine`] and [`fails`] take.
fn with<'a>(command: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    command.iter().map(String::as_str).chain(more.iter().copied()).collect()
}

#[test]
fn a_rate_that_overflows_the_trained_values_is_named_and_leaves_no_folder() {
    // With --lr 1e39 Adam's first step makes the values infinite: once the next step's loss was NaN, and the
    // error called the checkpoint holding those values "the last good" one. adapt's --out, made by the run,
    // used to stay behind empty; one made ahead stays, as it was.
    let t = Scratch::new();
    let overflow = ["--lr", "1e39", "--steps", "3", "--checkpoint-every", "1"];
    let why = "the trained values turned non-finite in step 1's update (is --lr too large?); no checkpoint was written";
    let (adapted, ahead, merged) = (t.path("adapted"), t.path("ahead"), t.path("merged"));
    std::fs::create_dir(&ahead).unwrap();
    let data = fixture("adapt/left.safetensors");
    for out in [&adapted, &ahead] {
        fails(&with(&training_commands(&data, out, &merged)[0], &overflow), why);
    }
    fails(&with(&training_commands(&data, &adapted, &merged)[1], &overflow), why);
    assert!(!adapted.exists() && !merged.exists());
    assert!(std::fs::read_dir(&ahead).unwrap().next().is_none(), "the folder made ahead stays, empty");
}

#[test]
fn a_model_that_cannot_be_written_at_the_end_keeps_its_checkpoint_for_resume() {
    // A write that fails at the end of a run (a full disk) lost no training: the last checkpoint holds every
    // step. The error says so, and --resume, once the write can succeed, writes the model without another step.
    let t = Scratch::new();
    let data = fixture("adapt/left.safetensors");
    let (adapted, merged) = (t.path("adapted"), t.path("merged"));
    let commands = training_commands(&data, &adapted, &merged);
    for (command, out, what) in [(&commands[0], &adapted, "adapted"), (&commands[1], &merged, "merged")] {
        let (ok, _, err) = engine(&with(command, &["--steps", "1", "--batch-size", "4"]));
        assert!(ok, "{err}");
        // A folder where the weights go: their rename into place fails, as a full disk fails their write.
        let weights = out.join("model.safetensors");
        std::fs::remove_file(&weights).unwrap();
        std::fs::create_dir(&weights).unwrap();
        let resume = with(command, &["--steps", "2", "--batch-size", "4", "--resume"]);
        let why = "model was not written; its checkpoint holds every step, and --resume writes the model from it";
        fails(&resume, &format!("{}: the {what} {why}", s(out)));
        std::fs::remove_dir(&weights).unwrap();
        let (ok, _, err) = engine(&resume);
        assert!(ok && err.contains("2 steps") && err.contains("every step from its checkpoint"), "{err}");
        assert!(weights.is_file() && out.join("config.json").is_file());
    }
}

#[cfg(unix)]
#[test]
fn an_interrupt_before_the_first_checkpoint_leaves_no_output_folder() {
    // The --out that adapt or AdaMerging makes holds nothing worth keeping until its first checkpoint: Ctrl-C
    // before then removes it and says so (it used to stay behind, empty).
    let t = Scratch::new();
    let long = ["--steps", "10000000", "--checkpoint-every", "10000000", "--quiet"];
    let (adapted, merged) = (t.path("adapted"), t.path("merged"));
    let commands = training_commands(&fixture("adapt/left.safetensors"), &adapted, &merged);
    for (command, out) in commands.iter().zip([&adapted, &merged]) {
        let output = signal_when(&with(command, &long), || out.exists(), "INT", &format!("{}", out.display()));
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "{err}");
        assert!(err.contains(&format!("interrupted by SIGINT; removed the partial output {}", s(out))), "{err}");
        assert!(!out.exists(), "{} stayed", out.display());
    }
}

#[test]
fn a_resume_on_data_that_changed_its_image_count_is_refused() {
    // The checkpoint's streams index the data as it was: a file replaced at the same path by one with fewer
    // images would have drawn past its end several steps on (more: silently other images), for adapt and
    // AdaMerging alike.
    let t = Scratch::new();
    let data = t.path("left.safetensors");
    std::fs::copy(fixture("adapt/left.safetensors"), &data).unwrap();
    let commands = training_commands(&data, &t.path("adapted"), &t.path("merged"));
    let first = ["--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--quiet"];
    for command in &commands {
        let (ok, _, err) = engine(&with(command, &first));
        assert!(ok, "{err}");
    }
    let file = SafetensorsFile::open(&data).unwrap();
    let pixels = file.f32("pixel_values").unwrap();
    let mut shape = pixels.shape().to_vec();
    let all = pixels.host().unwrap().to_vec();
    let per_image = all.len() / shape[0];
    shape[0] -= 1;
    let values = all[..shape[0] * per_image].to_vec();
    drop(file);
    write_safetensors(&data, &[NamedTensor { name: "pixel_values".into(), shape, values }]).unwrap();
    let resume = ["--steps", "4", "--batch-size", "2", "--resume"];
    for command in &commands {
        fails(&with(command, &resume), "was made when task 'left' had 4 images; its data now has 3");
    }
}

/// `adapt` of the adapt fixtures' task `left` into `out`, 4 images a step, then `extra`.
fn adapt_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let (model, heads) = (fixture("wemoe/fusionbench_d2"), fixture("adapt/heads.safetensors"));
    let task = format!("left={}", s(&fixture("adapt/left.safetensors")));
    let args = ["adapt", "--model", s(&model), "--heads", s(&heads), "--task", &task, "--out", s(out)];
    args.iter().chain(&["--batch-size", "4"]).chain(extra).map(|a| a.to_string()).collect()
}

/// AdaMerging of the WEMoE fixtures' expert `red` on the same task into `out`, 4 images a step, then `extra`.
fn adamerging_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let (pretrained, red) = (fixture("wemoe/pretrained"), format!("red={}", s(&fixture("wemoe/red"))));
    let (heads, task) = (fixture("adapt/heads.safetensors"), format!("left={}", s(&fixture("adapt/left.safetensors"))));
    let args = ["merge", "--method", "adamerging", "--pretrained", s(&pretrained), "--expert", &red];
    let more = ["--heads", s(&heads), "--task", &task, "--out", s(out), "--batch-size", "4"];
    args.iter().chain(&more).chain(extra).map(|a| a.to_string()).collect()
}

#[test]
fn a_checkpoint_that_cannot_be_resumed_is_refused_before_the_device_opens() {
    // adapt's and AdaMerging's checkpoints are read for their arguments and step before the device opens: a run
    // without --resume, with other arguments, or with fewer steps than done is refused in one line.
    let t = Scratch::new();
    let (adapted, merged) = (t.path("adapted"), t.path("merged"));
    let adapt = |extra: &[&str]| adapt_args(&adapted, extra);
    let adamerging = |extra: &[&str]| adamerging_args(&merged, extra);
    let run = |args: Vec<String>| {
        let (ok, _, err) = engine(&args.iter().map(String::as_str).chain(["--quiet"]).collect::<Vec<_>>());
        assert!(ok, "{args:?}: {err}");
    };
    let refused = |args: Vec<String>, culprit: &str| {
        let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok, "{args:?} was accepted");
        assert!(err.starts_with("error: ") && err.contains(culprit), "'{culprit}' not in: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{culprit}: one line: {err}");
    };
    run(adapt(&["--steps", "2", "--checkpoint-every", "1"]));
    run(adamerging(&["--steps", "2", "--checkpoint-every", "1"]));
    for command in [&adapt as &dyn Fn(&[&str]) -> Vec<String>, &adamerging] {
        refused(command(&["--steps", "3"]), "holds a checkpoint; pass --resume");
        refused(command(&["--steps", "1", "--resume"]), "is at step 2, past --steps 1");
        refused(command(&["--steps", "3", "--seed", "7", "--resume"]), "(seed: 0 there, 7 now)");
    }
}

#[test]
fn a_folder_that_another_run_is_writing_is_refused() {
    // Another process's run holds its --out folder (`flock`, which this test takes as that run would): adapt and
    // AdaMerging given the same folder are refused in one line before the device opens, and write nothing there,
    // whether they would start afresh or resume; once it is released they run.
    let t = Scratch::new();
    let engine_ok = |args: Vec<String>| {
        let (ok, _, err) = engine(&args.iter().map(String::as_str).chain(["--quiet"]).collect::<Vec<_>>());
        assert!(ok, "{args:?}: {err}");
    };
    // One line, before the device opens (its line would come first), naming the folder.
    let refused_at_once = |args: Vec<String>| {
        let (ok, _, err) = engine(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!ok && err.starts_with("error: --out "), "{args:?}: {err}");
        assert!(err.contains("another run is writing there now"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line: {err}");
    };
    let listing = |dir: &Path| -> Vec<String> {
        let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
        let mut names: Vec<String> = names.collect();
        names.sort();
        names
    };
    type Args = fn(&Path, &[&str]) -> Vec<String>;
    for (out, args) in [(t.path("adapted"), adapt_args as Args), (t.path("merged"), adamerging_args)] {
        let out = &out;
        std::fs::create_dir(out).unwrap();
        let held = std::fs::File::open(out).unwrap();
        held.lock().unwrap();
        refused_at_once(args(out, &["--steps", "2"]));
        assert!(listing(out).is_empty(), "{}: written while held: {:?}", out.display(), listing(out));
        drop(held);
        engine_ok(args(out, &["--steps", "2", "--checkpoint-every", "1"]));
        let done = listing(out);
        let held = std::fs::File::open(out).unwrap();
        held.lock().unwrap();
        let resume = args(out, &["--steps", "3", "--resume"]);
        refused_at_once(resume.clone());
        assert_eq!(listing(out), done, "{}: changed while held", out.display());
        // `info` of the checkpoint says whether a run holds its folder now.
        let checkpoint = done.iter().find(|f| f.ends_with("-checkpoint.safetensors")).expect("a checkpoint");
        let running = || {
            let (ok, json, err) = engine(&["info", "--json", s(&out.join(checkpoint))]);
            assert!(ok, "{err}");
            serde_json::from_str::<serde_json::Value>(&json).unwrap()["running"].as_bool()
        };
        assert_eq!(running(), Some(true), "{}", out.display());
        drop(held);
        assert_eq!(running(), Some(false), "{}", out.display());
        engine_ok(resume);
    }
}

#[test]
fn the_library_runs_claim_their_folder_too() {
    // A program linking the library calls `adapt` and `adamerging` without the command line's early check: the
    // runs claim --out themselves, and refuse a folder another run holds without writing in it.
    use wemoe_engine::adapt::{adapt, AdaptOptions, Schedule};
    use wemoe_engine::checkpoint::ModelDir;
    use wemoe_engine::merge::{adamerging, AdaMergingOptions, Expert};
    use wemoe_engine::model::{Heads, Routing};
    let t = Scratch::new();
    let be = wemoe_engine::device::open(wemoe_engine::device::DeviceRequest::Cpu, true).unwrap();
    let heads = Heads::open(be.as_ref(), &fixture("adapt/heads.safetensors")).unwrap();
    let left = fixture("adapt/left.safetensors");
    let data = [Dataset::open(&left, &Preprocess::clip(24), 24).unwrap()];
    let out = t.path("held");
    std::fs::create_dir(&out).unwrap();
    let held = std::fs::File::open(&out).unwrap();
    held.lock().unwrap();
    let refused = |result: anyhow::Result<()>| {
        let err = result.unwrap_err().to_string();
        assert!(err.contains("another run is writing there now"), "{err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "written while held");
    };
    let model = ModelDir::open(&fixture("wemoe/fusionbench_d2")).unwrap();
    let tasks = [("left".to_string(), left)];
    let options = AdaptOptions {
        steps: 2,
        lr: 1e-3,
        batch_size: 4,
        routing: Routing::Sample,
        schedule: Schedule::Constant,
        seed: 0,
        checkpoint_every: 1,
    };
    refused(adapt(be.as_ref(), &model, &heads, &tasks, &data, &options, &out, false, &mut |_| {}));
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts = [Expert { name: "red".into(), model: ModelDir::open(&fixture("wemoe/red")).unwrap() }];
    let options = AdaMergingOptions { steps: 2, batch_size: 4, ..Default::default() };
    let names = ["left".to_string()];
    let run = adamerging(be.as_ref(), &pretrained, &experts, &heads, &names, &data, &options, &out, false, &mut |_| {});
    refused(run.map(|_| ()));
}

#[test]
fn a_merge_whose_out_is_filled_while_it_runs_says_so_and_leaves_it_alone() {
    // Two merges given one --out both find it absent at the start; the one that finishes second cannot put its
    // model there. Its error says why, and the other program's files stay as they were.
    use wemoe_engine::checkpoint::ModelDir;
    use wemoe_engine::merge::{merge, Expert, MergeMethod, MergeOptions};
    use wemoe_engine::model::RouterActivation;
    let t = Scratch::new();
    let out = t.path("merged");
    let pretrained = ModelDir::open(&fixture("wemoe/pretrained")).unwrap();
    let experts = [Expert { name: "red".into(), model: ModelDir::open(&fixture("wemoe/red")).unwrap() }];
    let options = MergeOptions {
        method: MergeMethod::TaskArithmetic,
        scaling: 0.3,
        router_layers: 2,
        router_activation: RouterActivation::Identity,
        seed: 0,
    };
    // The other program writes its model while this merge writes its first tensor.
    let fill = || {
        if !out.exists() {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("config.json"), "{}").unwrap();
        }
    };
    let Err(err) = merge(&pretrained, &experts, &options, &out, &mut |_, _| fill()) else { panic!("merged") };
    let err = err.to_string();
    assert!(err.contains("another program wrote there while this merge ran; nothing written"), "{err}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "the other program's folder changed");
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), "{}");
    let left: Vec<_> = std::fs::read_dir(t.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["merged"], "the partial folder stays");
}
