//! `segk demo`: generate synthetic cases, train a small PlainConvUNet on the CPU, predict the
//! held-out cases and report Dice per label.

use crate::backend::cpu::CpuBackend;
use crate::backend::poly_lr;
use crate::backend::Backend;
use crate::model::unet::Acts;
use crate::model::{Checkpointing, Topology, UNet};
use crate::synth::{self, Case};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub train_cases: usize,
    pub test_cases: usize,
    pub size: [usize; 3],
    pub patch: [usize; 3],
    pub batch: usize,
    pub features: Vec<usize>,
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub lr: f64,
    pub seed: u64,
    pub progress: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            train_cases: 16,
            test_cases: 4,
            size: [48, 48, 48],
            patch: [32, 32, 32],
            batch: 2,
            features: vec![8, 16, 32],
            epochs: 12,
            iters_per_epoch: 50,
            lr: 1e-2,
            seed: 42,
            progress: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Mean Dice over held-out cases per foreground label.
    pub dice: Vec<f64>,
    pub mean_dice: f64,
    /// Mean loss of the first and the last epoch.
    pub first_epoch_loss: f64,
    pub last_epoch_loss: f64,
    pub train_secs: f64,
    pub steps: usize,
}

/// Random patches with nnU-Net's foreground oversampling (the last third of a batch is
/// centred on a voxel of a random present class) and random mirroring.
struct Sampler {
    cases: Vec<Case>,
    /// Voxel indices per case per foreground class.
    fg: Vec<Vec<Vec<usize>>>,
    rng: Pcg64,
}

impl Sampler {
    fn new(cases: Vec<Case>, classes: usize, seed: u64) -> Sampler {
        let fg = cases
            .iter()
            .map(|c| (1..classes as u8).map(|l| c.labels.iter().enumerate().filter(|(_, &v)| v == l).map(|(i, _)| i).collect()).collect())
            .collect();
        Sampler { cases, fg, rng: Pcg64::seed_from_u64(seed) }
    }

    fn fill(&mut self, patch: [usize; 3], image: &mut [f32], labels: &mut [u8]) {
        let pv: usize = patch.iter().product();
        let n = labels.len() / pv;
        let forced = (n as f64 * 0.33).round() as usize;
        for b in 0..n {
            let ci = self.rng.random_range(0..self.cases.len());
            let s = self.cases[ci].shape;
            let present: Vec<&Vec<usize>> = self.fg[ci].iter().filter(|v| !v.is_empty()).collect();
            let origin: [usize; 3] = if b >= n - forced && !present.is_empty() {
                let list = present[self.rng.random_range(0..present.len())];
                let v = list[self.rng.random_range(0..list.len())];
                let at = [v / (s[1] * s[2]), (v / s[2]) % s[1], v % s[2]];
                std::array::from_fn(|a| at[a].saturating_sub(patch[a] / 2).min(s[a] - patch[a]))
            } else {
                std::array::from_fn(|a| self.rng.random_range(0..=s[a] - patch[a]))
            };
            let flip: [bool; 3] = std::array::from_fn(|_| self.rng.random_bool(0.5));
            let c = &self.cases[ci];
            for z in 0..patch[0] {
                for y in 0..patch[1] {
                    for x in 0..patch[2] {
                        let q = [z, y, x];
                        let src: [usize; 3] = std::array::from_fn(|a| origin[a] + if flip[a] { patch[a] - 1 - q[a] } else { q[a] });
                        let si = (src[0] * s[1] + src[1]) * s[2] + src[2];
                        let di = b * pv + (z * patch[1] + y) * patch[2] + x;
                        image[di] = c.image[si];
                        labels[di] = c.labels[si];
                    }
                }
            }
        }
    }
}

pub fn topology(cfg: &DemoConfig) -> Topology {
    Topology::isotropic(1, synth::LABEL_NAMES.len(), cfg.features.clone())
}

