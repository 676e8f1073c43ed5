//! `segk demo`: generate synthetic cases, train a small PlainConvUNet on the CPU, predict the
//! held-out cases and report Dice per label.

use crate::backend::cpu::CpuBackend;
use crate::backend::poly_lr;
use crate::loader::pool::{Batch, Fill, FillError, Pool, SlotShape};
use crate::backend::Backend;
use crate::feed::Feed;
use crate::model::unet::{Acts, Input};
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
    /// Sparse annotation: the training cases keep their labels on one slab of 4 slices in
    /// three, the rest is nnU-Net's ignore label (held-out cases stay fully labelled).
    pub sparse: bool,
    /// A region net (nnU-Net's BraTS-style training): nested regions "any object" [1, 2, 3],
    /// "blob or box" [1, 2] and "box" [2], a sigmoid output each.
    pub regions: bool,
    /// Residual blocks per encoder stage: nnU-Net's ResidualEncoderUNet (the ResEnc presets'
    /// encoder) in place of the PlainConvUNet; empty for the plain net.
    pub blocks_per_stage: Vec<usize>,
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
            sparse: false,
            regions: false,
            blocks_per_stage: Vec::new(),
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
    /// Share of the training time spent waiting for batches.
    pub data_wait: f64,
}

/// Random patches of the in-memory synthetic cases with nnU-Net's foreground oversampling
/// (the last third of a batch is centred on a voxel of a random present class) and random
/// mirroring; filled by the loader's worker pool like real training batches.
struct Sampler {
    cases: Vec<Case>,
    /// Voxel indices per case per foreground class.
    fg: Vec<Vec<Vec<usize>>>,
    patch: [usize; 3],
    seed: u64,
}

impl Sampler {
    fn new(cases: Vec<Case>, classes: usize, patch: [usize; 3], seed: u64) -> Sampler {
        let fg = cases
            .iter()
            .map(|c| (1..classes as u8).map(|l| c.labels.iter().enumerate().filter(|(_, &v)| v == l).map(|(i, _)| i).collect()).collect())
            .collect();
        Sampler { cases, fg, patch, seed }
    }
}

impl Fill for Sampler {
    type Worker = ();
    fn worker(&self) {}
    fn fill(&self, _: &mut (), index: u64, batch: &mut Batch) -> std::result::Result<(), FillError> {
        let patch = self.patch;
        let mut rng = Pcg64::seed_from_u64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let pv: usize = patch.iter().product();
        let n = batch.labels.len() / pv;
        let forced = (n as f64 * 0.33).round() as usize;
        for b in 0..n {
            let ci = rng.random_range(0..self.cases.len());
            let s = self.cases[ci].shape;
            let present: Vec<&Vec<usize>> = self.fg[ci].iter().filter(|v| !v.is_empty()).collect();
            let origin: [usize; 3] = if b >= n - forced && !present.is_empty() {
                let list = present[rng.random_range(0..present.len())];
                let v = list[rng.random_range(0..list.len())];
                let at = [v / (s[1] * s[2]), (v / s[2]) % s[1], v % s[2]];
                std::array::from_fn(|a| at[a].saturating_sub(patch[a] / 2).min(s[a] - patch[a]))
            } else {
                std::array::from_fn(|a| rng.random_range(0..=s[a] - patch[a]))
            };
            let flip: [bool; 3] = std::array::from_fn(|_| rng.random_bool(0.5));
            let c = &self.cases[ci];
            batch.cases[b] = ci;
            for z in 0..patch[0] {
                for y in 0..patch[1] {
                    for x in 0..patch[2] {
                        let q = [z, y, x];
                        let src: [usize; 3] = std::array::from_fn(|a| origin[a] + if flip[a] { patch[a] - 1 - q[a] } else { q[a] });
                        let si = (src[0] * s[1] + src[1]) * s[2] + src[2];
                        let di = b * pv + (z * patch[1] + y) * patch[2] + x;
                        batch.image[di] = c.image[si];
                        batch.labels[di] = c.labels[si];
                    }
                }
            }
        }
        Ok(())
    }
    fn whereabouts(&self, _: &()) -> (String, &'static str) {
        ("a synthetic case".into(), "patch sampling")
    }
}

