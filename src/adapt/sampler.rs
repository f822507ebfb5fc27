//! Each task's infinite stream of shuffled batches, reshuffled every epoch, with a state that a checkpoint
//! saves and restores exactly.

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// One task's sampler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSampler {
    /// Images in the task.
    pub len: usize,
    /// Images per batch.
    pub batch: usize,
    /// The generator's state.
    pub rng: u64,
    /// This epoch's order.
    pub order: Vec<usize>,
    /// Next position in `order`.
    pub pos: usize,
}

impl TaskSampler {
    /// A sampler over `len` images in batches of `batch`, shuffled from `seed`.
    pub fn new(len: usize, batch: usize, seed: u64) -> Self {
        let mut s = TaskSampler { len, batch, rng: seed, order: (0..len).collect(), pos: len };
        s.reshuffle();
        s
    }

    /// One sampler per task of `lens` images, for a run seeded by `seed`: each task its own stream.
    pub fn for_tasks(lens: impl IntoIterator<Item = usize>, batch: usize, seed: u64) -> Vec<Self> {
        let stream = |i: usize| seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64);
        lens.into_iter().enumerate().map(|(i, len)| Self::new(len, batch, stream(i))).collect()
    }

    fn reshuffle(&mut self) {
        let mut rng = Rng::new(self.rng);
        self.order = (0..self.len).collect();
        for i in (1..self.len).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
        self.rng = rng.state();
        self.pos = 0;
    }

    /// The next batch's image indices. A batch at least as large as the task is the whole task, every step;
    /// otherwise an epoch's last batch may be smaller, as a DataLoader's is.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.batch >= self.len {
            return (0..self.len).collect();
        }
        if self.pos >= self.len {
            self.reshuffle();
        }
        let end = (self.pos + self.batch).min(self.len);
        let batch = self.order[self.pos..end].to_vec();
        self.pos = end;
        batch
    }
}

/// Checks the streams a checkpoint restored against this run's tasks (names and image counts) and batch size:
/// one stream per task, each over that many images, its order a permutation of them. Data replaced at the same
/// path (another count of images), or a damaged checkpoint, is refused here rather than drawing wrong images.
pub(crate) fn check_restored(
    checkpoint: &Path,
    samplers: &[TaskSampler],
    tasks: &[(&str, usize)],
    batch: usize,
) -> Result<()> {
    let at = checkpoint.display();
    if samplers.len() != tasks.len() {
        let streams = |n: usize| format!("{n} task stream{}", if n == 1 { "" } else { "s" });
        bail!("--resume: {at} holds {}, this run has {}", streams(samplers.len()), streams(tasks.len()));
    }
    for (s, &(name, len)) in samplers.iter().zip(tasks) {
        if s.len != len {
            bail!(
                "--resume: {at} was made when task '{name}' had {} images; its data now has {len}: resume with the \
                 same data, or choose another --out",
                s.len
            );
        }
        let mut seen = vec![false; len];
        let permutation =
            s.order.len() == len && s.order.iter().all(|&i| i < len && !std::mem::replace(&mut seen[i], true));
        if s.batch != batch || s.pos > len || !permutation {
            bail!("--resume: {at}: the stream of task '{name}' is damaged; choose another --out");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_is_a_permutation_and_restored_state_continues_identically() {
        let mut s = TaskSampler::new(10, 4, 7);
        let mut seen: Vec<usize> = (0..3).flat_map(|_| s.next_batch()).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>(), "4 + 4 + 2 covers the epoch once");
        let copy = s.clone();
        let (a, b): (Vec<_>, Vec<_>) = {
            let mut c = copy;
            ((0..5).map(|_| s.next_batch()).collect(), (0..5).map(|_| c.next_batch()).collect())
        };
        assert_eq!(a, b);
        assert_ne!(TaskSampler::new(10, 4, 7).order, TaskSampler::new(10, 4, 8).order);
        assert_eq!(TaskSampler::new(3, 16, 1).next_batch(), vec![0, 1, 2], "a batch larger than the task");
    }

    #[test]
    fn restored_streams_must_fit_the_tasks() {
        let at = Path::new("ckpt");
        let streams = TaskSampler::for_tasks([10, 3], 4, 0);
        assert!(check_restored(at, &streams, &[("a", 10), ("b", 3)], 4).is_ok());
        let refused = |streams: &[TaskSampler], tasks: &[(&str, usize)]| {
            check_restored(at, streams, tasks, 4).unwrap_err().to_string()
        };
        assert!(
            refused(&streams[..1], &[("a", 10), ("b", 3)]).contains("holds 1 task stream, this run has 2 task streams")
        );
        assert!(refused(&streams, &[("a", 10), ("b", 5)]).contains("task 'b' had 3 images; its data now has 5"));
        let mut repeated = streams.clone();
        repeated[0].order[1] = repeated[0].order[0];
        assert!(refused(&repeated, &[("a", 10), ("b", 3)]).contains("the stream of task 'a' is damaged"));
    }
}
