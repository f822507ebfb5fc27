//! TIES-merging (Yadav et al., NeurIPS 2023), as FusionBench's `TiesMergingAlgorithm` computes it on the
//! whole vision model flattened into one vector per task:
//!
//! 1. trim: each task vector `τ_t = θ_t − θ0` keeps the entries whose magnitude is at least its k-th smallest
//!    magnitude, `k = d − ⌊d·K⌋` for `d` parameters and a kept fraction `K`; the rest become 0;
//! 2. elect: every parameter's sign is that of the sum of the trimmed entries; where that sum is 0, the
//!    sign of the sum of all elected signs (the majority) stands in;
//! 3. disjoint merge: the entries of the elected sign are summed (`sum`), averaged over their count (`mean`)
//!    or the largest magnitude taken with the elected sign (`max`); the model is `θ0 + λ·merged`.
//!
//! Steps 1 and 2 need the whole model's statistics, which a tensor-by-tensor stream gets in three passes
//! over the task vectors before the merge writes anything: two find each task's k-th magnitude exactly,
//! one counts the elected signs.

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

use super::Expert;
use crate::checkpoint::ModelDir;
use crate::tensor::Tensor;

/// How the entries that agree with the elected sign are combined (FusionBench's `merge_func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TiesMergeFunc {
    /// Their sum (FusionBench's default).
    Sum,
    /// Their sum over their count.
    Mean,
    /// The largest magnitude, with the elected sign.
    Max,
}

impl TiesMergeFunc {
    /// The name `--merge-func` takes (FusionBench's).
    pub fn name(&self) -> &'static str {
        match self {
            TiesMergeFunc::Sum => "sum",
            TiesMergeFunc::Mean => "mean",
            TiesMergeFunc::Max => "max",
        }
    }
}

/// TIES-merging's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TiesOptions {
    /// FusionBench's `threshold`: the share of each task vector's entries kept by magnitude, as a percentage
    /// when above 1 (FusionBench's default 20), else as a fraction.
    pub threshold: f64,
    /// How the agreeing entries are combined.
    pub merge_func: TiesMergeFunc,
}

impl Default for TiesOptions {
    /// FusionBench's `method/ties_merging.yaml`: threshold 20, merge_func sum.
    fn default() -> Self {
        TiesOptions { threshold: 20.0, merge_func: TiesMergeFunc::Sum }
    }
}

impl TiesOptions {
    /// The fraction kept, `K`, as FusionBench reads `threshold`.
    pub fn keep_fraction(&self) -> Result<f64> {
        let t = self.threshold;
        ensure!(
            t.is_finite() && t > 0.0 && t <= 100.0,
            "--threshold {t}: must be a share of entries kept, above 0 and at most 100 (a percentage above 1, \
             else a fraction, as FusionBench reads it)"
        );
        Ok(if t > 1.0 { t / 100.0 } else { t })
    }
}

/// What the trim and the sign election take from the whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct TiesStats {
    /// The fraction of each task vector kept, `K`.
    pub keep: f64,
    /// Per expert, the smallest magnitude kept: its task vector's k-th smallest magnitude (0 keeps all).
    pub thresholds: Vec<f32>,
    /// The sign that parameters whose trimmed entries sum to 0 are given: that of the sum of all elected signs.
    pub majority_sign: f32,
}

/// The k-th smallest magnitude (1-based) of values seen in two passes, found exactly: a non-negative f32's
/// bit pattern orders as its value does, so the first pass counts the upper 16 bits of `|x|` and the second
/// the lower 16 bits of those in the bin that holds the k-th.
pub(crate) struct KthMagnitude {
    rank: u64,
    upper: Option<u32>,
    counts: Vec<u64>,
}

impl KthMagnitude {
    /// For the `rank`-th smallest (1-based) of the values to come.
    pub(crate) fn new(rank: u64) -> Self {
        KthMagnitude { rank, upper: None, counts: vec![0; 1 << 16] }
    }

