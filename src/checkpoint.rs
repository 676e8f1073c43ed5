//! Checkpoints: `NAME.safetensors` holds the weights under nnU-Net's parameter names in
//! PyTorch's layouts (Conv3d [cout, cin, kd, kh, kw], ConvTranspose3d [cin, cout, sd, sh, sw]),
//! so `safetensors.torch.load_file` gives a state dict a PyTorch user can read;
//! `NAME.state.safetensors` holds the optimizer momentum (same names and layouts) and the
//! trainer state as JSON metadata. Both are written to a temporary file, fsynced and renamed;
//! each carries the optimizer step count and the two must agree when loaded.

use crate::backend::Backend;
use crate::model::params::ParamTensor;
use crate::model::UNet;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Everything besides weights and momentum that a resumed run needs to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Epochs finished.
    pub epoch: usize,
    /// Optimizer steps taken (also in the weights file).
    pub steps: u64,
    /// Numbers of the next training and validation batches (batch RNGs are seeded by them).
    pub next_train_batch: u64,
    pub next_val_batch: u64,
    /// EMA of the mean pseudo-Dice (None before the first validation).
    pub ema_dice: Option<f64>,
    pub best_ema_dice: Option<f64>,
    pub seed: u64,
    pub bad_in_a_row: usize,
    /// Iterations done in the current epoch, and its running loss sum, steps and skips
    /// (non-zero only for a checkpoint saved mid-epoch on SIGINT/SIGTERM).
    pub iter: usize,
    pub epoch_loss_sum: f64,
    pub epoch_steps: usize,
    pub epoch_skipped: usize,
    /// Per finished epoch: train loss, mean pseudo-Dice, EMA, seconds (for the log and plot).
    pub history: Vec<[f64; 4]>,
    /// The run's --epochs (its learning-rate schedule); absent in checkpoints of older builds.
    #[serde(default)]
    pub epochs: Option<usize>,
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.safetensors")), dir.join(format!("{name}.state.safetensors")))
}

/// Whether a stored tensor is a conv weight, a transposed-conv weight, or a vector.
fn layout_of(t: &ParamTensor) -> u8 {
    if t.shape.len() != 5 {
        0
    } else if t.name.contains("transpconv") {
        2
    } else {
        1
    }
}

/// Moves the axes of a 3-axis array of `dims`: output axis i is input axis `perm[i]`.
fn permute3(v: &[f32], dims: [usize; 3], perm: [usize; 3]) -> Vec<f32> {
    let stride = [dims[1] * dims[2], dims[2], 1];
    let od = perm.map(|a| dims[a]);
    let mut out = Vec::with_capacity(v.len());
    for i in 0..od[0] {
        for j in 0..od[1] {
            for k in 0..od[2] {
                let idx = [i, j, k];
                out.push(v[(0..3).map(|a| idx[a] * stride[perm[a]]).sum::<usize>()]);
            }
        }
    }
    out
}

/// The stored weight as 3 axes and the permutation to PyTorch's order: conv
/// [taps, cin, cout] -> [cout, cin, taps]; transposed conv [cin, taps, cout] -> [cin, cout, taps].
fn torch_view(t: &ParamTensor) -> Option<([usize; 3], [usize; 3], Vec<usize>)> {
    let s = &t.shape;
    match layout_of(t) {
        1 => Some(([s[0] * s[1] * s[2], s[3], s[4]], [2, 1, 0], vec![s[4], s[3], s[0], s[1], s[2]])),
        2 => Some(([s[0], s[1] * s[2] * s[3], s[4]], [0, 2, 1], vec![s[0], s[4], s[1], s[2], s[3]])),
        _ => None,
    }
}

/// The shape PyTorch's module gives the tensor (a 2d net's weights without the unit axis;
/// the values' order is the same).
pub fn torch_shape(t: &ParamTensor) -> Vec<usize> {
    let mut shape = torch_view(t).map_or_else(|| t.shape.clone(), |v| v.2);
    if t.planar && shape.len() == 5 {
        shape.remove(2);
    }
    shape
}

/// Stored layout -> PyTorch layout: data and shape.
fn to_torch(t: &ParamTensor, v: &[f32]) -> (Vec<f32>, Vec<usize>) {
    match torch_view(t) {
        Some((dims, perm, _)) => (permute3(v, dims, perm), torch_shape(t)),
        None => (v.to_vec(), t.shape.clone()),
    }
}

