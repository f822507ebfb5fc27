//! `torch.save` checkpoints (`pytorch_model.bin`, one file or shards; tests/fixtures/pickle, written by
//! torch.save itself with tools/make_pickle_fixtures.py): read without running their pickles, to the same
//! tensors as the safetensors they were saved from; pickles a state dict never holds are refused.

mod common;

use common::*;
use wemoe_engine::checkpoint::TensorStore;

/// Every tensor of the two model folders, compared: the same names, dtypes, shapes and bits.
fn assert_same_tensors(bin: &str, safetensors: &str) {
    let (a, b) = (TensorStore::open_dir(&fixture(bin)).unwrap(), TensorStore::open_dir(&fixture(safetensors)).unwrap());
    let names: Vec<&str> = a.names().collect();
    assert_eq!(names, b.names().collect::<Vec<_>>(), "{bin}: names");
    for name in names {
        assert_eq!(a.dtype(name), b.dtype(name), "{bin}: {name}");
        let (x, y) = (a.get_any(name).unwrap(), b.get_any(name).unwrap());
        assert_eq!(x.shape(), y.shape(), "{bin}: {name}");
        let bits = |t: &wemoe_engine::tensor::Tensor| t.host().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&x) == bits(&y), "{bin}: {name} differs");
    }
}

#[test]
fn a_pytorch_model_bin_holds_its_safetensors_tensors() {
    assert_same_tensors("pickle/clip_c", "clip_c"); // bf16 storages, one file
    assert_same_tensors("pickle/clip_b_sharded", "clip_b"); // f32 parameters (with and without state), two shards
}

#[test]
fn a_torch_save_model_embeds_and_merges_as_its_safetensors_does() {
    let tmp = tempfile::tempdir().unwrap();
    let embed = |model: &str, out: &str| {
        let out = tmp.path().join(out);
        let pixels = fixture("pixels_b.safetensors");
        let (ok, _, err) = engine(&[
            "--device",
            "cpu",
            "embed",
            "--model",
            s(&fixture(model)),
            "--images",
            s(&pixels),
            "--out",
            s(&out),
        ]);
        assert!(ok, "{model}: {err}");
        std::fs::read(out).unwrap()
    };
    assert!(embed("pickle/clip_b_sharded", "bin.safetensors") == embed("clip_b", "st.safetensors"));
    // The streaming merge, which drops each source tensor's pages once written, from torch.save sources.
    let merge = |pretrained: &str, expert: &str, out: &str| {
        let out = tmp.path().join(out);
        let expert = format!("a={}", s(&fixture(expert)));
        let (ok, _, err) =
            engine(&["merge", "--pretrained", s(&fixture(pretrained)), "--expert", &expert, "--out", s(&out)]);
        assert!(ok, "{pretrained}: {err}");
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    assert!(merge("pickle/clip_b_sharded", "pickle/clip_b_sharded", "bin") == merge("clip_b", "clip_b", "st"));
}

#[test]
fn a_pickle_no_state_dict_holds_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let truncated = std::fs::read(fixture("pickle/clip_c/pytorch_model.bin")).unwrap();
    let truncated = &truncated[..truncated.len() - 100];
    for (file, expected) in [
        ("calls_print", "the pickle names __builtin__.print, which no state dict of tensors holds: refused"),
        ("strided", "tensor 'w' is a strided view (size [4, 3], strides [1, 4]); save a contiguous copy"),
        ("legacy", "a PyTorch file in the format before 1.6"),
        ("big_endian", "saved on a big machine: only little-endian files are read"),
        ("truncated", "no end of central directory: not a zip archive, or a truncated one"),
    ] {
        let dir = tmp.path().join(file);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(fixture("clip_c/config.json"), dir.join("config.json")).unwrap();
        let bin = dir.join("pytorch_model.bin");
        match file {
            "truncated" => std::fs::write(&bin, truncated).unwrap(),
            _ => drop(std::fs::copy(fixture(&format!("pickle/refused/{file}.bin")), &bin).unwrap()),
        }
        let out = tmp.path().join(format!("{file}.safetensors"));
        let pixels = fixture("pixels_c.safetensors");
        let (ok, _, err) = engine(&["embed", "--model", s(&dir), "--images", s(&pixels), "--out", s(&out)]);
        assert!(!ok && err.lines().count() == 1 && err.contains(expected), "{file}: {err}");
        assert!(err.starts_with(&format!("error: {}: ", bin.display())), "{file}: the file is named: {err}");
        assert!(!out.exists(), "{file}: nothing written");
    }
}
