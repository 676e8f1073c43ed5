//! Prediction of arrays in memory with a model loaded once: what `import segk` calls. A thread
//! of its own holds the backend and the nets (a GPU context stays on one thread) and answers
//! one request at a time; each case goes through the same preprocessing, sliding window and
//! export as `segk predict`, without files.

use super::{export, probs, window, Model};
use crate::backend::Backend;
use crate::preprocess::Settings;
use crate::store::ImageDtype;
use anyhow::{anyhow, ensure, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::path::{Path, PathBuf};

/// How a session predicts, as `segk predict`'s flags.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Folds to average (None: every fold_* folder, as the command).
    pub folds: Option<Vec<String>>,
    pub checkpoint: String,
    /// auto, cpu, cuda, cuda:N or emu.
    pub device: String,
    pub step: f64,
    pub tta: bool,
    /// Compute threads (None: the thread policy's count).
    pub threads: Option<usize>,
    /// What the convolutions multiply (auto: bf16 where the CPU has it, as `segk predict`).
    pub precision: crate::device::Precision,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { folds: None, checkpoint: "checkpoint_final".into(), device: "auto".into(), step: 0.5, tta: true, threads: None, precision: crate::device::Precision::Auto }
    }
}

/// One case: its channels on a grid of `shape` ([z, y, x], as nnU-Net's readers return arrays)
/// and that grid's spacing ([z, y, x], nnU-Net's props['spacing']).
pub struct Request {
    pub channels: Vec<Vec<f32>>,
    pub shape: [usize; 3],
    pub spacing: [f64; 3],
    pub probabilities: bool,
}

/// The label map on the request's grid, and the class (or region) probabilities when asked:
/// outputs x z x y x, as nnU-Net's `probabilities` array.
pub struct Prediction {
    pub labels: Vec<i16>,
    pub probabilities: Option<Vec<f32>>,
}

type Ask = (Request, Sender<Result<Prediction>>);

/// A model loaded on a device, serving predictions until dropped.
pub struct Session {
    tx: Option<Sender<Ask>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// What was loaded, on what: for the caller to show.
    pub description: String,
    /// Input channels the model takes.
    pub channels: usize,
    /// The net's outputs (classes or regions): the probabilities' first axis.
    pub outputs: usize,
    /// Every label value the labels may hold.
    pub label_values: Vec<i16>,
}

impl Session {
    /// Loads the model folder `dir` (segk's or nnU-Net's, as `segk predict -m`) on the device
    /// and returns once the weights are in place (or with why they are not).
    pub fn open(dir: &Path, o: SessionOptions) -> Result<Session> {
        ensure!(o.step > 0.0 && o.step <= 1.0, "step must be in (0, 1], got {}", o.step);
        let model = Model::open(dir, o.folds.as_deref(), &o.checkpoint)?;
        ensure!(model.prev_stage_labels().is_empty(), "{}: a cascade stage needs the previous stage's label maps; predict it with `segk predict --prev-stage-predictions`", dir.display());
        let head = model.head()?;
        let (channels, outputs, label_values) = (model.json.channels(), head.outputs(), head.values());
        // The thread policy's count (threads=, SEGK_THREADS, OMP_NUM_THREADS, the usable CPUs):
        // a Python process never ran segk's start-up.
        let threads = crate::threads::compute(o.threads, &crate::threads::Cpus::detect(), &crate::threads::process_env)?.n;
        let (tx, rx) = bounded::<Ask>(0);
        let (ready_tx, ready_rx) = bounded::<Result<String>>(1);
        let thread = std::thread::Builder::new().name("segk-session".into()).spawn(move || {
            let pool = match crate::threads::compute_pool(threads) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let (device, precision) = (o.device.clone(), o.precision);
            let failed = ready_tx.clone();
            // The serving loop runs on a thread of the compute pool, which the loop's own
            // parallel work then shares with the pool's other threads.
            let r = pool.install(|| crate::device::run_on(&device, precision, Serve { model, head, opt: o, requests: rx, ready: ready_tx }));
            if let Err(e) = r {
                let _ = failed.send(Err(e));
            }
        })?;
        let description = ready_rx.recv().map_err(|_| anyhow!("the prediction thread stopped while loading {}", dir.display()))??;
        Ok(Session { tx: Some(tx), thread: Some(thread), description, channels, outputs, label_values })
    }

