//! CLIP's image preprocessing (HF `CLIPImageProcessor`): RGB, resize of the shortest edge with Pillow's
//! antialiased bicubic, centre crop, rescale by 1/255, normalise per channel.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::resample::{resize_window, Filter};

/// OpenAI CLIP's channel means.
#[allow(clippy::excessive_precision)] // written as HF writes them
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's channel standard deviations.
#[allow(clippy::excessive_precision)] // written as HF writes them
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// The largest side a preprocessor config may resize or crop to.
pub const MAX_SIDE: usize = 1 << 16;

/// How an image is resized before the crop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Not at all.
    None,
    /// The shortest edge to this length, the aspect ratio kept (CLIP's `{"shortest_edge": n}`).
    ShortestEdge(usize),
    /// To exactly this height and width (`{"height": h, "width": w}`).
    Exact(usize, usize),
}

/// The preprocessing of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// The resize.
    pub resize: Resize,
    /// Crop height and width, or `None` to skip cropping.
    pub crop: Option<(usize, usize)>,
    /// The resize filter.
    pub filter: Filter,
    /// Factor from 8-bit values to [0, 1].
    pub rescale: f32,
    /// Per-channel mean, or `None` to skip normalising.
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl Preprocess {
    /// CLIP's preprocessing to `size × size`.
    pub fn clip(size: usize) -> Self {
        Preprocess {
            resize: Resize::ShortestEdge(size),
            crop: Some((size, size)),
            filter: Filter::Bicubic,
            rescale: 1.0 / 255.0,
            mean_std: Some((CLIP_MEAN, CLIP_STD)),
        }
    }

    /// The preprocessing a model directory asks for in `preprocessor_config.json`, else CLIP's at
    /// `image_size`.
    pub fn for_model(dir: &Path, image_size: usize) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::clip(image_size));
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(&json, image_size).with_context(|| path.display().to_string())
    }

    fn from_json(json: &Value, image_size: usize) -> Result<Self> {
        let mut p = Self::clip(image_size);
        // A key absent (or null) keeps CLIP's value; present, it must be of its kind rather than read as absent.
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let flag = |key: &str| -> Result<bool> {
            get(key).map_or(Ok(true), |v| v.as_bool().with_context(|| format!("\"{key}\" {v} is not true or false")))
        };
        // A resize allocates its filter's windows for every output row and column: sides are held to a bound
        // far above any CLIP's, so that a mistyped size is refused rather than exhausting memory.
        let side = |v: &Value, what: &str| -> Result<usize> {
            v.as_u64()
                .filter(|n| (1..=MAX_SIDE as u64).contains(n))
                .map(|n| n as usize)
                .with_context(|| format!("{what} {v}: must be a whole number of pixels, 1 to {MAX_SIDE}"))
        };
        // As CLIPImageProcessor reads a size: a bare number, else an object of "shortest_edge" (resize) or
        // "height" and "width".
        let height_width = |v: &Value, key: &str| -> Result<Option<(usize, usize)>> {
            match (v.get("height"), v.get("width")) {
                (Some(h), Some(w)) => {
                    Ok(Some((side(h, &format!("\"{key}\".height"))?, side(w, &format!("\"{key}\".width"))?)))
                }
                _ => Ok(None),
            }
        };
        if !flag("do_resize")? {
            p.resize = Resize::None;
        } else if let Some(size) = get("size") {
            p.resize = if size.is_number() {
                Resize::ShortestEdge(side(size, "\"size\"")?)
            } else if let Some(edge) = size.get("shortest_edge") {
                Resize::ShortestEdge(side(edge, "\"size\".shortest_edge")?)
            } else if let Some((h, w)) = height_width(size, "size")? {
                Resize::Exact(h, w)
            } else {
                bail!("\"size\" {size}: needs \"shortest_edge\", or \"height\" and \"width\"")
            };
        }
        if !flag("do_center_crop")? {
            p.crop = None;
        } else if let Some(crop) = get("crop_size") {
            p.crop = Some(if crop.is_number() {
                let n = side(crop, "\"crop_size\"")?;
                (n, n)
            } else {
                height_width(crop, "crop_size")?
                    .with_context(|| format!("\"crop_size\" {crop}: needs \"height\" and \"width\""))?
            });
        }
        if let Some(code) = get("resample") {
            p.filter = code.as_i64().and_then(Filter::from_pil).with_context(|| {
                format!("\"resample\" {code}: only PIL's 2 (bilinear) and 3 (bicubic) are supported")
            })?;
        }
        if !flag("do_rescale")? {
            p.rescale = 1.0;
        } else if let Some(f) = get("rescale_factor") {
            p.rescale = f
                .as_f64()
                .filter(|f| f.is_finite())
                .with_context(|| format!("\"rescale_factor\" {f}: must be a finite number"))?
                as f32;
        }
        if !flag("do_normalize")? {
            p.mean_std = None;
        } else {
            // Each channel is divided by its std: a zero would make every pixel infinite.
            let triple = |key: &str, default: [f32; 3], nonzero: bool| -> Result<[f32; 3]> {
                let Some(v) = get(key) else { return Ok(default) };
                let usable = |x: &Value| x.as_f64().filter(|x| x.is_finite() && (!nonzero || *x != 0.0));
                let numbers: Option<Vec<f32>> =
                    v.as_array().and_then(|a| a.iter().map(|x| usable(x).map(|x| x as f32)).collect());
                let kind = if nonzero { "nonzero numbers" } else { "numbers" };
                numbers.and_then(|n| n.try_into().ok()).with_context(|| format!("\"{key}\" {v}: must be 3 {kind}"))
            };
            p.mean_std = Some((triple("image_mean", CLIP_MEAN, false)?, triple("image_std", CLIP_STD, true)?));
        }
        Ok(p)
    }

    /// The size every image comes out at: the crop's, else an exact resize's; `None` when each keeps its own.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(crop), _) => Some(crop),
            (None, Resize::Exact(h, w)) => Some((h, w)),
            (None, _) => None,
        }
    }

    /// HF's `get_resize_output_image_size`: with `default_to_square=False` for a shortest edge.
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            Resize::None => (height, width),
            Resize::Exact(h, w) => (h, w),
            Resize::ShortestEdge(edge) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = edge * long / short;
                if width <= height {
                    (new_long, edge)
                } else {
                    (edge, new_long)
                }
            }
        }
    }

    /// Preprocesses an interleaved 8-bit image (`channels` 1 = grey, 2 = grey and alpha, 3 = RGB, 4 = RGBA)
    /// to planar `[3, H, W]` f32. Transparency is composited onto white first, as transformers' `convert_to_rgb`
    /// does before the processor resizes.
    pub fn apply(&self, pixels: &[u8], height: usize, width: usize, channels: usize) -> Result<Vec<f32>> {
        if height == 0 || width == 0 {
            bail!("image of size {width}×{height} is empty");
        }
        if !(1..=4).contains(&channels) {
            bail!("image with {channels} channels (expected 1 to 4: grey, grey and alpha, RGB, RGBA)");
        }
        ensure!(
            pixels.len() == height * width * channels,
            "image of {width}×{height}×{channels} given {} bytes",
            pixels.len()
        );
        let rgb = to_rgb(pixels, channels);
        let (rh, rw) = self.resized_size(height, width);
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        ensure!(rh > 0 && rw > 0 && ch > 0 && cw > 0, "preprocessing to an empty image ({rh}×{rw}, crop {ch}×{cw})");
        // HF's centre crop: floor division, zero padding when the crop exceeds the image.
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        // Only the crop's window of the resized image is computed (each pixel as the whole resize gives it).
        let window = |start: i64, len: usize, size: usize| {
            start.clamp(0, size as i64) as usize..(start + len as i64).clamp(0, size as i64) as usize
        };
        let (rows, cols) = (window(top, ch, rh), window(left, cw, rw));
        let resized = resize_window(&rgb, (height, width, 3), (rh, rw), (rows.clone(), cols.clone()), self.filter);
        // Where the resized window sits in the crop: rows `y0..y0 + rows.len()`, columns `x0..x0 + cols.len()`;
        // the rest is padding (a zero sample, normalised like any other).
        let (y0, x0) = ((rows.start as i64 - top) as usize, (cols.start as i64 - left) as usize);
        let mut out = vec![0f32; 3 * ch * cw];
        for (c, plane) in out.chunks_exact_mut(ch * cw).enumerate() {
            let (mean, std) = self.mean_std.map_or((0.0, 1.0), |(m, s)| (m[c], s[c]));
            let value = |v: u8| (v as f32 * self.rescale - mean) / std;
            plane.fill(value(0));
            if cols.is_empty() {
                continue;
            }
            for (y, src) in resized.chunks_exact(cols.len() * 3).enumerate() {
                let row = &mut plane[(y0 + y) * cw + x0..][..cols.len()];
                for (o, px) in row.iter_mut().zip(src.chunks_exact(3)) {
                    *o = value(px[c]);
                }
            }
        }
        Ok(out)
    }
}

