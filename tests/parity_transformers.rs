//! The CPU engine against HF transformers on the fixtures of tools/make_fixtures.py: pooled outputs,
//! image embeddings, logits, and CLIP's preprocessing of real photographs.

mod common;

use common::*;
use wemoe_engine::checkpoint::{ModelDir, SafetensorsFile};
use wemoe_engine::data::{Dataset, Preprocess, Resize};
use wemoe_engine::device::CpuBackend;
use wemoe_engine::model::{Heads, ImageEncoder, Routing};
use wemoe_engine::tensor::Tensor;

/// Runs model `key` on its pixel fixture and compares every output with transformers'.
fn check_model(key: &str, expect_projection: bool) {
    let be = CpuBackend::new();
    let dir = ModelDir::open(&fixture(&format!("clip_{key}"))).unwrap();
    let model = ImageEncoder::load(&be, &dir).unwrap();
    assert_eq!(model.projection.is_some(), expect_projection);
    let (shape, pixels) = reference(&format!("pixels_{key}.safetensors"), "pixel_values");
    let out = model.encode(&be, &Tensor::from_vec(&shape, pixels).unwrap(), Routing::Sample).unwrap();
    let expected = format!("expected_{key}.safetensors");
    let (pshape, pooled) = reference(&expected, "pooler_output");
    assert_eq!(out.pooled.shape(), pshape.as_slice());
    assert_close(&format!("clip_{key} pooler_output"), out.pooled.host().unwrap(), &pooled);
    if let Some(e) = &out.image_embeds {
        assert_close(&format!("clip_{key} image_embeds"), e.host().unwrap(), &reference(&expected, "image_embeds").1);
    }
    let heads = Heads::open(&be, &fixture(&format!("heads_{key}.safetensors"))).unwrap();
    let classifier = heads.classifier(&model, &dir.path).unwrap();
    for task in heads.task_names() {
        let logits = classifier.logits(&be, &out.pooled, heads.head(task).unwrap()).unwrap();
        assert_close(
            &format!("clip_{key} logits {task}"),
            logits.host().unwrap(),
            &reference(&expected, &format!("logits.{task}")).1,
        );
    }
}

#[test]
fn sharded_prefixed_clip_model_matches_transformers() {
    check_model("a", true);
}

#[test]
fn vision_model_with_projection_and_gelu_matches_transformers() {
    check_model("b", true);
}

#[test]
fn unprefixed_bf16_vision_model_with_projection_from_the_heads_matches_transformers() {
    check_model("c", false);
}

#[test]
fn f32_weights_are_read_in_place_from_the_memory_map() {
    let dir = ModelDir::open(&fixture("clip_b")).unwrap();
    let t = dir.store.get("vision_model.encoder.layers.0.mlp.fc1.weight", &[100, 36]).unwrap();
    assert!(t.is_mapped(), "an aligned f32 tensor should not be copied");
}

/// Largest and mean absolute difference.
fn abs_diffs(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let d: Vec<f64> = got.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).collect();
    (d.iter().cloned().fold(0.0, f64::max), d.iter().sum::<f64>() / d.len() as f64)
}

/// The ImageFolder `dir` preprocessed to `side × side` against the processor's pixels in `expected`, one
/// tensor per file, `names` being the files in the folder's (sorted) order.
fn check_folder_pixels(dir: &str, side: usize, expected: &str, names: &[&str]) {
    let data = Dataset::open(&fixture(dir), &Preprocess::clip(side), side).unwrap();
    assert_eq!(data.len(), names.len());
    let got = data.batch(0..data.len()).unwrap();
    let per = 3 * side * side;
    let mut largest = 0f64;
    for (i, name) in names.iter().enumerate() {
        let (_, want) = reference(expected, name);
        let (max, mean) = abs_diffs(&got.host().unwrap()[i * per..(i + 1) * per], &want);
        assert!(max <= PIXEL_MAX_ABS_TOL && mean <= PIXEL_MEAN_ABS_TOL, "{name}: max {max:.4} mean {mean:.5}");
        largest = largest.max(max);
    }
    eprintln!("{dir}: largest difference from the processor's pixels {largest:.2e}");
}

