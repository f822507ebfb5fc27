//! Each task's infinite stream of shuffled batches, reshuffled every epoch, with a state that a checkpoint
//! saves and restores exactly.

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
}
