//! `segk train`: nnU-Net v2's training schedule on a preprocessed store, fed by the loader's
//! worker pool. Per epoch: training iterations with augmentation, validation iterations on
//! the held-out fold without it, global pseudo-Dice per foreground class and its EMA, and the
//! share of step time spent waiting for data.

use crate::backend::{poly_lr, Backend};
use crate::loader::{self, Augment, BatchSpec};
use crate::model::unet::Acts;
use crate::model::{Checkpointing, UNet};
use crate::plan::plans::Plan;
use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The store folder (`.../3d_fullres`).
    pub store: PathBuf,
    pub plan: Plan,
    pub train_ids: Vec<String>,
    pub val_ids: Vec<String>,
    /// Where the log goes.
    pub out: PathBuf,
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub val_iters: usize,
    pub checkpointing: Checkpointing,
    pub workers: Option<usize>,
    pub seed: u64,
    pub lr: f64,
}

/// nnU-Net's schedule.
pub const EPOCHS: usize = 1000;
pub const ITERS_PER_EPOCH: usize = 250;
pub const VAL_ITERS: usize = 50;
pub const INITIAL_LR: f64 = 1e-2;
pub const EMA: f64 = 0.9;
/// Non-finite steps in a row before training stops.
pub const MAX_BAD_STEPS: usize = 5;

#[derive(Clone, Debug)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    /// Global pseudo-Dice per foreground class over the validation iterations.
    pub pseudo_dice: Vec<f64>,
    pub ema_dice: f64,
    pub lr: f64,
    pub seconds: f64,
    /// Share of the training iterations' wall time spent waiting for batches.
    pub data_wait: f64,
    /// Mean number of batches ready when the trainer asked for one.
    pub ready: f64,
    pub skipped_steps: usize,
}

impl EpochLog {
    pub fn line(&self) -> String {
        let dice: Vec<String> = self.pseudo_dice.iter().map(|d| format!("{d:.4}")).collect();
        format!(
            "epoch {:4}  train loss {:.4}  pseudo dice [{}]  ema {:.4}  lr {:.6}  {:.1} s  data wait {:.1} %  ready {:.1}",
            self.epoch,
            self.train_loss,
            dice.join(", "),
            self.ema_dice,
            self.lr,
            self.seconds,
            self.data_wait * 100.0,
            self.ready
        )
    }
}

/// True positives, false positives and false negatives per foreground class.
fn count(pred: &[u8], truth: &[u8], classes: usize, tp: &mut [u64], fp: &mut [u64], fn_: &mut [u64]) {
    for (&p, &t) in pred.iter().zip(truth) {
        if p == t {
            if p > 0 {
                tp[p as usize - 1] += 1;
            }
            continue;
        }
        if p > 0 && (p as usize) < classes {
            fp[p as usize - 1] += 1;
        }
        if t > 0 && (t as usize) < classes {
            fn_[t as usize - 1] += 1;
        }
    }
}

