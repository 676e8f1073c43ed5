//! `segk bench loader`: batches per second of the augmentation pool at several worker counts,
//! feeding a consumer that does nothing, on a generated store. With `--step-ms` (a step time
//! from `segk bench step`) it says whether each worker count keeps up with the GPU.

use crate::bench_step::parse_triple;
use crate::dataset::Dataset;
use crate::loader::pool::Pool;
use crate::loader::{Augment, Augmenter, BatchSpec};
use crate::plan::fingerprint::fingerprint;

use crate::preprocess::Settings;
use crate::store::ImageDtype;
use crate::synth::{write_raw_dataset, RawSpec};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct LoaderArgs {
    /// Worker counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub workers: Vec<usize>,
    #[arg(long, default_value = "128,128,128", value_parser = parse_triple)]
    pub patch: [usize; 3],
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Generated cases and their shape (D,H,W, spacing 1 x 0.8 x 0.8 mm).
    #[arg(long, default_value_t = 3)]
    pub cases: usize,
    #[arg(long, default_value = "160,256,256", value_parser = parse_triple)]
    pub shape: [usize; 3],
    /// Seconds of batches per worker count (after one batch per worker to warm up).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// A training step's time in ms (e.g. `segk bench step` on the GPU): say whether each
    /// worker count delivers a batch at least that often.
    #[arg(long)]
    pub step_ms: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug, Clone)]
pub struct LoaderRow {
    pub workers: usize,
    pub batches: u64,
    pub seconds: f64,
    pub batches_per_s: f64,
    pub samples_per_s: f64,
    pub samples_per_s_per_worker: f64,
    /// With `--step-ms`: a batch arrives at least once per step.
    pub keeps_up_with_step: Option<bool>,
}

/// A preprocessed store of `cases` generated cases under `base`; returns (store, case ids).
pub fn synthetic_store(base: &Path, cases: usize, shape: [usize; 3]) -> Result<(PathBuf, Vec<String>)> {
    let root = base.join("Dataset902_Loader");
    write_raw_dataset(&root, &RawSpec { cases, shape, spacing: [1.0, 0.8, 0.8], seed: 9 })?;
    let ds = Dataset::open(&root)?;
    let fp = fingerprint(&ds, 1_000_000)?;
    let plans = crate::plan::plans::nnunet_default("bench", &ds.json, &fp)?;
    let settings = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32)?;
    let store = base.join(crate::plan::plans::store_dir(&plans, "3d_fullres")?);
    let threads = crate::threads::Cpus::detect().usable().max(1);
    crate::preprocess::run(&ds, &settings, &store, threads, &indicatif::ProgressBar::hidden())?;
    Ok((store, ds.cases.iter().map(|c| c.id.clone()).collect()))
}

/// Batches the pool delivers per second with `workers` threads, to a consumer that hands
/// each slot straight back.
pub fn measure(store: &Path, ids: &[String], spec: &BatchSpec, workers: usize, seconds: f64) -> Result<LoaderRow> {
    let aug = Augmenter::new(store, ids, spec.clone())?;
    let slots = 2 * workers + 2;
    let mut pool = Pool::start(Arc::new(aug), workers, slots, spec.slot_shape(), 0)?;
    // The ring fills while the pool starts: take those batches before the clock starts, or a
    // short run counts them as made in no time.
    for _ in 0..slots {
        let b = pool.next_batch()?;
        pool.give_back(b);
    }
    let t0 = Instant::now();
    let mut batches = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(seconds) || batches == 0 {
        let b = pool.next_batch()?;
        pool.give_back(b);
        batches += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let per_s = batches as f64 / secs;
    let samples = per_s * spec.batch as f64;
    Ok(LoaderRow { workers, batches, seconds: secs, batches_per_s: per_s, samples_per_s: samples, samples_per_s_per_worker: samples / workers as f64, keeps_up_with_step: None })
}

pub fn run(a: &LoaderArgs) -> Result<Vec<LoaderRow>> {
    let base = std::env::temp_dir().join(format!("segk-bench-loader-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    anyhow::ensure!(a.seconds >= 0.1 && a.seconds.is_finite(), "--seconds must be at least 0.1 (got {})", a.seconds);
    anyhow::ensure!(a.cases >= 1, "--cases must be at least 1");
    let result = (|| {
        if !a.json {
            println!("segk bench loader: patch {:?}, batch {}, full nnU-Net augmentation, {} generated cases of {:?} ({} CPUs usable)", a.patch, a.batch, a.cases, a.shape, crate::threads::Cpus::detect().usable());
        }
        let (store, ids) = synthetic_store(&base, a.cases, a.shape)?;
        let spec = BatchSpec { batch: a.batch, patch: a.patch, channels: 1, use_mask: vec![false], seed: 1, augment: Augment::default(), prev_stage: None, shard: Default::default() };
        let mut rows = Vec::new();
        for &w in &a.workers {
            anyhow::ensure!(w > 0, "--workers: counts must be at least 1");
            let mut r = measure(&store, &ids, &spec, w, a.seconds)?;
            r.keeps_up_with_step = a.step_ms.map(|ms| 1000.0 / r.batches_per_s <= ms);
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let verdict = match (a.step_ms, r.keeps_up_with_step) {
                    (Some(ms), Some(true)) => format!("  keeps up with a {ms:.1} ms step ({:.1}x margin)", ms * r.batches_per_s / 1000.0),
                    (Some(ms), Some(false)) => format!("  too slow for a {ms:.1} ms step (the GPU would wait {:.0} %)", 100.0 * (1.0 - ms * r.batches_per_s / 1000.0)),
                    _ => String::new(),
                };
                println!("  {:>3} workers  {:>7.1} batches/s  {:>7.1} samples/s  {:>6.1} samples/s/worker  (a batch every {:.1} ms){verdict}", w, r.batches_per_s, r.samples_per_s, r.samples_per_s_per_worker, 1000.0 / r.batches_per_s);
            }
            rows.push(r);
        }
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&base);
    result
}