/// PyTorch layout -> stored layout.
fn from_torch(t: &ParamTensor, v: &[f32]) -> Vec<f32> {
    match torch_view(t) {
        Some((dims, perm, _)) => {
            let inverse = crate::preprocess::geometry::inverse(perm);
            permute3(v, perm.map(|a| dims[a]), inverse)
        }
        None => v.to_vec(),
    }
}

/// Serialises one region of the parameter arena (params or momentum) as named tensors.
pub(crate) fn tensors_bytes(net_tensors: &[ParamTensor], region: &[f32], meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let converted: Vec<(String, Vec<u8>, Vec<usize>)> = net_tensors
        .iter()
        .map(|t| {
            let (v, shape) = to_torch(t, &region[t.offset..t.offset + t.len()]);
            (t.name.clone(), bytemuck::cast_slice(&v).to_vec(), shape)
        })
        .collect();
    let views = converted.iter().map(|(n, b, s)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))).collect::<Result<Vec<_>, _>>()?;
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}

/// Writes bytes to `path` and fsyncs them.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

fn prev(name: &str) -> String {
    format!("{name}.prev")
}

/// Saves weights and trainer state as `dir/NAME.safetensors` and `dir/NAME.state.safetensors`.
/// Both are written and fsynced under temporary names first; the previous pair is kept as
/// NAME.prev until the new pair is in place, so a kill at any moment leaves a loadable pair.
pub fn save<B: Backend>(dir: &Path, name: &str, be: &B, net: &UNet<B>, state: &TrainerState) -> Result<()> {
    let n = net.layout.len;
    let mut params = vec![0.0f32; n];
    let mut momentum = vec![0.0f32; n];
    be.download(net.params(be), &mut params)?;
    be.download(net.momentum(be), &mut momentum)?;
    let steps = net.steps.to_string();
    let (wp, sp) = paths(dir, name);
    let (tw, ts) = (wp.with_extension("tmp"), sp.with_extension("tmp"));
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("segk_steps".to_string(), steps.clone())]);
    write_synced(&tw, &tensors_bytes(&net.layout.tensors, &params, meta)?)?;
    let meta = HashMap::from([("segk_steps".to_string(), steps), ("segk_trainer_state".to_string(), serde_json::to_string(state)?)]);
    write_synced(&ts, &tensors_bytes(&net.layout.tensors, &momentum, meta)?)?;
    let (pw, ps) = paths(dir, &prev(name));
    if wp.is_file() && sp.is_file() {
        rename(&wp, &pw)?;
        rename(&sp, &ps)?;
    }
    rename(&tw, &wp)?;
    rename(&ts, &sp)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    for p in [pw, ps] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", p.display())),
            _ => {}
        }
    }
    Ok(())
}

/// A stored f32 tensor's values.
fn f32s(v: &TensorView) -> Vec<f32> {
    v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Named tensors in PyTorch's layouts: a name -> (shape, values), None when absent.
type Lookup<'a> = dyn Fn(&str) -> Result<Option<(Vec<usize>, Vec<f32>)>> + 'a;

/// Fills `region` (stored layout) with every tensor of `tensors` from `get`, checking each
/// name, shape and value; `path` names the file in errors.
fn fill(path: &Path, tensors: &[ParamTensor], region: &mut [f32], get: &Lookup) -> Result<()> {
    for t in tensors {
        let (shape, data) = get(&t.name)?.ok_or_else(|| anyhow::anyhow!("{}: tensor {} is missing (a checkpoint of another network?)", path.display(), t.name))?;
        let want = torch_shape(t);
        ensure!(shape == want, "{}: tensor {} has shape {shape:?}, the network's is {want:?} (a checkpoint of another plan?)", path.display(), t.name);
        if data.iter().any(|x| !x.is_finite()) {
            bail!("{}: tensor {} holds non-finite values", path.display(), t.name);
        }
        region[t.offset..t.offset + t.len()].copy_from_slice(&from_torch(t, &data));
    }
    Ok(())
}

/// Reads one file's tensors into `region` (stored layout), checking every name and shape.
pub(crate) fn read_into(path: &Path, tensors: &[ParamTensor], region: &mut [f32]) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: unreadable header ({e})", path.display()))?;
    let get = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Ok(v) = st.tensor(name) else { return Ok(None) };
        ensure!(v.dtype() == Dtype::F32, "{}: tensor {name} is {:?}, expected F32", path.display(), v.dtype());
        Ok(Some((v.shape().to_vec(), f32s(&v))))
    };
    fill(path, tensors, region, &get)?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Reads an nnU-Net checkpoint's network weights into `region` (stored layout).
