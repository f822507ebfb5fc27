//! Which of several interchangeable kernels runs a product on this device. The CUDA backend's per-sample
//! WEMoE products have candidates that compute the same bits (kernels/expert_linear*.cu) and whose speed
//! depends on the card and the shape; by default each shape's candidates are timed on the device the first
//! time the shape runs, and the fastest is kept for the backend's life.

use std::fmt::Debug;
use std::sync::Mutex;

use anyhow::{anyhow, Result};

/// Which kernels run the CUDA backend's per-sample WEMoE products (f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WemoeKernels {
    /// Each shape's fastest candidate, timed on the device when the shape first runs (the default). In the
    /// host emulation the timing is the emulation's wall time, which ranks nothing but runs every candidate.
    #[default]
    Tuned,
    /// kernels/expert_linear.cu: the sources loaded as they merge.
    Direct,
    /// kernels/expert_linear_staged.cu: the sources staged by `cp.async` (sm_80 and later), one route per
    /// block.
    Staged,
}

/// A product's shape: routes, rows per route, input and output widths, experts.
pub type Shape = [usize; 5];

/// One shape's outcome: every candidate's time (or why it could not run), and the one kept.
#[derive(Clone, Debug)]
pub struct Choice<K> {
    /// The shape.
    pub shape: Shape,
    /// Each candidate with its best time in milliseconds, or its error.
    pub timings: Vec<(K, std::result::Result<f64, String>)>,
    /// The fastest.
    pub chosen: K,
}

/// The choices made so far for one operation.
pub struct KernelChoices<K> {
    made: Mutex<Vec<Choice<K>>>,
}

impl<K> Default for KernelChoices<K> {
    fn default() -> Self {
        KernelChoices { made: Mutex::new(Vec::new()) }
    }
}

/// Timed runs of each candidate after one untimed run (which also compiles it); the best is its time.
const TIMED_RUNS: usize = 2;

impl<K: Copy + Debug> KernelChoices<K> {
    /// The kernel for `shape`: the one chosen before, or the fastest of `candidates` by `time` (milliseconds
    /// of one run). A candidate that fails (a kernel this device cannot compile, say) is passed over; when
    /// none runs, the first one's error is returned.
    pub fn choose(&self, shape: Shape, candidates: &[K], mut time: impl FnMut(K) -> Result<f64>) -> Result<K> {
        if let Some(c) = self.made.lock().unwrap().iter().find(|c| c.shape == shape) {
            return Ok(c.chosen);
        }
        // The lock is not held while kernels run.
        let choice = fastest(shape, candidates, |k| {
            time(k)?;
            (0..TIMED_RUNS).map(|_| time(k)).try_fold(f64::INFINITY, |best, t| t.map(|t| best.min(t)))
        })?;
        let chosen = choice.chosen;
        let mut made = self.made.lock().unwrap();
        match made.iter().find(|c| c.shape == shape) {
            Some(earlier) => Ok(earlier.chosen), // another thread timed the same shape meanwhile: keep one choice
            None => {
                made.push(choice);
                Ok(chosen)
            }
        }
    }

    /// Every choice made so far, in the order the shapes first ran.
    pub fn made(&self) -> Vec<Choice<K>> {
        self.made.lock().unwrap().clone()
    }
}

/// The fastest of `candidates` by `time` (ties to the earlier one); failures are recorded and passed over.
fn fastest<K: Copy + Debug>(
    shape: Shape,
    candidates: &[K],
    mut time: impl FnMut(K) -> Result<f64>,
) -> Result<Choice<K>> {
    let timings: Vec<(K, std::result::Result<f64, String>)> =
        candidates.iter().map(|&k| (k, time(k).map_err(|e| format!("{e:#}")))).collect();
    let chosen = timings
        .iter()
        .filter_map(|(k, t)| t.as_ref().ok().map(|t| (*k, *t)))
        .fold(None::<(K, f64)>, |best, (k, t)| match best {
            Some((_, b)) if b <= t => best,
            _ => Some((k, t)),
        })
        .map(|(k, _)| k);
    match chosen {
        Some(chosen) => Ok(Choice { shape, timings, chosen }),
        None => Err(match timings.first() {
            Some((k, Err(e))) => anyhow!("{k:?}: {e}"),
            _ => anyhow!("no candidate kernel for shape {shape:?}"),
        }),
    }
}

impl<K: Debug> std::fmt::Display for Choice<K> {
    /// `routes×rows, in→out, T=experts: Chosen | Candidate 1.234 ms | Other (error) …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [routes, rows, inp, out, experts] = self.shape;
        write!(f, "{routes}×{rows} rows, {inp}→{out}, T={experts}: {:?}", self.chosen)?;
        for (k, t) in &self.timings {
            match t {
                Ok(ms) => write!(f, " | {k:?} {ms:.3} ms")?,
                Err(e) => write!(f, " | {k:?} failed: {e}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fastest runnable candidate wins (ties to the earlier), failures are passed over and reported, the
    /// choice is remembered per shape, and with nothing runnable the first error comes back.
    #[test]
    fn keeps_the_fastest_runnable_candidate_per_shape() {
        let choices = KernelChoices::default();
        let times = |k: char| match k {
            'a' => Ok(3.0),
            'b' => Err(anyhow!("cannot compile here")),
            'c' | 'd' => Ok(1.0),
            _ => Ok(2.0),
        };
        let mut calls = 0;
        let shape = [4, 50, 768, 3072, 8];
        let chosen = choices
            .choose(shape, &['a', 'b', 'c', 'd', 'e'], |k| {
                calls += 1;
                times(k)
            })
            .unwrap();
        assert_eq!(chosen, 'c');
        assert_eq!(calls, 5 * (1 + TIMED_RUNS) - TIMED_RUNS, "one untimed and two timed runs each; 'b' fails first");
        assert_eq!(choices.choose(shape, &['a', 'e'], |_| unreachable!("remembered")).unwrap(), 'c');
        let made = choices.made();
        assert_eq!(made.len(), 1);
        let line = made[0].to_string();
        assert!(
            line.starts_with("4×50 rows, 768→3072, T=8: 'c' | 'a' 3.000 ms | 'b' failed: cannot compile here"),
            "{line}"
        );
        let err = choices.choose([1, 1, 1, 1, 1], &['b', 'b'], times).unwrap_err();
        assert!(format!("{err:#}").contains("'b': cannot compile here"), "{err:#}");
    }
}