#[test]
fn photographs_preprocess_like_clip_image_processor() {
    // JPEG and PNG, colour and grey, downsampled and upsampled, odd sizes; an ImageFolder tree.
    let data = Dataset::open(&fixture("photos"), &Preprocess::clip(48), 48).unwrap();
    assert_eq!(data.labels().unwrap(), &[0, 0, 1, 1]);
    let names = [
        "class_0/china_301x217.jpg",
        "class_0/flower_121x143.png",
        "class_1/china_61x47.jpg",
        "class_1/flower_grey_97x65.png",
    ];
    check_folder_pixels("photos", 48, "photos_expected_48.safetensors", &names);
}

#[test]
fn other_shapes_of_preprocessor_config_preprocess_like_clip_image_processor() {
    // `size` as {"height", "width"} (a resize to exactly that, with or without a crop after it), and `size` and
    // `crop_size` as bare integers: each folder's preprocessor_config.json as the processor wrote it.
    let names = [
        "class_0/china_301x217.jpg",
        "class_0/flower_121x143.png",
        "class_1/china_61x47.jpg",
        "class_1/flower_grey_97x65.png",
    ];
    for (config, resize, crop) in [
        ("exact_square", Resize::Exact(32, 32), None),
        ("exact_then_crop", Resize::Exact(40, 36), Some((32, 32))),
        ("integer_sizes", Resize::ShortestEdge(40), Some((32, 32))),
    ] {
        let dir = fixture("processor_configs").join(config);
        let preprocess = Preprocess::for_model(&dir, 32).unwrap();
        assert_eq!((preprocess.resize, preprocess.crop), (resize, crop), "{config}");
        let data = Dataset::open(&fixture("photos"), &preprocess, 32).unwrap();
        let got = data.batch(0..data.len()).unwrap();
        let per = 3 * 32 * 32;
        let expected = format!("processor_configs/{config}/expected.safetensors");
        for (i, name) in names.iter().enumerate() {
            let (_, want) = reference(&expected, name);
            let (max, mean) = abs_diffs(&got.host().unwrap()[i * per..(i + 1) * per], &want);
            assert!(
                max <= PIXEL_MAX_ABS_TOL && mean <= PIXEL_MEAN_ABS_TOL,
                "{config} {name}: max {max:.4} mean {mean:.5}"
            );
        }
    }
    // A size the model does not take is refused, naming what the preprocessing makes.
    let preprocess = Preprocess::for_model(&fixture("processor_configs/exact_square"), 32).unwrap();
    let err = Dataset::open(&fixture("photos"), &preprocess, 48).err().unwrap();
    assert!(
        format!("{err:#}").ends_with("the model's preprocessing makes 32×32 images, the model takes 48×48"),
        "{err:#}"
    );
}

#[test]
fn transparent_16_bit_and_cmyk_images_preprocess_like_clip_image_processor() {
    // Each file unconverted, as FusionBench gives a dataset's image to the processor: an alpha channel, a
    // palette's and a colour key's transparency composited onto white, 16-bit samples read by their high byte,
    // a CMYK JPEG's inks made RGB as Pillow does.
    let names = [
        "cmyk_63x51.jpg",
        "grey16_55x46.png",
        "grey_alpha_47x70.png",
        "grey_key_44x41.png",
        "palette_alpha_57x49.png",
        "rgb16_59x45.png",
        "rgb_key_52x60.png",
        "rgba16_43x50.png",
        "rgba_61x53.png",
    ];
    check_folder_pixels("image_modes/folder", 32, "image_modes/folder_expected_32.safetensors", &names);
}