/// Trains and returns one log entry per epoch.
pub fn run_on<B: Backend>(be: &B, cfg: &TrainConfig) -> Result<Vec<EpochLog>> {
    let plan = &cfg.plan;
    let topo = plan.topology.clone();
    let classes = topo.n_classes;
    let channels = topo.in_channels;
    let spec = |augment, seed| BatchSpec { batch: plan.batch_size, patch: plan.patch_size, channels, use_mask: plan.use_mask_for_norm.clone(), seed, augment };
    let first = 0;
    let mut train = loader::Loader::start(&cfg.store, &cfg.train_ids, spec(Augment::default(), cfg.seed), cfg.workers, first)?;
    let mut val = loader::Loader::start(&cfg.store, &cfg.val_ids, spec(Augment::none(), cfg.seed ^ 0x5eed), Some(1), 0)?;
    println!(
        "loader: {} workers ({}), {} slots of {:.1} MiB; train {} cases, validation {} cases",
        train.pool.workers(),
        train.workers_source,
        train.pool.slots(),
        spec(Augment::none(), 0).slot_bytes() as f64 / (1 << 20) as f64,
        cfg.train_ids.len(),
        cfg.val_ids.len()
    );
    let mut net = UNet::new(be, topo.clone(), cfg.seed)?;
    let acts = Acts::new(be, &topo, plan.patch_size, plan.batch_size, cfg.checkpointing, true)?;
    let infer = Acts::new(be, &topo, plan.patch_size, plan.batch_size, Checkpointing::Level1, false)?;
    let rows = plan.batch_size * plan.patch_size.iter().product::<usize>();
    let pred_buf = be.alloc_labels(rows)?;
    let mut pred = vec![0u8; rows];
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let log_path = cfg.out.join("training_log.txt");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let mut ema = f64::NAN;
    let mut logs = Vec::with_capacity(cfg.epochs);
    let mut bad_in_a_row = 0;
    for epoch in 0..cfg.epochs {
        let t0 = Instant::now();
        let lr = poly_lr(cfg.lr, epoch, cfg.epochs);
        let (mut loss_sum, mut steps, mut skipped) = (0.0, 0usize, 0usize);
        train.pool.take_stats();
        for _ in 0..cfg.iters_per_epoch {
            let b = train.pool.next()?;
            let (loss, applied) = net.train_step(be, &acts, &b.image, &b.labels, lr)?;
            if applied {
                loss_sum += loss.total;
                steps += 1;
                bad_in_a_row = 0;
            } else {
                skipped += 1;
                bad_in_a_row += 1;
                let cases: Vec<&str> = b.cases.iter().map(|&c| train.ids[c].as_str()).collect();
                println!("  skipped a step at epoch {epoch}: non-finite loss or gradient (loss {}, cases {cases:?})", loss.total);
                ensure!(bad_in_a_row < MAX_BAD_STEPS, "{bad_in_a_row} steps in a row gave a non-finite loss or gradient at epoch {epoch} (last batch: cases {cases:?})");
            }
            train.pool.give_back(b);
        }
        let train_time = t0.elapsed();
        let stats = train.pool.take_stats();
        let (mut tp, mut fp, mut fn_) = (vec![0u64; classes - 1], vec![0u64; classes - 1], vec![0u64; classes - 1]);
        for _ in 0..cfg.val_iters {
            let b = val.pool.next()?;
            let lg = net.forward_logits(be, &infer, &b.image)?;
            be.argmax(be.view(&infer.arena, lg.offset, lg.len()), lg.dims, be.label_view(&pred_buf, 0, rows))?;
            be.download_labels(be.label_view(&pred_buf, 0, rows), &mut pred)?;
            count(&pred, &b.labels, classes, &mut tp, &mut fp, &mut fn_);
            val.pool.give_back(b);
        }
        let pseudo_dice: Vec<f64> = (0..classes - 1).map(|k| 2.0 * tp[k] as f64 / (2 * tp[k] + fp[k] + fn_[k]) as f64).collect();
        let valid: Vec<f64> = pseudo_dice.iter().copied().filter(|d| d.is_finite()).collect();
        let mean = if valid.is_empty() { f64::NAN } else { valid.iter().sum::<f64>() / valid.len() as f64 };
        ema = if ema.is_finite() { EMA * ema + (1.0 - EMA) * mean } else { mean };
        let e = EpochLog {
            epoch,
            train_loss: loss_sum / steps.max(1) as f64,
            pseudo_dice,
            ema_dice: ema,
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            data_wait: stats.wait.as_secs_f64() / train_time.max(Duration::from_nanos(1)).as_secs_f64(),
            ready: stats.mean_fill(),
            skipped_steps: skipped,
        };
        let line = e.line();
        println!("{line}");
        writeln!(log, "{line}").with_context(|| format!("writing {}", log_path.display()))?;
        if let Some(advice) = loader::data_wait_advice(e.data_wait, train.pool.workers()) {
            println!("  {advice}");
            writeln!(log, "  {advice}").with_context(|| format!("writing {}", log_path.display()))?;
        }
        logs.push(e);
    }
    Ok(logs)
}
