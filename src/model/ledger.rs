//! The numbers of training steps -- each deep-supervision output's loss parts and the squared
//! gradient norm -- stay in device memory until read, a run of steps at a time. A step queues
//! its work and returns without waiting for the GPU; its update reads the record on the device
//! to clip the gradients and to skip a non-finite step. The host reads the records where a
//! number is printed (once per epoch) or when the ledger is full.

use crate::backend::{step_applies, Backend, LossParts, LOSS_RECORD};
use anyhow::{bail, Result};

/// Records a ledger holds before a step must read them (a synchronisation): more than an
/// epoch of nnU-Net's 250 steps.
pub const CAPACITY: usize = 256;

/// One step as read back.
#[derive(Clone, Debug, Default)]
pub struct StepLoss {
    /// sum_s w_s * (ce_s + dice_s).
    pub total: f64,
    /// Parts of the full-resolution output.
    pub top: LossParts,
    pub grad_norm: f64,
    /// Whether the update was applied (every recorded value finite, as the device decided).
    pub applied: bool,
    /// The largest label the full-resolution output saw.
    pub max_label: usize,
    /// Wall time of forward + loss and of backward, when the net times its phases (the step
    /// then synchronises at each end); zero otherwise.
    pub forward_secs: f64,
    pub backward_secs: f64,
}

pub struct Ledger<B: Backend> {
    arena: B::Arena,
    /// Values per record: the squared gradient norm, then LOSS_RECORD per output.
    width: usize,
    /// Records written since the last read, with each one's phase times.
    queued: Vec<(f64, f64)>,
}

impl<B: Backend> Ledger<B> {
    pub fn new(be: &B, outputs: usize) -> Result<Ledger<B>> {
        let width = 1 + LOSS_RECORD * outputs;
        // Zeroed: outputs without a loss (no label slot planned) keep zeros, finite.
        let arena = be.alloc(width * CAPACITY)?;
        Ok(Ledger { arena, width, queued: Vec::with_capacity(CAPACITY) })
    }
    pub fn is_full(&self) -> bool {
        self.queued.len() == CAPACITY
    }
    /// The whole record the next step writes: the update's guard.
    pub fn next(&self, be: &B) -> B::Buf {
        be.view(&self.arena, self.queued.len() * self.width, self.width)
    }
    /// Where the next step's squared gradient norm goes.
    pub fn next_norm(&self, be: &B) -> B::Buf {
        be.view(&self.arena, self.queued.len() * self.width, 1)
    }
    /// Where the next step's loss parts of output `s` go.
    pub fn next_loss(&self, be: &B, s: usize) -> B::Buf {
        be.view(&self.arena, self.queued.len() * self.width + 1 + LOSS_RECORD * s, LOSS_RECORD)
    }
    /// The next record counts as written.
    pub fn push(&mut self, times: (f64, f64)) {
        assert!(!self.is_full(), "the ledger is read before a step when full");
        self.queued.push(times);
    }
    /// Reads the next record without counting it (a gradient computed alone).
    pub fn peek(&self, be: &B, weights: &[f64], times: (f64, f64)) -> Result<StepLoss> {
        let v = be.download_exact(self.next(be), self.width)?;
        Ok(self.decode(&v, weights, times))
    }
    /// Every record written since the last read, in order (one copy, one wait).
    pub fn read(&mut self, be: &B, weights: &[f64]) -> Result<Vec<StepLoss>> {
        if self.queued.is_empty() {
            return Ok(Vec::new());
        }
        let len = self.queued.len() * self.width;
        let v = be.download_exact(be.view(&self.arena, 0, len), len)?;
        let out = v.chunks_exact(self.width).zip(&self.queued).map(|(r, &t)| self.decode(r, weights, t)).collect();
        self.queued.clear();
        Ok(out)
    }
    fn decode(&self, r: &[f64], weights: &[f64], (forward_secs, backward_secs): (f64, f64)) -> StepLoss {
        let part = |s: usize| LossParts { ce: r[1 + LOSS_RECORD * s], dice: r[2 + LOSS_RECORD * s] };
        let total = weights.iter().enumerate().map(|(s, w)| w * part(s).total()).sum();
        StepLoss { total, top: part(0), grad_norm: r[0].sqrt(), applied: step_applies(r), max_label: r[3] as usize, forward_secs, backward_secs }
    }
}

/// The error for a step that saw a label the net has no output for (the ignore label, value
/// `classes`, aside).
pub fn check_labels(s: &StepLoss, classes: usize, ignore_label: bool, cases: &dyn std::fmt::Display) -> Result<()> {
    if s.max_label >= classes + ignore_label as usize {
        let ignore = if ignore_label { format!(" and ignore label {classes}") } else { String::new() };
        bail!("label {} found in {cases} but the network has {classes} classes{ignore}", s.max_label);
    }
    Ok(())
}