    /// Counts `values` in the current pass.
    pub(crate) fn count(&mut self, values: &[f32]) {
        match self.upper {
            None => values.iter().for_each(|v| self.counts[((v.to_bits() & 0x7fff_ffff) >> 16) as usize] += 1),
            Some(upper) => {
                for v in values {
                    let bits = v.to_bits() & 0x7fff_ffff;
                    if bits >> 16 == upper {
                        self.counts[(bits & 0xffff) as usize] += 1;
                    }
                }
            }
        }
    }

    /// Ends a pass: `None` after the first (a second pass over the same values must follow), the k-th
    /// smallest magnitude after the second. Fails when fewer than `rank` values were counted.
    pub(crate) fn end_pass(&mut self) -> Result<Option<f32>> {
        ensure!(self.rank > 0, "rank 0 has no value: ranks start at 1");
        let mut rank = self.rank;
        let Some(bin) = self.counts.iter().position(|&c| {
            let here = rank <= c;
            if !here {
                rank -= c;
            }
            here
        }) else {
            bail!("rank {} is beyond the values counted", self.rank);
        };
        Ok(match self.upper {
            None => {
                self.upper = Some(bin as u32);
                self.rank = rank;
                self.counts.fill(0);
                None
            }
            Some(upper) => Some(f32::from_bits(upper << 16 | bin as u32)),
        })
    }
}

/// The pretrained tensor `name`, `θ0`, and every expert's task vector of it, `θ_t − θ0` in f32.
pub(crate) fn task_vectors(pretrained: &ModelDir, experts: &[Expert], name: &str) -> Result<(Tensor, Vec<Vec<f32>>)> {
    let shape = pretrained.store.shape(name).unwrap_or_default().to_vec();
    let theta0 = pretrained.store.get(name, &shape)?;
    let base = theta0.host()?;
    let taus = experts
        .par_iter()
        .map(|e| {
            let theta = e.model.store.get(name, &shape)?;
            let tau = theta.host()?.iter().zip(base).map(|(x, b)| x - b).collect();
            e.model.store.release(name);
            Ok(tau)
        })
        .collect::<Result<Vec<Vec<f32>>>>()?;
    pretrained.store.release(name);
    Ok((theta0, taus))
}

/// Zeroes the entries of each task vector below its threshold (FusionBench's `topk_values_mask`).
fn trim(taus: &mut [Vec<f32>], thresholds: &[f32]) {
    taus.par_iter_mut().zip(thresholds).for_each(|(tau, &threshold)| {
        tau.iter_mut().filter(|v| v.abs() < threshold).for_each(|v| *v = 0.0);
    });
}

/// Parameters per parallel chunk of the per-parameter passes.
const CHUNK: usize = 1 << 14;