fn bar(len: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}").expect("valid template").progress_chars("=> "));
    b
}

/// The demo on the CPU.
pub fn run(cfg: &DemoConfig) -> Result<DemoReport> {
    run_on(&CpuBackend::<f32>::new(), cfg)
}

pub fn run_on<B: Backend>(be: &B, cfg: &DemoConfig) -> Result<DemoReport> {
    let topo = topology(cfg);
    let classes = topo.n_classes;
    let gen = bar((cfg.train_cases + cfg.test_cases) as u64, cfg.progress);
    gen.set_prefix("data");
    let mut cases: Vec<Case> = Vec::new();
    for i in 0..cfg.train_cases + cfg.test_cases {
        cases.push(synth::case(cfg.seed, i as u64, cfg.size));
        gen.inc(1);
    }
    gen.finish();
    let test: Vec<Case> = cases.split_off(cfg.train_cases);
    let mut sampler = Sampler::new(cases, classes, cfg.seed.wrapping_add(1));

    let mut net = UNet::new(be, topo.clone(), cfg.seed)?;
    let acts = Acts::new(be, &topo, cfg.patch, cfg.batch, Checkpointing::None, true)?;
    let pv: usize = cfg.patch.iter().product();
    let (mut image, mut labels) = (vec![0.0f32; cfg.batch * pv], vec![0u8; cfg.batch * pv]);
    let steps = cfg.epochs * cfg.iters_per_epoch;
    let pb = bar(steps as u64, cfg.progress);
    pb.set_prefix("train");
    let t0 = Instant::now();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for epoch in 0..cfg.epochs {
        let lr = poly_lr(cfg.lr, epoch, cfg.epochs);
        let mut sum = 0.0;
        for _ in 0..cfg.iters_per_epoch {
            sampler.fill(cfg.patch, &mut image, &mut labels);
            let (loss, applied) = net.train_step(be, &acts, &image, &labels, lr)?;
            anyhow::ensure!(applied, "non-finite loss or gradient at epoch {epoch} (loss {})", loss.total);
            sum += loss.total;
            pb.inc(1);
        }
        let mean = sum / cfg.iters_per_epoch as f64;
        if epoch == 0 {
            first = mean;
        }
        last = mean;
        pb.set_message(format!("epoch {epoch} loss {mean:.4} lr {lr:.5}"));
    }
    pb.finish();
    let train_secs = t0.elapsed().as_secs_f64();

    let dice = evaluate(be, &net, &test, classes)?;
    let mean_dice = dice.iter().sum::<f64>() / dice.len() as f64;
    Ok(DemoReport { dice, mean_dice, first_epoch_loss: first, last_epoch_loss: last, train_secs, steps })
}

/// Whole-volume prediction of each case; Dice per label averaged over the cases that
/// contain the label or predict it.
pub fn evaluate<B: Backend>(be: &B, net: &UNet<B>, cases: &[Case], classes: usize) -> Result<Vec<f64>> {
    let mut sums = vec![(0.0, 0usize); classes - 1];
    for c in cases {
        let acts = Acts::new(be, &net.topo, c.shape, 1, Checkpointing::Level1, false)?;
        let lg = net.forward_logits(be, &acts, &c.image)?;
        let out = be.alloc_labels(c.voxels())?;
        be.argmax(be.view(&acts.arena, lg.offset, lg.len()), lg.dims, be.label_view(&out, 0, c.voxels()))?;
        let mut pred = vec![0u8; c.voxels()];
        be.download_labels(be.label_view(&out, 0, c.voxels()), &mut pred)?;
        for (k, d) in synth::dice_per_label(&pred, &c.labels, classes).into_iter().enumerate() {
            if d.is_finite() {
                sums[k].0 += d;
                sums[k].1 += 1;
            }
        }
    }
    Ok(sums.iter().map(|(s, n)| if *n > 0 { s / *n as f64 } else { f64::NAN }).collect())
}