pub fn read_torch_into(ckpt: &crate::pth::TorchCheckpoint, tensors: &[ParamTensor], region: &mut [f32]) -> Result<()> {
    fill(&ckpt.path, tensors, region, &|name| ckpt.tensor(name))
}

/// Loads `dir/NAME` into `net` (weights, momentum, step count) and returns the trainer state;
/// when that pair is missing or unreadable but the previous one (left by a save that was cut
/// short) is intact, loads that one and says so.
pub fn load<B: Backend>(dir: &Path, name: &str, be: &B, net: &mut UNet<B>) -> Result<TrainerState> {
    match load_pair(dir, name, be, net) {
        Ok(s) => Ok(s),
        Err(e) if paths(dir, &prev(name)).0.is_file() => {
            let s = load_pair(dir, &prev(name), be, net).map_err(|_| e)?;
            println!("{}: a save was cut short; loaded the previous {name} (epoch {}, step {})", dir.display(), s.epoch, s.steps);
            Ok(s)
        }
        Err(e) => Err(e),
    }
}

fn load_pair<B: Backend>(dir: &Path, name: &str, be: &B, net: &mut UNet<B>) -> Result<TrainerState> {
    let (wp, sp) = paths(dir, name);
    let n = net.layout.len;
    let (mut params, mut momentum) = (vec![0.0f32; n], vec![0.0f32; n]);
    let wm = read_into(&wp, &net.layout.tensors, &mut params)?;
    let sm = read_into(&sp, &net.layout.tensors, &mut momentum)?;
    let state: TrainerState = serde_json::from_str(sm.get("segk_trainer_state").with_context(|| format!("{}: no trainer state in its metadata", sp.display()))?)
        .with_context(|| format!("{}: trainer state unreadable", sp.display()))?;
    let steps = |m: &HashMap<String, String>| m.get("segk_steps").and_then(|s| s.parse::<u64>().ok());
    ensure!(
        steps(&wm) == Some(state.steps) && steps(&sm) == Some(state.steps),
        "{} and {} are from different steps ({:?} vs {:?}): the run was interrupted while saving; resume from another checkpoint",
        wp.display(),
        sp.display(),
        steps(&wm),
        steps(&sm)
    );
    be.upload(net.params(be), &params)?;
    be.upload(net.momentum(be), &momentum)?;
    net.steps = state.steps;
    Ok(state)
}

/// The weights file `-chk NAME` names in a fold folder: NAME.safetensors (segk's), or
/// NAME.pth (nnU-Net's); NAME may carry either extension, as nnU-Net's -chk carries `.pth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsFile {
    Segk(String),
    Torch(PathBuf),
}

/// Which weights file `-chk name` means in `dir`: the one its extension names, else segk's
/// when present (or its previous copy), else nnU-Net's. None when neither is there.
pub fn weights_file(dir: &Path, name: &str) -> Option<WeightsFile> {
    let segk = |n: &str| (paths(dir, n).0.is_file() || paths(dir, &prev(n)).0.is_file()).then(|| WeightsFile::Segk(n.to_string()));
    let torch = |n: &str| Some(dir.join(format!("{n}.pth"))).filter(|p| p.is_file()).map(WeightsFile::Torch);
    if let Some(stem) = name.strip_suffix(".pth") {
        return torch(stem);
    }
    if let Some(stem) = name.strip_suffix(".safetensors") {
        return segk(stem);
    }
    segk(name).or_else(|| torch(name))
}