/// The sign of the sum of parameter `p`'s trimmed entries, summed in expert order: 1, −1 or 0.
fn column_sign(trimmed: &[Vec<f32>], p: usize) -> f32 {
    let sum = trimmed.iter().fold(0.0f32, |a, t| a + t[p]);
    if sum > 0.0 {
        1.0
    } else if sum < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The whole model's TIES statistics, from three passes over the task vectors of `names` (every vision
/// tensor, as FusionBench flattens the state dict); `progress(done, total)` counts the tensors read, once per
/// tensor per pass (one pass when every entry is kept).
pub(crate) fn ties_stats(
    pretrained: &ModelDir,
    experts: &[Expert],
    names: &[String],
    opts: &TiesOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TiesStats> {
    let keep = opts.keep_fraction()?;
    let d: u64 =
        names.iter().map(|n| pretrained.store.shape(n).unwrap_or_default().iter().product::<usize>() as u64).sum();
    ensure!(d > 0, "{}: no vision parameters to merge", pretrained.path.display());
    // FusionBench: k = d − int(d·K), the k-th smallest magnitude the least kept. K = 1 leaves k = 0, where
    // torch's kthvalue fails; every entry is kept then.
    let rank = d - (d as f64 * keep) as u64;
    let mut thresholds = vec![0.0f32; experts.len()];
    let total = if rank > 0 { 3 * names.len() } else { names.len() };
    let mut done = 0;
    let mut progress = move || {
        done += 1;
        progress(done, total);
    };
    if rank > 0 {
        let mut selects: Vec<KthMagnitude> = experts.iter().map(|_| KthMagnitude::new(rank)).collect();
        let mut count_pass = |selects: &mut [KthMagnitude]| -> Result<()> {
            for name in names {
                let (_, taus) = task_vectors(pretrained, experts, name)?;
                selects.par_iter_mut().zip(&taus).for_each(|(s, tau)| s.count(tau));
                progress();
            }
            Ok(())
        };
        count_pass(&mut selects)?;
        for s in &mut selects {
            s.end_pass()?;
        }
        count_pass(&mut selects)?;
        for (threshold, s) in thresholds.iter_mut().zip(&mut selects) {
            *threshold = s.end_pass()?.context("the second pass ends with the k-th magnitude")?;
        }
    }
    let (mut positive, mut negative) = (0u64, 0u64);
    for name in names {
        let (_, mut taus) = task_vectors(pretrained, experts, name)?;
        trim(&mut taus, &thresholds);
        let n = taus[0].len();
        let (pos, neg) = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                (c * CHUNK..n.min((c + 1) * CHUNK)).fold((0u64, 0u64), |(pos, neg), p| {
                    let s = column_sign(&taus, p);
                    (pos + u64::from(s > 0.0), neg + u64::from(s < 0.0))
                })
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        (positive, negative) = (positive + pos, negative + neg);
        progress();
    }
    let majority_sign = match positive.cmp(&negative) {
        std::cmp::Ordering::Greater => 1.0,
        std::cmp::Ordering::Less => -1.0,
        std::cmp::Ordering::Equal => 0.0,
    };
    Ok(TiesStats { keep, thresholds, majority_sign })
}

/// `θ0 + λ·merged` for one tensor from its pretrained values and its experts' task vectors.
pub(crate) fn ties_merge(
    base: &[f32],
    mut taus: Vec<Vec<f32>>,
    stats: &TiesStats,
    merge_func: TiesMergeFunc,
    scaling: f32,
) -> Vec<f32> {
    trim(&mut taus, &stats.thresholds);
    let mut out = base.to_vec();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        for (i, out) in chunk.iter_mut().enumerate() {
            merge_parameter(&taus, c * CHUNK + i, out, stats, merge_func, scaling);
        }
    });
    out
}

