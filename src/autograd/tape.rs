//! The tape: each tracked forward op records one backward step; `backward` runs them in reverse.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::device::Backend;
use crate::tensor::Tensor;

/// A tracked value's identity on its tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// Gradients during backward: one slot per tracked value, and the parameters' by name.
pub struct Gradients {
    slots: Vec<Option<Tensor>>,
    params: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// Adds `g` to the gradient of `v`.
    pub fn add(&mut self, be: &dyn Backend, v: Var, g: Tensor) -> Result<()> {
        self.slots[v.0] = Some(match self.slots[v.0].take() {
            Some(prev) => be.add(prev, &g)?,
            None => g,
        });
        Ok(())
    }

    /// Takes the gradient of `v` (none if nothing flowed into it).
    pub fn take(&mut self, v: Var) -> Option<Tensor> {
        self.slots[v.0].take()
    }

    /// Adds `g` to parameter `name`'s gradient.
    pub fn add_param(&mut self, be: &dyn Backend, name: &str, g: Tensor) -> Result<()> {
        let sum = match self.params.remove(name) {
            Some(prev) => be.add(prev, &g)?,
            None => g,
        };
        self.params.insert(name.to_string(), sum);
        Ok(())
    }

    /// The parameters' gradients, by name.
    pub fn into_params(self) -> BTreeMap<String, Tensor> {
        self.params
    }
}

/// One backward step: reads its output's gradient, adds its inputs'.
pub type Step<'a> = Box<dyn FnOnce(&dyn Backend, &mut Gradients) -> Result<()> + 'a>;

/// The record of a forward pass. Steps may borrow the model (`'a`) and own the values they need.
#[derive(Default)]
pub struct Tape<'a> {
    steps: Vec<Step<'a>>,
    vars: usize,
}

impl<'a> Tape<'a> {
    /// An empty tape.
    pub fn new() -> Self {
        Tape { steps: Vec::new(), vars: 0 }
    }

    /// A new tracked value.
    pub fn var(&mut self) -> Var {
        self.vars += 1;
        Var(self.vars - 1)
    }

    /// Records a backward step.
    pub fn record(&mut self, step: Step<'a>) {
        self.steps.push(step);
    }

    /// Runs the steps in reverse from `root` with gradient `seed`; returns the parameters' gradients.
    pub fn backward(self, be: &dyn Backend, root: Var, seed: Tensor) -> Result<Gradients> {
        let mut grads = Gradients { slots: (0..self.vars).map(|_| None).collect(), params: BTreeMap::new() };
        grads.add(be, root, seed)?;
        for step in self.steps.into_iter().rev() {
            step(be, &mut grads)?;
        }
        Ok(grads)
    }
}