/// Loads only the weights (what inference needs; the momentum file is not read, nor
/// required); for segk's files falling back to NAME.prev as `load` does. Returns the step
/// count (0 for nnU-Net's).
pub fn load_weights<B: Backend>(dir: &Path, file: &WeightsFile, be: &B, net: &mut UNet<B>) -> Result<u64> {
    let name = match file {
        WeightsFile::Segk(name) => name,
        WeightsFile::Torch(path) => {
            let ckpt = crate::pth::TorchCheckpoint::open(path)?;
            let mut params = vec![0.0f32; net.layout.len];
            read_torch_into(&ckpt, &net.layout.tensors, &mut params)?;
            be.upload(net.params(be), &params)?;
            net.steps = 0;
            return Ok(0);
        }
    };
    let one = |name: &str, net: &mut UNet<B>| -> Result<u64> {
        let (wp, _) = paths(dir, name);
        let mut params = vec![0.0f32; net.layout.len];
        let wm = read_into(&wp, &net.layout.tensors, &mut params)?;
        be.upload(net.params(be), &params)?;
        net.steps = wm.get("segk_steps").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        Ok(net.steps)
    };
    match one(name, net) {
        Ok(s) => Ok(s),
        Err(e) if paths(dir, &prev(name)).0.is_file() => {
            let steps = one(&prev(name), net).map_err(|p| e.context(format!("and the previous copy failed too: {p:#}")))?;
            println!("{}: {name} is unreadable (a save cut short); using the previous {name} (step {steps})", dir.display());
            Ok(steps)
        }
        Err(e) => Err(e),
    }
}

/// Whether `dir/NAME` (or its previous copy) has a weights file.
pub fn weights_exist(dir: &Path, name: &str) -> bool {
    weights_file(dir, name).is_some()
}