pub fn topology(cfg: &DemoConfig) -> Topology {
    let mut t = Topology::isotropic(1, synth::LABEL_NAMES.len(), cfg.features.clone());
    t.ignore_label = cfg.sparse;
    if !cfg.blocks_per_stage.is_empty() {
        t = t.residual(cfg.blocks_per_stage.clone());
    }
    if cfg.regions {
        t.regions = vec![vec![1, 2, 3], vec![1, 2], vec![2]];
        t.n_classes = t.regions.len();
    }
    t
}

/// Two slabs of 4 slices in three become the ignore label (`ignore`).
fn sparsify(case: &mut Case, ignore: usize) {
    let plane = case.shape[1] * case.shape[2];
    for (i, l) in case.labels.iter_mut().enumerate() {
        if (i / plane / 4) % 3 != 0 {
            *l = ignore as u8;
        }
    }
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
    let gen = bar((cfg.train_cases + cfg.test_cases) as u64, cfg.progress);
    gen.set_prefix("data");
    let mut cases: Vec<Case> = Vec::new();
    for i in 0..cfg.train_cases + cfg.test_cases {
        cases.push(synth::case(cfg.seed, i as u64, cfg.size));
        gen.inc(1);
    }
    gen.finish();
    let test: Vec<Case> = cases.split_off(cfg.train_cases);
    if cfg.sparse {
        cases.iter_mut().for_each(|c| sparsify(c, topo.label_limit()));
    }
    let sampler = std::sync::Arc::new(Sampler::new(cases, topo.label_limit(), cfg.patch, cfg.seed.wrapping_add(1)));

    let mut net = UNet::new(be, topo.clone(), cfg.seed)?;
    let acts = Acts::new(be, &topo, cfg.patch, cfg.batch, Checkpointing::None, true)?;
    let pv: usize = cfg.patch.iter().product();
    let shape = SlotShape { image: cfg.batch * pv, labels: cfg.batch * pv, batch: cfg.batch };
    let mut pool = Pool::start_in(sampler, 1, 4, shape, 0, &*be.host_memory())?;
    let mut feed = Feed::new(be, shape.image, shape.labels)?;
    let (input_image, input_labels) = (acts.input_image(be), acts.input_labels(be)?);
    let steps = cfg.epochs * cfg.iters_per_epoch;
    let pb = bar(steps as u64, cfg.progress);
    pb.set_prefix("train");
    let t0 = Instant::now();
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let (mut data_wait, mut step_time) = (0.0, 0.0);
    for epoch in 0..cfg.epochs {
        let lr = poly_lr(cfg.lr, epoch, cfg.epochs);
        let mut sum = 0.0;
        let te = Instant::now();
        for _ in 0..cfg.iters_per_epoch {
            let b = feed.next(&mut pool, input_image, input_labels)?;
            net.step(be, &acts, Input::Resident, lr)?;
            pool.give_back(b);
            pb.inc(1);
        }
        // The epoch's numbers, read once (the steps did not wait for the device).
        for loss in net.take_steps(be)? {
            anyhow::ensure!(loss.applied, "non-finite loss or gradient at epoch {epoch} (loss {})", loss.total);
            sum += loss.total;
        }
        data_wait += pool.take_stats().wait.as_secs_f64();
        step_time += te.elapsed().as_secs_f64();
        let mean = sum / cfg.iters_per_epoch as f64;
        if epoch == 0 {
            first = mean;
        }
        last = mean;
        pb.set_message(format!("epoch {epoch} loss {mean:.4} lr {lr:.5}"));
    }
    pb.finish();
    let train_secs = t0.elapsed().as_secs_f64();

    let dice = evaluate(be, &net, &test)?;
    let mean_dice = dice.iter().sum::<f64>() / dice.len() as f64;
    Ok(DemoReport { dice, mean_dice, first_epoch_loss: first, last_epoch_loss: last, train_secs, steps, data_wait: data_wait / step_time.max(1e-9) })
}