#[test]
fn webp_bmp_gif_tiff_and_pnm_files_preprocess_like_clip_image_processor() {
    // Lossy and lossless WebP with and without alpha, BMP, a GIF with a transparent index, TIFF, PNM.
    let names = [
        "bits_47x45.pbm",
        "grey_39x60.pgm",
        "lossless_alpha_45x62.webp",
        "lossy_67x58.webp",
        "lossy_alpha_51x39.webp",
        "palette_49x57.bmp",
        "palette_key_58x47.gif",
        "rgb_62x41.ppm",
        "rgb_67x58.bmp",
        "rgb_lzw_53x44.tif",
        "rgba_41x55.tif",
    ];
    check_folder_pixels("image_modes/formats", 32, "image_modes/formats_expected_32.safetensors", &names);
}

#[test]
fn a_parquet_dataset_with_two_class_labels_takes_the_first_column() {
    // CIFAR-100's layout: fine_label, then coarse_label, neither named label. The features' map is sorted by
    // name, so coarse_label (2 classes) used to be taken, silently; the column order gives fine_label.
    let data = Dataset::open(&fixture("parquet/two_labels.parquet"), &Preprocess::clip(32), 32).unwrap();
    assert_eq!(data.labels(), Some(&[3, 0, 2][..]));
    assert_eq!(data.classes().map(|c| c.to_vec()), Some(["cat", "dog", "fish", "bird"].map(String::from).to_vec()));
    // The rows are the fixture's images 2, 3 and 5, which two_shards holds too.
    let shards = Dataset::open(&fixture("parquet/two_shards"), &Preprocess::clip(32), 32).unwrap();
    let (got, want) = (data.batch(0..3).unwrap(), shards.gather(&[2, 3, 5]).unwrap());
    assert_eq!(got.host().unwrap(), want.host().unwrap());
}

#[test]
fn parquet_datasets_read_and_preprocess_like_clip_image_processor() {
    // `datasets`' own parquet (two shards; the Image and ClassLabel features in its metadata) and pyarrow's
    // (snappy, the columns found by name); rows of JPEG, PNG, WebP and CMYK JPEG images.
    let expected = SafetensorsFile::open(&fixture("parquet/expected_32.safetensors")).unwrap();
    let labels = expected.integers("labels").unwrap();
    let classes = Some(["cat", "dog", "fish"]);
    // A folder of shards, a split's prefix in it (`test` for test-0000x-of-00002.parquet), one file.
    for (path, classes) in
        [("parquet/two_shards", classes), ("parquet/two_shards/test", classes), ("parquet/by_name.parquet", None)]
    {
        let data = Dataset::open(&fixture(path), &Preprocess::clip(32), 32).unwrap();
        assert_eq!(data.labels(), Some(&labels[..]), "{path}");
        assert_eq!(data.classes().map(|c| c.to_vec()), classes.map(|c| c.map(String::from).to_vec()), "{path}");
        let got = data.batch(0..data.len()).unwrap();
        let per = 3 * 32 * 32;
        let mut largest = 0f64;
        for i in 0..data.len() {
            let (_, want) = reference("parquet/expected_32.safetensors", &format!("row.{i}"));
            let (max, mean) = abs_diffs(&got.host().unwrap()[i * per..(i + 1) * per], &want);
            assert!(max <= PIXEL_MAX_ABS_TOL && mean <= PIXEL_MEAN_ABS_TOL, "{path} row {i}: max {max:.4}");
            largest = largest.max(max);
        }
        eprintln!("{path}: largest difference from the processor's pixels {largest:.2e}");
        // Read on demand in any order, or held in memory (as adapt holds it): the same pixels.
        let order = [6, 2, 3, 0, 5, 5, 1];
        let on_demand = data.gather(&order).unwrap();
        let mut held = Dataset::open(&fixture(path), &Preprocess::clip(32), 32).unwrap();
        held.hold_in_memory().unwrap();
        assert_eq!(held.gather(&order).unwrap().host().unwrap(), on_demand.host().unwrap(), "{path}");
        for (k, &i) in order.iter().enumerate() {
            assert_eq!(
                &on_demand.host().unwrap()[k * per..(k + 1) * per],
                &got.host().unwrap()[i * per..(i + 1) * per]
            );
        }
    }
}

