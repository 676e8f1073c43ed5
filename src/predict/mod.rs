//! `segk predict`: raw cases (any format segk reads) -> the model's preprocessing -> sliding-window inference
//! (folds and mirror TTA averaged) -> label maps on each input's own grid and header.
//! A model folder is what `segk train` writes, laid out as nnU-Net's: plans.json (the plans
//! file trained with, in nnU-Net's schema), dataset.json and fold_F/ folders with checkpoints.

pub mod export;
pub mod probs;
pub mod session;
pub mod window;

use crate::backend::Backend;
use crate::imageio::{self, VoxelType};
use crate::dataset::DatasetJson;
use crate::model::unet::Acts;
use crate::model::{Checkpointing, UNet};
use crate::plan::plans::Plan;
use crate::plan::plans_json::PlansJson;
use crate::preprocess::{preprocess_images, Settings};
use crate::store::ImageDtype;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

pub struct Model {
    pub plans: PlansJson,
    /// The configuration of `plans` the model was trained as.
    pub configuration: String,
    /// segk's view of that configuration.
    pub plan: Plan,
    pub json: DatasetJson,
    /// Each fold's folder and weights file, for the folds to average.
    pub checkpoints: Vec<(PathBuf, crate::checkpoint::WeightsFile)>,
    /// The axes mirror TTA flips: nnU-Net's for the net for segk's models, the checkpoint's
    /// `inference_allowed_mirroring_axes` for nnU-Net's (first fold's, as nnU-Net reads it).
    pub mirror_axes: Vec<usize>,
    /// nnU-Net's trainer class, for a model folder of nnU-Net's.
    pub trainer_name: Option<String>,
    /// A cascade stage: the folder of the previous stage's label maps of the cases to predict
    /// (nnU-Net's -prev_stage_predictions), set by the caller.
    pub prev_stage_predictions: Option<PathBuf>,
}

impl Model {
    /// Reads `dir` (plans.json, dataset.json) and finds `checkpoint` in each fold folder
    /// (`folds`: names like "0" or "all"; default every fold_* folder present). The
    /// configuration is the one the folder's name (TRAINER__PLANS__CONFIGURATION) gives, else
    /// 3d_fullres.
    pub fn open(dir: &Path, folds: Option<&[String]>, checkpoint: &str) -> Result<Model> {
        let path = dir.join(PLANS_FILE);
        ensure!(path.is_file(), "{}: not a model folder (no {PLANS_FILE}): -m takes the folder `segk train` writes, the one that holds fold_0, fold_1, ..", dir.display());
        let plans = crate::plan::plans::read_nnunet_plans(&path)?;
        let json = crate::dataset::read_json(dir)?;
        let present = names_in(dir, |n| n.strip_prefix("fold_"))?;
        let folds: Vec<String> = match folds {
            Some(f) => f.to_vec(),
            None => {
                let mut v = present.clone();
                // As nnU-Net: the cross-validation folds, not `all`, unless `all` is alone.
                if v.iter().any(|f| f != "all") {
                    v.retain(|f| f != "all");
                }
                v
            }
        };
        ensure!(!folds.is_empty(), "{}: no fold_* folders (train one with `segk train`)", dir.display());
        let mut checkpoints = Vec::new();
        for f in &folds {
            ensure!(present.contains(f), "fold {f} is not trained in {} (it holds fold {})", dir.display(), present.join(", "));
            let d = dir.join(format!("fold_{f}"));
            let file = crate::checkpoint::weights_file(&d, checkpoint).with_context(|| format!("{}: no {checkpoint} (neither segk's .safetensors nor nnU-Net's .pth)", d.display()))?;
            checkpoints.push((d, file));
        }
        // An nnU-Net checkpoint says what it was trained as and which mirrorings it allows.
        let (mut configuration, mut torch_axes, mut trainer_name) = (configuration_of(dir), None, None);
        if let Some((_, crate::checkpoint::WeightsFile::Torch(p))) = checkpoints.first() {
            let ckpt = crate::pth::TorchCheckpoint::open(p)?;
            configuration = ckpt.configuration.clone().unwrap_or(configuration);
            torch_axes = Some(ckpt.mirror_axes.clone().unwrap_or_default());
            trainer_name = ckpt.trainer_name.clone();
        }
        let plan = crate::plan::plans::from_nnunet(&plans, &configuration, &json).with_context(|| format!("{}", path.display()))?;
        let t = &plan.topology;
        let mirror_axes = torch_axes.map_or_else(|| t.mirror_axes(), |a| t.axes_from_nnunet(&a));
        Ok(Model { plans, configuration, plan, json, checkpoints, mirror_axes, trainer_name, prev_stage_predictions: None })
    }