/// Whole-volume prediction of each case; Dice per foreground label (per region for a region
/// net: logit above 0, sigmoid above 0.5) averaged over the cases that contain it or predict
/// it.
pub fn evaluate<B: Backend>(be: &B, net: &UNet<B>, cases: &[Case]) -> Result<Vec<f64>> {
    let (classes, regions) = (net.topo.n_classes, &net.topo.regions);
    let mut sums = vec![(0.0, 0usize); if regions.is_empty() { classes - 1 } else { regions.len() }];
    for c in cases {
        let acts = Acts::new(be, &net.topo, c.shape, 1, Checkpointing::Level1, false)?;
        let lg = net.forward_logits(be, &acts, &c.image)?;
        let dice = if regions.is_empty() {
            let out = be.alloc_labels(c.voxels())?;
            be.argmax(be.view(&acts.arena, lg.offset, lg.len()), lg.dims, be.label_view(&out, 0, c.voxels()))?;
            let mut pred = vec![0u8; c.voxels()];
            be.download_labels(be.label_view(&out, 0, c.voxels()), &mut pred)?;
            synth::dice_per_label(&pred, &c.labels, classes)
        } else {
            let mut logits = vec![0f32; lg.len()];
            be.download(be.view(&acts.arena, lg.offset, lg.len()), &mut logits)?;
            (0..regions.len())
                .map(|k| {
                    let inside = |l: u8| regions[k].contains(&(l as i64)) as u8;
                    let pred: Vec<u8> = logits.chunks_exact(classes).map(|z| (z[k] > 0.0) as u8).collect();
                    let truth: Vec<u8> = c.labels.iter().map(|&l| inside(l)).collect();
                    synth::dice_per_label(&pred, &truth, 2)[0]
                })
                .collect()
        };
        for (k, d) in dice.into_iter().enumerate() {
            if d.is_finite() {
                sums[k].0 += d;
                sums[k].1 += 1;
            }
        }
    }
    Ok(sums.iter().map(|(s, n)| if *n > 0 { s / *n as f64 } else { f64::NAN }).collect())
}

struct Demo(DemoConfig);

impl crate::device::Job for Demo {
    type Out = DemoReport;
    fn run<B: crate::backend::Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        run_on(be, &self.0)
    }
}

/// `segk demo`: trains on generated cases on `device` and prints the held-out Dice per label.
pub fn command(epochs: usize, iters: usize, seed: u64, device: &str) -> Result<()> {
    let cfg = DemoConfig { epochs, iters_per_epoch: iters, seed, ..DemoConfig::default() };
    println!(
        "segk demo: {} training + {} held-out synthetic cases of {:?}, patch {:?}, batch {}, features {:?}, {} threads",
        cfg.train_cases, cfg.test_cases, cfg.size, cfg.patch, cfg.batch, cfg.features, rayon::current_num_threads()
    );
    let t0 = std::time::Instant::now();
    let r = crate::device::run_on(device, crate::device::Precision::Auto, Demo(cfg))?;
    println!("trained {} steps in {:.1} s (waiting for data {:.1} % of it); mean loss first epoch {:.4}, last epoch {:.4}", r.steps, r.train_secs, r.data_wait * 100.0, r.first_epoch_loss, r.last_epoch_loss);
    println!("held-out Dice per label:");
    for (k, d) in r.dice.iter().enumerate() {
        println!("  {:>2} {:<10} {:.4}", k + 1, crate::synth::LABEL_NAMES[k + 1], d);
    }
    println!("mean foreground Dice {:.4}  (total {:.1} s)", r.mean_dice, t0.elapsed().as_secs_f64());
    Ok(())
}