#[test]
fn every_value_and_alpha_composites_onto_white_as_transformers_does() {
    // 256 × 256 RGBA: value across, alpha down; no resize, no normalisation, so the pixels are the composite.
    let unscaled = Preprocess {
        resize: Resize::None,
        crop: Some((256, 256)),
        rescale: 1.0,
        mean_std: None,
        ..Preprocess::clip(256)
    };
    let data = Dataset::open(&fixture("image_modes/composite"), &unscaled, 256).unwrap();
    let got = data.batch(0..1).unwrap();
    let want = image::open(fixture("image_modes/composite_expected.png")).unwrap().to_rgb8();
    let got = got.host().unwrap();
    let plane = 256 * 256;
    for (i, p) in want.pixels().enumerate() {
        for c in 0..3 {
            let (value, alpha) = (i % 256, i / 256);
            assert_eq!(got[c * plane + i], p[c] as f32, "value {value}, alpha {alpha}, channel {c}");
        }
    }
}

#[test]
fn rgba_arrays_preprocess_like_clip_image_processor() {
    let data = Dataset::open(&fixture("image_modes/rgba_u8.safetensors"), &Preprocess::clip(32), 32).unwrap();
    let got = data.batch(0..data.len()).unwrap();
    let (_, want) = reference("image_modes/rgba_u8_expected_32.safetensors", "pixel_values");
    let (max, mean) = abs_diffs(got.host().unwrap(), &want);
    assert!(max <= PIXEL_MAX_ABS_TOL && mean <= PIXEL_MEAN_ABS_TOL, "max {max:.4} mean {mean:.5}");
}

/// Pixels, pooled output and logits of a dataset through clip_a (which has a preprocessor_config.json).
fn check_dataset_through_clip_a(path: &std::path::Path, tag: &str) {
    let be = CpuBackend::new();
    let dir = ModelDir::open(&fixture("clip_a")).unwrap();
    let pre = Preprocess::for_model(&dir.path, dir.config.image_size).unwrap();
    let data = Dataset::open(path, &pre, dir.config.image_size).unwrap();
    let pixels = data.batch(0..data.len()).unwrap();
    let file = "expected_a_images.safetensors";
    let (max, mean) = abs_diffs(pixels.host().unwrap(), &reference(file, &format!("pixel_values.{tag}")).1);
    assert!(max <= PIXEL_MAX_ABS_TOL && mean <= PIXEL_MEAN_ABS_TOL, "{tag}: max {max:.4} mean {mean:.5}");
    // The model on the reference's own pixels, so only the forward is compared here.
    let (shape, ref_pixels) = reference(file, &format!("pixel_values.{tag}"));
    let model = ImageEncoder::load(&be, &dir).unwrap();
    let out = model.encode(&be, &Tensor::from_vec(&shape, ref_pixels).unwrap(), Routing::Sample).unwrap();
    assert_close(
        &format!("{tag} pooler_output"),
        out.pooled.host().unwrap(),
        &reference(file, &format!("pooler_output.{tag}")).1,
    );
    let heads = Heads::open(&be, &fixture("heads_a.safetensors")).unwrap();
    let logits =
        heads.classifier(&model, &dir.path).unwrap().logits(&be, &out.pooled, heads.head("beta").unwrap()).unwrap();
    assert_close(&format!("{tag} logits"), logits.host().unwrap(), &reference(file, &format!("logits_beta.{tag}")).1);
}

#[test]
fn raw_u8_images_preprocess_and_run_like_transformers() {
    check_dataset_through_clip_a(&fixture("images_u8.safetensors"), "u8");
}

#[test]
fn image_folder_preprocesses_and_runs_like_transformers() {
    check_dataset_through_clip_a(&fixture("photos"), "folder");
}