    /// The folds' nets on `be`, the activations of one patch, and the axes mirror TTA flips
    /// (none without `tta`): what the sliding window needs.
    pub fn load<B: Backend>(&self, be: &B, tta: bool) -> Result<(Vec<UNet<B>>, Acts<B>, Vec<usize>)> {
        let plan = &self.plan;
        let mut nets = Vec::new();
        for (dir, file) in &self.checkpoints {
            let mut net = UNet::for_inference(be, plan.topology.clone())?;
            crate::checkpoint::load_weights(dir, file, be, &mut net)?;
            nets.push(net);
        }
        let acts = Acts::new(be, &plan.topology, plan.patch_size, 1, Checkpointing::Level1, false)?;
        Ok((nets, acts, if tta { self.mirror_axes.clone() } else { Vec::new() }))
    }

    /// The labels whose one-hot channels the net takes after the images' (a cascade stage's
    /// previous-stage predictions, as its plans say); empty for other configurations.
    pub fn prev_stage_labels(&self) -> Vec<i64> {
        match crate::cascade::previous_stage(&self.plans, &self.configuration) {
            Ok(Some(_)) => self.json.foreground_values(),
            _ => Vec::new(),
        }
    }

    /// How the net's outputs become label values: the label values in class order, or for a
    /// region net the regions_class_order.
    pub fn head(&self) -> Result<export::Head> {
        let head = export::Head::of(&self.json)?;
        let outputs = self.plan.topology.n_classes;
        ensure!(head.outputs() == outputs, "dataset.json gives {} outputs ({}), the network has {outputs}", head.outputs(), if self.json.has_regions() { "regions_class_order" } else { "labels" });
        Ok(head)
    }
}

/// The entries of `dir` that `pick` maps to a name (a prefix or suffix stripped), sorted;
/// hidden ones (segk's `.partial.` files among them) left out.
pub fn names_in(dir: &Path, pick: impl Fn(&str) -> Option<&str>) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().filter(|n| !n.starts_with('.')).and_then(&pick).map(str::to_string))
        .collect();
    v.sort();
    Ok(v)
}

/// The plans file of a model folder, as nnU-Net names it there.
pub const PLANS_FILE: &str = "plans.json";

/// The configuration a model folder named TRAINER__PLANS__CONFIGURATION holds; 3d_fullres for
/// a folder named otherwise (`segk train --out`).
pub fn configuration_of(dir: &Path) -> String {
    let name = crate::experiment::full_path(dir).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    match name.split("__").collect::<Vec<_>>().as_slice() {
        [_, _, c] if !c.is_empty() => c.to_string(),
        _ => "3d_fullres".into(),
    }
}

/// The cases in `input`: id -> channel files, by nnU-Net's imagesTs naming (ID_XXXX<ending>).
/// A picture format may hold every channel in one file (RGB); the others need one per channel.
pub fn find_cases(input: &Path, channels: usize, ending: &str) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let found = crate::dataset::channel_files(input, ending)?;
    ensure!(!found.is_empty(), "{}: no images named CASE_XXXX{ending}", input.display());
    let pictures = matches!(crate::imageio::format_of(ending), Some(crate::imageio::Format::Png | crate::imageio::Format::Tiff));
    found
        .into_iter()
        .map(|(id, files)| {
            if pictures && files.len() < channels && files.contains_key(&0) {
                return Ok((id, files.into_values().collect())); // channels counted when read
            }
            let paths: Vec<PathBuf> = (0..channels).map(|c| crate::dataset::image_path(input, &id, c, ending)).collect();
            if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
                bail!("{}: missing (case {id} needs {channels} channel files)", missing.display());
            }
            Ok((id, paths))
        })
        .collect()
}

/// When the training images had one coarse axis (spacing over twice the finest) and a case's
/// coarse axis is another one, the case is probably oriented differently: it is predicted as
/// given (as nnU-Net does), but said. Spacings are [z, y, x]; the plan's in its axis order.
pub fn axis_order_warning(plan_spacing: [f64; 3], order: [usize; 3], case_spacing: [f64; 3]) -> Option<String> {
    if plan_spacing.contains(&0.0) {
        return None; // 2d: the slice axis keeps each case's spacing
    }
    let coarsest = |s: [f64; 3]| (0..3).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap_or(0);
    let finest = plan_spacing.iter().copied().fold(f64::INFINITY, f64::min);
    let case = order.map(|a| case_spacing[a]);
    let case_finest = case.iter().copied().fold(f64::INFINITY, f64::min);
    let (p, c) = (coarsest(plan_spacing), coarsest(case));
    (plan_spacing[p] > 2.0 * finest && case[c] > 2.0 * case_finest && p != c).then(|| {
        format!("its coarse axis ({:.2} mm) is not the one the training images had ({:.2} mm): is it oriented as they were? (predicted as given)", case[c], plan_spacing[p])
    })
}