/// Interleaved 8-bit RGB from 1 to 4 channels: grey repeated, alpha composited onto white; RGB as it is.
fn to_rgb(pixels: &[u8], channels: usize) -> Cow<'_, [u8]> {
    match channels {
        1 => pixels.iter().flat_map(|&g| [g, g, g]).collect(),
        2 => pixels.chunks_exact(2).flat_map(|p| [over_white(p[0], p[1]); 3]).collect(),
        3 => Cow::Borrowed(pixels),
        _ => pixels.chunks_exact(4).flat_map(|p| [0, 1, 2].map(|c| over_white(p[c], p[3]))).collect(),
    }
}

/// A sample of value `value` and opacity `alpha` over an opaque white background, rounded to nearest:
/// `(value·alpha + 255·(255 − alpha)) / 255`. That is what Pillow's `Image.alpha_composite` (which
/// transformers' `convert_to_rgb` calls) gives for every pair, checked in tests/parity_transformers.rs.
fn over_white(value: u8, alpha: u8) -> u8 {
    let (value, alpha) = (u32::from(value), u32::from(alpha));
    ((value * alpha + 255 * (255 - alpha) + 127) / 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_follows_hf_rounding() {
        let p = Preprocess::clip(224);
        assert_eq!(p.resized_size(427, 640), (224, 335));
        assert_eq!(p.resized_size(640, 427), (335, 224));
    }

    #[test]
    fn a_crop_past_the_image_pads_with_zero_samples_as_hf_does() {
        // 3 × 5 RGB, no resize; crops taller and wider, taller and narrower, and inside.
        let image: Vec<u8> = (0..3 * 5 * 3).map(|i| (i * 17 % 256) as u8).collect();
        for crop in [(4, 7), (6, 2), (2, 3)] {
            let p = Preprocess { resize: Resize::None, crop: Some(crop), ..Preprocess::clip(4) };
            let got = p.apply(&image, 3, 5, 3).unwrap();
            let (top, left) = ((3 - crop.0 as i64).div_euclid(2), (5 - crop.1 as i64).div_euclid(2));
            for c in 0..3 {
                let (mean, std) = (CLIP_MEAN[c], CLIP_STD[c]);
                for y in 0..crop.0 {
                    for x in 0..crop.1 {
                        let (sy, sx) = (top + y as i64, left + x as i64);
                        let v = if (0..3).contains(&sy) && (0..5).contains(&sx) {
                            image[(sy as usize * 5 + sx as usize) * 3 + c]
                        } else {
                            0
                        };
                        let want = (v as f32 * p.rescale - mean) / std;
                        assert_eq!(got[(c * crop.0 + y) * crop.1 + x], want, "crop {crop:?} at {c},{y},{x}");
                    }
                }
            }
        }
    }

    #[test]
    fn config_file_fields_are_read() {
        let json = serde_json::json!({"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 30},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2});
        let p = Preprocess::from_json(&json, 224).unwrap();
        assert_eq!((p.resize, p.crop, p.filter), (Resize::ShortestEdge(40), Some((32, 30)), Filter::Bilinear));
        assert!(Preprocess::from_json(&serde_json::json!({"resample": 1}), 224).is_err());
        // A mean that is not three numbers used to become NaN pixels; a size with neither a shortest edge nor
        // both sides is refused.
        for bad in [
            serde_json::json!({"image_mean": ["0.5", 0.5, 0.5]}),
            serde_json::json!({"image_std": [0.5, 0.5]}),
            serde_json::json!({"size": {"longest_edge": 40}}),
            serde_json::json!({"size": {"height": 40}}),
        ] {
            assert!(Preprocess::from_json(&bad, 224).is_err(), "{bad}");
        }
        // A field of the wrong kind is refused, not read as absent; a zero std (infinite pixels) and a size that
        // would exhaust memory are refused too.
        for (bad, message) in [
            (serde_json::json!({"image_std": "x"}), r#""image_std" "x": must be 3 nonzero numbers"#),
            (serde_json::json!({"image_std": [0.5, 0, 0.5]}), r#""image_std" [0.5,0,0.5]: must be 3 nonzero numbers"#),
            (serde_json::json!({"do_resize": "yes"}), r#""do_resize" "yes" is not true or false"#),
            (serde_json::json!({"resample": "bicubic"}), r#""resample" "bicubic": only PIL's 2 (bilinear) and 3"#),
            (serde_json::json!({"rescale_factor": "x"}), r#""rescale_factor" "x": must be a finite number"#),
            (
                serde_json::json!({"size": 1_000_000_000}),
                r#""size" 1000000000: must be a whole number of pixels, 1 to"#,
            ),
            (serde_json::json!({"crop_size": {"height": 0, "width": 4}}), r#""crop_size".height 0: must be a whole"#),
        ] {
            let err = Preprocess::from_json(&bad, 224).unwrap_err().to_string();
            assert!(err.starts_with(message), "{bad}: {err}");
        }
        let p =
            Preprocess::from_json(&serde_json::json!({"size": 30, "crop_size": 28, "resample": null}), 224).unwrap();
        assert_eq!((p.resize, p.crop, p.filter), (Resize::ShortestEdge(30), Some((28, 28)), Filter::Bicubic));
    }
}