/// Fine-tuning's start, as nnU-Net's `load_pretrained_weights`: every weight of `net` but the
/// segmentation heads (`decoder.seg_layers.*`, which keep their fresh init) from `file`, an
/// nnU-Net `.pth` or a segk `.safetensors`. Names and shapes must match; every mismatch is
/// listed. Returns the number of tensors loaded.
pub fn load_pretrained<B: Backend>(file: &Path, be: &B, net: &mut UNet<B>) -> Result<usize> {
    let torch = file.extension().is_some_and(|e| e == "pth");
    let ckpt = if torch { Some(crate::pth::TorchCheckpoint::open(file)?) } else { None };
    let bytes = if torch { Vec::new() } else { std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))? };
    let st = if torch { None } else { Some(SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: neither an nnU-Net .pth nor a valid safetensors file ({e})", file.display()))?) };
    let shape_of = |name: &str| -> Option<Vec<usize>> {
        match (&ckpt, &st) {
            (Some(c), _) => c.shape(name).map(<[usize]>::to_vec),
            (_, Some(s)) => s.tensor(name).ok().map(|v| v.shape().to_vec()),
            _ => None,
        }
    };
    let wanted: Vec<&ParamTensor> = net.layout.tensors.iter().filter(|t| !t.name.contains(".seg_layers.")).collect();
    let mismatches: Vec<String> = wanted
        .iter()
        .filter_map(|t| match shape_of(&t.name) {
            None => Some(format!("{}: missing", t.name)),
            Some(s) if s != torch_shape(t) => Some(format!("{}: {s:?} in the file, {:?} in this network", t.name, torch_shape(t))),
            Some(_) => None,
        })
        .collect();
    if !mismatches.is_empty() {
        bail!("{}: {} of this network's {} weights (segmentation heads aside) do not match:\n  {}", file.display(), mismatches.len(), wanted.len(), mismatches.join("\n  "));
    }
    let mut params = vec![0.0f32; net.layout.len];
    be.download(net.params(be), &mut params)?;
    let tensors: Vec<ParamTensor> = wanted.into_iter().cloned().collect();
    match (&ckpt, &st) {
        (Some(c), _) => read_torch_into(c, &tensors, &mut params),
        (_, Some(s)) => fill(file, &tensors, &mut params, &|name| Ok(s.tensor(name).ok().map(|v| (v.shape().to_vec(), f32s(&v))))),
        _ => unreachable!("one of the two readers is set"),
    }?;
    be.upload(net.params(be), &params)?;
    Ok(tensors.len())
}

/// Writes `dir/NAME.pth` beside segk's `dir/NAME.safetensors`: the same weights as an nnU-Net
/// checkpoint (trainer nnUNetTrainer, this configuration and fold, the model folder's plans and
/// dataset.json) that nnU-Net's predictor loads (`nnUNetv2_predict_from_modelfolder`).
pub fn export_nnunet(dir: &Path, name: &str, configuration: &str) -> Result<PathBuf> {
    let (wp, _) = paths(dir, name);
    let bytes = std::fs::read(&wp).with_context(|| format!("{}: cannot read", wp.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", wp.display()))?;
    let weights: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .iter()
        .map(|(n, v)| (n.to_string(), v.shape().to_vec(), f32s(&v)))
        .collect();
    let state = read_state(dir, name)?;
    let model = dir.parent().with_context(|| format!("{}: no model folder above it", dir.display()))?;
    let json = |f: &str| -> Result<serde_json::Value> {
        let p = model.join(f);
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?).with_context(|| format!("{}: not JSON", p.display()))
    };
    let fold = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("fold_")).unwrap_or("0").to_string();
    // A 2d net's conv weights have 4 axes; nnU-Net mirrors its two.
    let mirror_axes: &[usize] = if weights.iter().any(|(_, s, _)| s.len() == 4) { &[0, 1] } else { &[0, 1, 2] };
    let info = crate::pth::CheckpointInfo { configuration, fold: &fold, plans: &json(crate::predict::PLANS_FILE)?, dataset_json: &json("dataset.json")?, epoch: state.epoch, best_ema: state.best_ema_dice, mirror_axes };
    let out = dir.join(format!("{name}.pth"));
    crate::pth::write_checkpoint(&out, &weights, &info)?;
    Ok(out)
}

/// The trainer state stored with `dir/NAME`, without loading any tensor.
pub fn read_state(dir: &Path, name: &str) -> Result<TrainerState> {
    let (_, sp) = paths(dir, name);
    let bytes = std::fs::read(&sp).with_context(|| format!("{}: cannot read", sp.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: unreadable header ({e})", sp.display()))?;
    let m = meta.metadata().clone().unwrap_or_default();
    let text = m.get("segk_trainer_state").with_context(|| format!("{}: no trainer state in its metadata", sp.display()))?;
    serde_json::from_str(text).with_context(|| format!("{}: trainer state unreadable", sp.display()))
}

/// Whether `dir/NAME` can be loaded: its pair, or the previous pair a cut-short save left.
pub fn exists(dir: &Path, name: &str) -> bool {
    let both = |n: &str| {
        let (w, s) = paths(dir, n);
        w.is_file() && s.is_file()
    };
    both(name) || both(&prev(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(epoch: usize, steps: u64) -> TrainerState {
        TrainerState { epoch, steps, next_train_batch: 0, next_val_batch: 0, ema_dice: None, best_ema_dice: None, seed: 0, bad_in_a_row: 0, iter: 0, epoch_loss_sum: 0.0, epoch_steps: 0, epoch_skipped: 0, history: vec![], epochs: None }
    }

    #[test]
    fn a_save_cut_short_leaves_the_previous_pair_loadable() {
        use crate::backend::cpu::CpuBackend;
        use crate::model::Topology;
        let be = CpuBackend::<f32>::new();
        let mut net = UNet::new(&be, Topology::isotropic(1, 2, vec![2, 4]), 1).unwrap();
        let dir = std::env::temp_dir().join(format!("segk-ckpt-cut-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = |epoch| state(epoch, 0);
        save(&dir, "ck", &be, &net, &state(1)).unwrap();
        save(&dir, "ck", &be, &net, &state(2)).unwrap();
        assert!(!dir.join("ck.prev.safetensors").exists(), "a finished save removes the previous pair");
        assert_eq!(load(&dir, "ck", &be, &mut net).unwrap().epoch, 2);
        // Killed after the old pair moved aside and the new weights landed, before the state did.
        std::fs::rename(dir.join("ck.safetensors"), dir.join("ck.prev.safetensors")).unwrap();
        std::fs::rename(dir.join("ck.state.safetensors"), dir.join("ck.prev.state.safetensors")).unwrap();
        std::fs::write(dir.join("ck.safetensors"), b"half of a new file").unwrap();
        assert!(exists(&dir, "ck"));
        assert_eq!(load(&dir, "ck", &be, &mut net).unwrap().epoch, 2, "the previous pair is loaded");
        save(&dir, "ck", &be, &net, &state(3)).unwrap();
        assert_eq!(load(&dir, "ck", &be, &mut net).unwrap().epoch, 3);
    }

    #[test]
    fn inference_nets_load_weights_only_and_predict_the_same() {
        use crate::backend::cpu::CpuBackend;
        use crate::model::unet::Acts;
        use crate::model::{Checkpointing, Topology};
        let be = CpuBackend::<f32>::new();
        let topo = Topology::isotropic(1, 3, vec![2, 4]);
        let mut net = UNet::new(&be, topo.clone(), 5).unwrap();
        net.steps = 7;
        let dir = std::env::temp_dir().join(format!("segk-ckpt-infer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        save(&dir, "ck", &be, &net, &state(1, 7)).unwrap();
        // Inference needs only the weights: the momentum file may be gone.
        std::fs::remove_file(dir.join("ck.state.safetensors")).unwrap();
        let mut inf = UNet::for_inference(&be, topo.clone()).unwrap();
        assert_eq!(load_weights(&dir, &WeightsFile::Segk("ck".into()), &be, &mut inf).unwrap(), 7);
        assert_eq!(3 * inf.param_bytes(&be), net.param_bytes(&be), "a third of the training arena");
        let acts = Acts::new(&be, &topo, [8, 8, 8], 1, Checkpointing::Level1, false).unwrap();
        let image: Vec<f32> = (0..512).map(|i| ((i * 37) % 11) as f32 / 5.0 - 1.0).collect();
        let logits = |n: &UNet<CpuBackend<f32>>| {
            let s = n.forward_logits(&be, &acts, &image).unwrap();
            let mut v = vec![0.0; s.len()];
            be.download(be.view(&acts.arena, s.offset, s.len()), &mut v).unwrap();
            v
        };
        assert_eq!(logits(&inf), logits(&net));
        let train_acts = Acts::new(&be, &topo, [8, 8, 8], 1, Checkpointing::Level1, true).unwrap();
        assert!(inf.compute_gradients(&be, &train_acts, &image, &[0; 512]).is_err(), "an inference net refuses to train");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tensor(name: &str, shape: Vec<usize>) -> ParamTensor {
        ParamTensor { name: name.into(), offset: 0, shape, he_std: None, fill: 0.0, planar: false }
    }

    #[test]
    fn weights_take_pytorchs_layouts_and_come_back() {
        // Conv: stored [kd, kh, kw, cin, cout]; PyTorch [cout, cin, kd, kh, kw].
        let t = tensor("encoder.stages.0.0.convs.0.conv.weight", vec![3, 1, 2, 2, 4]);
        let v: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let (p, shape) = to_torch(&t, &v);
        assert_eq!(shape, vec![4, 2, 3, 1, 2]);
        for k in 0..6 {
            for i in 0..2 {
                for o in 0..4 {
                    assert_eq!(p[(o * 2 + i) * 6 + k], v[(k * 2 + i) * 4 + o]);
                }
            }
        }
        assert_eq!(from_torch(&t, &p), v);
        // Transposed conv: stored [cin, sd, sh, sw, cout]; PyTorch [cin, cout, sd, sh, sw].
        let t = tensor("decoder.transpconvs.0.weight", vec![2, 2, 1, 2, 3]);
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let (p, shape) = to_torch(&t, &v);
        assert_eq!(shape, vec![2, 3, 2, 1, 2]);
        for i in 0..2 {
            for k in 0..4 {
                for o in 0..3 {
                    assert_eq!(p[(i * 3 + o) * 4 + k], v[(i * 4 + k) * 3 + o]);
                }
            }
        }
        assert_eq!(from_torch(&t, &p), v);
        let b = tensor("decoder.seg_layers.0.bias", vec![3]);
        assert_eq!(to_torch(&b, &[1.0, 2.0, 3.0]), (vec![1.0, 2.0, 3.0], vec![3]));
    }

    #[test]
    fn a_2d_nets_weights_take_conv2ds_shapes_in_the_same_order() {
        for (name, stored, torch) in [("encoder.stages.0.0.convs.0.conv.weight", vec![1, 3, 3, 2, 4], vec![4, 2, 3, 3]), ("decoder.transpconvs.0.weight", vec![2, 1, 2, 2, 3], vec![2, 3, 2, 2])] {
            let t3 = tensor(name, stored);
            let t2 = ParamTensor { planar: true, ..t3.clone() };
            let v: Vec<f32> = (0..t3.len()).map(|i| i as f32 * 0.5).collect();
            let ((p3, s3), (p2, s2)) = (to_torch(&t3, &v), to_torch(&t2, &v));
            assert_eq!(s2, torch);
            assert_eq!(s3.iter().product::<usize>(), s2.iter().product::<usize>());
            assert_eq!(p2, p3, "{name}: only the unit axis goes");
            assert_eq!(from_torch(&t2, &p2), v);
        }
    }
}