/// Files in `input` that find_cases leaves unread: image channels beyond the model's, and
/// images of another ending. Each named with why.
pub fn unread_files(input: &Path, channels: usize, ending: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(input) else { return Vec::new() };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| match name.strip_suffix(ending) {
            Some(stem) => {
                let (_, c) = crate::dataset::split_channel(stem)?;
                (c >= channels).then(|| format!("{name} (channel {c}; the model reads {channels})"))
            }
            None => crate::imageio::is_image_file(&name).then(|| format!("{name} (the model's file_ending is {ending})")),
        })
        .collect();
    out.sort();
    out
}

/// An upper bound of the host memory `segk predict` uses for a case of `raw` voxels on its
/// own grid and `stored` on the plan's: parameters (one copy per fold), the forward pass at
/// batch 1, the live window (classes + weights x patch depth x H x W, padded to the patch),
/// the tile buffers, and for two cases at once (one being preprocessed, one in the net)
/// 24 bytes per raw voxel and channel of preprocessing copies plus the plan-grid channels, and
/// two label maps with their f32 copy for the writer; plus 64 MiB for the program itself.
/// It grows with classes x one slab, never with classes x the volume.
pub fn host_bytes_bound(model: &Model, raw: usize, stored: [usize; 3]) -> Result<u64> {
    let plan = &model.plan;
    let t = &plan.topology;
    let (p, c, ch) = (plan.patch_size, t.n_classes, t.in_channels);
    let params = crate::model::params::ParamLayout::new(t).len * 4 * model.checkpoints.len();
    let acts = crate::model::plan::ActPlan::new(t, p, 1, Checkpointing::Level1, false)?.bytes(4, 4);
    let padded: [usize; 3] = std::array::from_fn(|a| stored[a].max(p[a]));
    let window = (c + 1) * p[0] * padded[1] * padded[2] * 4;
    let tiles = 2 * p.iter().product::<usize>() * ch * 4 + p[1] * p[2] * c * 4;
    let cases = 2 * (raw * ch * 24 + stored.iter().product::<usize>() * ch * 4 + raw * (2 + 4) + 2 * c * padded[1] * padded[2] * 4);
    Ok((params + acts + window + tiles + cases) as u64 + (64 << 20))
}

/// Where a label map is written before it is complete: a hidden name in the same folder,
/// The cases of job `part_id` of `num_parts` (nnU-Net's --num_parts / --part_id: every
/// num_parts-th case of the sorted list, from part_id).
pub fn part_of<T>(cases: Vec<T>, part_id: usize, num_parts: usize) -> Result<Vec<T>> {
    ensure!(num_parts >= 1 && part_id < num_parts, "--part-id must be below --num-parts (got part {part_id} of {num_parts})");
    Ok(cases.into_iter().enumerate().filter(|(i, _)| i % num_parts == part_id).map(|(_, c)| c).collect())
}

/// Whether case `id` is already predicted in `output`: its label map is there (written last,
/// by rename), and its probabilities when they are asked for.
pub fn is_predicted(output: &Path, id: &str, ending: &str, probabilities: bool) -> bool {
    output.join(format!("{id}{ending}")).is_file() && (!probabilities || output.join(format!("{id}.npz")).is_file())
}

#[derive(Clone, Copy, Debug)]
pub struct PredictOptions {
    pub step: f64,
    pub tta: bool,
    /// Also write CASE.npz with the class probabilities on the input's grid (nnU-Net's format).
    pub save_probabilities: bool,
    /// What the convolutions multiply (`--precision`; bf16 by default where the CPU has it).
    pub precision: crate::device::Precision,
}