    /// Predicts one case.
    pub fn predict(&self, r: Request) -> Result<Prediction> {
        ensure!(r.channels.len() == self.channels, "the model takes {} channel(s), the image has {}", self.channels, r.channels.len());
        let voxels: usize = r.shape.iter().product();
        ensure!(voxels > 0, "the image is empty (shape {:?})", r.shape);
        ensure!(r.channels.iter().all(|c| c.len() == voxels), "every channel must hold {voxels} values for shape {:?}", r.shape);
        ensure!(r.spacing.iter().all(|&s| s.is_finite() && s > 0.0), "spacing must be positive and finite, got {:?}", r.spacing);
        let (back_tx, back_rx) = bounded(1);
        let tx = self.tx.as_ref().ok_or_else(|| anyhow!("the session is closed"))?;
        tx.send((r, back_tx)).map_err(|_| anyhow!("the prediction thread has stopped"))?;
        back_rx.recv().map_err(|_| anyhow!("the prediction thread stopped during the prediction"))?
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Serve {
    model: Model,
    head: export::Head,
    opt: SessionOptions,
    requests: Receiver<Ask>,
    ready: Sender<Result<String>>,
}

impl crate::device::Job for Serve {
    type Out = ();
    fn bf16_on_cpu_by_default(&self) -> bool {
        true
    }
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let Serve { model, head, opt, requests, ready } = self;
        let plan = &model.plan;
        let settings = Settings::new(&model.json, &model.plans, &model.configuration, ImageDtype::F32)?;
        let (nets, acts, mirror_axes) = model.load(be, opt.tta)?;
        let predictor = window::Predictor { be, nets: &nets, acts: &acts, patch: plan.patch_size, classes: head.outputs(), step: opt.step, mirror_axes: &mirror_axes };
        let folds: Vec<String> = model.checkpoints.iter().filter_map(|(d, _)| d.file_name().map(|n| n.to_string_lossy().to_string())).collect();
        let _ = ready.send(Ok(format!("{} ({}), {} on {}", model.configuration, folds.join(", "), opt.checkpoint, be.name())));
        for (request, answer) in requests {
            let _ = answer.send(predict_one(&predictor, &settings, &head, request));
        }
        Ok(())
    }
}

fn predict_one<B: Backend>(predictor: &window::Predictor<B>, settings: &Settings, head: &export::Head, r: Request) -> Result<Prediction> {
    if let Some((c, bad)) = r.channels.iter().enumerate().find_map(|(c, v)| v.iter().find(|x| !x.is_finite()).map(|x| (c, *x))) {
        anyhow::bail!("channel {c} contains a non-finite value ({bad})");
    }
    let (channels, geometry) = crate::preprocess::preprocess_arrays(r.channels, r.shape, r.spacing, settings)?;
    let probs = match r.probabilities {
        true => Some(probs::ProbFile::create(&scratch_file(), head.outputs(), geometry.original_shape, matches!(head, export::Head::Regions(_)))?),
        false => None,
    };
    let mut exporter = export::Exporter::new(&geometry, head.clone(), probs);
    predictor.run(&channels, geometry.shape, &mut exporter)?;
    drop(channels);
    let probabilities = exporter.probs.take().map(|p| p.into_vec()).transpose()?;
    Ok(Prediction { labels: std::mem::take(&mut exporter.labels), probabilities })
}

/// A temporary file for the probabilities (they are mapped from disk while the window runs,
/// as in `segk predict`, and read into memory at the end).
fn scratch_file() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(".segk-probabilities-{}-{}.npy.tmp", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// The path an error names for an array (there is no file).
pub fn array_name() -> PathBuf {
    PathBuf::from("the image array")
}