/// `out += λ·merged` for parameter `p`.
fn merge_parameter(
    taus: &[Vec<f32>],
    p: usize,
    out: &mut f32,
    stats: &TiesStats,
    merge_func: TiesMergeFunc,
    scaling: f32,
) {
    let mut sign = column_sign(taus, p);
    if sign == 0.0 {
        sign = stats.majority_sign;
    }
    // FusionBench's where(sign > 0, v > 0, v < 0): a sign still 0 keeps the negative entries.
    let agrees = |v: f32| if sign > 0.0 { v > 0.0 } else { v < 0.0 };
    let kept = taus.iter().map(|t| t[p]).filter(|&v| agrees(v));
    let merged = match merge_func {
        // From +0.0 as torch's sums start (Rust's `sum` starts from −0.0, which an empty sum keeps).
        TiesMergeFunc::Sum => kept.fold(0.0f32, |a, v| a + v),
        TiesMergeFunc::Mean => {
            let (sum, count) = kept.fold((0.0f32, 0u32), |(s, c), v| (s + v, c + 1));
            sum / count.max(1) as f32
        }
        TiesMergeFunc::Max => kept.map(f32::abs).fold(0.0f32, f32::max) * sign,
    };
    *out += scaling * merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The k-th smallest magnitude by sorting.
    fn by_sort(values: &[f32], rank: usize) -> f32 {
        let mut m: Vec<f32> = values.iter().map(|v| v.abs()).collect();
        m.sort_by(f32::total_cmp);
        m[rank - 1]
    }

    fn select(chunks: &[&[f32]], rank: u64) -> f32 {
        let mut s = KthMagnitude::new(rank);
        chunks.iter().for_each(|c| s.count(c));
        assert_eq!(s.end_pass().unwrap(), None);
        chunks.iter().for_each(|c| s.count(c));
        s.end_pass().unwrap().unwrap()
    }

    #[test]
    fn kth_magnitude_equals_sorting() {
        let mut rng = Rng::new(7);
        // Spread over many binades, with repeated values, zeros of both signs and values one ulp apart.
        let mut values: Vec<f32> = rng.normal_vec(3000, 0.0, 1.0).iter().map(|v| v * v.abs().powi(6)).collect();
        values.extend([0.0, -0.0, 0.0, 1.5, -1.5, 1.5, f32::from_bits(1.5f32.to_bits() + 1), f32::MIN_POSITIVE]);
        let (a, b) = values.split_at(1234);
        for rank in [1, 2, 3, 4, 500, 1500, 2999, 3000, 3001, 3007, 3008] {
            assert_eq!(select(&[a, b], rank as u64), by_sort(&values, rank), "rank {rank}");
        }
        assert!(KthMagnitude::new(3009).end_pass().is_err());
    }

    #[test]
    fn keep_fraction_reads_threshold_as_fusionbench_does() {
        let keep = |threshold| TiesOptions { threshold, merge_func: TiesMergeFunc::Sum }.keep_fraction();
        assert_eq!(keep(20.0).unwrap(), 0.2);
        assert_eq!(keep(0.2).unwrap(), 0.2);
        assert_eq!(keep(1.0).unwrap(), 1.0);
        assert_eq!(keep(100.0).unwrap(), 1.0);
        for bad in [0.0, -5.0, 100.5, f64::NAN, f64::INFINITY] {
            assert!(keep(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn elected_signs_and_each_merge_function() {
        // Parameters: two agree; +3 against −1 −1; an exact cancellation (sum 0: the majority sign decides);
        // all trimmed; one entry below its expert's threshold.
        let taus =
            || vec![vec![1.0, 3.0, 2.0, 0.0, 0.5], vec![2.0, -1.0, -2.0, 0.0, -4.0], vec![0.0, -1.0, 0.0, 0.0, 1.0]];
        let stats = |majority_sign| TiesStats { keep: 0.5, thresholds: vec![1.0, 1.0, 1.0], majority_sign };
        let base = [10.0; 5];
        let run = |f, m| ties_merge(&base, taus(), &stats(m), f, 0.5);
        assert_eq!(run(TiesMergeFunc::Sum, 1.0), [11.5, 11.5, 11.0, 10.0, 8.0]);
        assert_eq!(run(TiesMergeFunc::Sum, -1.0), [11.5, 11.5, 9.0, 10.0, 8.0]);
        // A majority of 0 keeps the negative entries, as torch.where(sign > 0, v > 0, v < 0) does.
        assert_eq!(run(TiesMergeFunc::Sum, 0.0), [11.5, 11.5, 9.0, 10.0, 8.0]);
        assert_eq!(run(TiesMergeFunc::Mean, 1.0), [10.75, 11.5, 11.0, 10.0, 8.0]);
        assert_eq!(run(TiesMergeFunc::Max, 1.0), [11.0, 11.5, 11.0, 10.0, 8.0]);
        assert_eq!(run(TiesMergeFunc::Max, 0.0), [11.0, 11.5, 10.0, 10.0, 8.0]);
    }
}