/// Predicts the given cases (id, channel files) into `output`; returns the files written and
/// the largest [`host_bytes_bound`] of the cases.
pub fn predict_cases<B: Backend>(be: &B, model: &Model, cases: &[(String, Vec<PathBuf>)], output: &Path, opt: PredictOptions, progress: &indicatif::ProgressBar) -> Result<(Vec<PathBuf>, u64)> {
    let plan = &model.plan;
    let settings = Settings::new(&model.json, &model.plans, &model.configuration, ImageDtype::F32)?;
    let head = model.head()?;
    let prev_labels = model.prev_stage_labels();
    let prev_dir = match (&model.prev_stage_predictions, prev_labels.is_empty()) {
        (Some(d), false) => Some(d.as_path()),
        (None, false) => anyhow::bail!("{} is a cascade stage: it needs the previous stage's predictions of these cases (--prev-stage-predictions DIR)", model.configuration),
        (Some(d), true) => anyhow::bail!("{}: --prev-stage-predictions is for cascade stages; {} is not one", d.display(), model.configuration),
        (None, true) => None,
    };
    let ending = model.json.file_ending.clone();
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    // Find out now, not after the first case's minutes, that nothing can be written there.
    let probe = output.join(".segk-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{}: cannot write there", output.display()))?;
    let _ = std::fs::remove_file(&probe);
    let (nets, acts, mirror_axes) = model.load(be, opt.tta)?;
    let predictor = window::Predictor { be, nets: &nets, acts: &acts, patch: plan.patch_size, classes: head.outputs(), step: opt.step, mirror_axes: &mirror_axes };
    progress.set_length(cases.len() as u64);
    let ty = VoxelType::for_labels(head.values().iter().copied().max().unwrap_or(0) as i64);
    let mut written = Vec::new();
    let mut bound = 0u64;
    // Three stages overlap: the next case is preprocessed and the last one written (gzip) on
    // their own threads while this one runs through the net. One case ahead, one behind.
    std::thread::scope(|scope| -> Result<()> {
        let (prep_tx, prep_rx) = crossbeam_channel::bounded(1);
        let (write_tx, write_rx) = crossbeam_channel::bounded::<(PathBuf, imageio::Volume, Option<(probs::ProbFile, PathBuf)>)>(1);
        let settings = &settings;
        scope.spawn(move || {
            let (prev_labels, ending) = (&prev_labels, &ending);
            for (id, paths) in cases {
                let r = preprocess_images(paths, settings)
                    .and_then(|(mut channels, geometry, raw)| {
                        if let Some(dir) = prev_dir {
                            channels.extend(crate::cascade::one_hot_channels(&dir.join(format!("{id}{ending}")), raw.shape, &geometry, prev_labels)?);
                        }
                        Ok((channels, geometry, raw))
                    })
                    .with_context(|| format!("case {id}"));
                if prep_tx.send((id.clone(), r)).is_err() {
                    break;
                }
            }
        });
        let writer = scope.spawn(move || -> Result<()> {
            // Probabilities first, then the label map under a temporary name renamed into
            // place: a case whose label map exists is complete (what --continue relies on).
            for (out, vol, probs) in write_rx {
                if let Some((p, npz)) = probs {
                    p.finish(&npz)?;
                }
                imageio::write_atomic(&out, &vol, ty)?;
            }
            Ok(())
        });
        for (id, prepared) in prep_rx {
            progress.set_message(id.clone());
            let (channels, geometry, raw) = prepared?;
            if let Some(w) = axis_order_warning(plan.spacing, plan.transpose_forward, raw.spacing) {
                println!("  case {id}: {w}");
            }
            bound = bound.max(host_bytes_bound(model, raw.voxels(), geometry.shape)?);
            let probs = match opt.save_probabilities {
                true => Some(probs::ProbFile::create(&output.join(format!("{id}.probabilities.npy.tmp")), head.outputs(), geometry.original_shape, matches!(head, export::Head::Regions(_)))?),
                false => None,
            };
            let mut exporter = export::Exporter::new(&geometry, head.clone(), probs);
            predictor.run(&channels, geometry.shape, &mut exporter).with_context(|| format!("case {id}"))?;
            drop(channels);
            let out = output.join(format!("{id}{}", model.json.file_ending));
            let vol = raw.labels_like(exporter.labels.iter().map(|&l| l as f32).collect());
            // CASE.npz beside the label map, as nnU-Net names it.
            let probs = exporter.probs.take().map(|p| (p, output.join(format!("{id}.npz"))));
            if write_tx.send((out.clone(), vol, probs)).is_err() {
                break;
            }
            written.push(out);
            progress.inc(1);
            crate::sysinfo::log_when_hidden(progress, &id);
        }
        drop(write_tx);
        writer.join().map_err(|_| anyhow::anyhow!("the label map writer thread panicked"))??;
        Ok(())
    })?;
    Ok((written, bound))
}
