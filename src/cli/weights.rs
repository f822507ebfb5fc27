//! `--weights` of `embed` and `eval`: the whole model loaded before the pass, or its encoder layers loaded
//! one at a time (`StreamedEncoder`).

use anyhow::Result;
use clap::ValueEnum;
use wemoe_engine::checkpoint::ModelDir;
use wemoe_engine::device::{Backend, Device};
use wemoe_engine::eval::Encoder;
use wemoe_engine::model::{ImageEncoder, StreamedEncoder};

/// Where the encoder layers' weights live during a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Weights {
    /// Streamed on the CPU, resident on a GPU where the model fits (whose forward is too
    /// fast to hide a reload).
    #[default]
    Auto,
    /// Every layer loaded before the first image.
    Resident,
    /// One layer at a time, for each span of batches: peak memory about one layer's weights.
    Streamed,
}

/// The model of a pass, loaded as `--weights` says.
pub enum LoadedEncoder<'a> {
    /// Every layer loaded.
    Resident(ImageEncoder),
    /// Layers loaded as the pass reaches them.
    Streamed(StreamedEncoder<'a>),
}

/// Device memory `auto` leaves beside a resident model's weights, for a pass's activations and workspaces.
const PASS_HEADROOM: u64 = 1 << 30;

/// Whether `auto` keeps a model of `weights` bytes resident on a device with `free` bytes free (`None`: no bound
/// of its own, as in the emulation).
fn resident_fits(weights: u64, free: Option<u64>) -> bool {
    free.is_none_or(|free| weights.checked_add(PASS_HEADROOM).is_some_and(|need| need <= free))
}

impl<'a> LoadedEncoder<'a> {
    /// Loads `dir`'s encoder on `be` (for a streamed one, all but its layers). On a GPU `auto` keeps it resident
    /// where its f32 weights fit in the free memory with [`PASS_HEADROOM`] to spare, and streams it (with a note
    /// unless `quiet`) where they do not.
    pub fn load(be: &dyn Backend, dir: &'a ModelDir, weights: Weights, quiet: bool) -> Result<Self> {
        let streamed = match weights {
            Weights::Auto if be.device() == Device::Cpu => true,
            Weights::Auto => {
                let (bytes, _) = dir.weight_bytes();
                let free = be.free_memory();
                let fits = resident_fits(bytes as u64, free);
                if let (false, false, Some(free)) = (fits, quiet, free) {
                    eprintln!(
                        "note: the model's weights ({} MiB in f32) and a pass's 1 GiB leave no room in the {} MiB \
                         free on {}: its layers are streamed (--weights resident to hold them all)",
                        bytes >> 20,
                        free >> 20,
                        be.device()
                    );
                }
                !fits
            }
            Weights::Resident => false,
            Weights::Streamed => true,
        };
        Ok(if streamed {
            LoadedEncoder::Streamed(StreamedEncoder::load(be, dir)?)
        } else {
            LoadedEncoder::Resident(ImageEncoder::load(be, dir)?)
        })
    }

    /// The encoder, for the passes of `wemoe_engine::eval`.
    pub fn encoder(&self) -> Encoder<'_> {
        match self {
            LoadedEncoder::Resident(model) => Encoder::Resident(model),
            LoadedEncoder::Streamed(streamed) => Encoder::Streamed(streamed),
        }
    }

    /// Seconds spent loading layers during passes so far (none when resident).
    pub fn layer_load_seconds(&self) -> f64 {
        match self {
            LoadedEncoder::Resident(_) => 0.0,
            LoadedEncoder::Streamed(streamed) => streamed.layer_load_seconds(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_a_model_resident_where_it_fits_with_a_pass_to_spare() {
        const GIB: u64 = 1 << 30;
        assert!(resident_fits(10 * GIB, None), "no bound of its own (the emulation)");
        assert!(resident_fits(10 * GIB, Some(11 * GIB)));
        assert!(!resident_fits(10 * GIB, Some(11 * GIB - 1)), "less than the pass's headroom left");
        assert!(!resident_fits(17 * GIB, Some(15 * GIB)), "more than is free");
        assert!(!resident_fits(u64::MAX, Some(u64::MAX)));
    }
}
