//! The 3d_fullres plan: spacing, axis order, patch, batch and network, sized by segk's exact
//! memory model against a GPU memory budget (nnU-Net uses a fitted constant instead).

use super::fingerprint::{Fingerprint, IntensityStats};
use super::spacing::{percentile, target_spacing, transpose_forward};
use super::topology::{initial_patch, plain_unet};
use crate::dataset::DatasetJson;
use crate::model::params::ParamLayout;
use crate::model::plan::activation_bytes;
use crate::model::{Checkpointing, Topology};
use crate::preprocess::normalize::Scheme;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// Bytes per activation element on the GPU (bf16 activations, ENGINE.md section 2).
pub const GPU_ACT_BYTES: usize = 2;
/// Checkpoint level plans are sized for (the GPU default).
pub const PLAN_CHECKPOINTING: Checkpointing = Checkpointing::Level1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// Target spacing in the transposed axis order.
    pub spacing: [f64; 3],
    pub transpose_forward: [usize; 3],
    pub transpose_backward: [usize; 3],
    /// Median shape after cropping and resampling, transposed.
    pub median_shape: [usize; 3],
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    pub topology: Topology,
    /// Per channel, nnU-Net's scheme name ("CTNormalization", "ZScoreNormalization", ...).
    pub normalization: Vec<String>,
    /// Per channel: normalise inside the nonzero mask only (z-score, when cropping removed
    /// over a quarter of the median case).
    pub use_mask_for_norm: Vec<bool>,
    pub gpu_memory_budget_bytes: usize,
    /// What one training step needs at the planned checkpoint level.
    pub gpu_memory_needed_bytes: usize,
    pub checkpointing: u8,
}

/// Bytes a GPU training step needs: fp32 params, grads, momentum and a bf16 weight copy,
/// plus the activation arena at bf16.
pub fn gpu_bytes(t: &Topology, patch: [usize; 3], batch: usize) -> Result<usize> {
    let params = ParamLayout::new(t).len;
    Ok(params * (3 * 4 + 2) + activation_bytes(t, patch, batch, PLAN_CHECKPOINTING, GPU_ACT_BYTES, 4)?)
}

fn permute<T: Copy>(v: [T; 3], order: [usize; 3]) -> [T; 3] {
    order.map(|a| v[a])
}

/// Plans 3d_fullres for a fingerprinted dataset within `budget` bytes of GPU memory.
pub fn plan_3d_fullres(json: &DatasetJson, fp: &Fingerprint, budget: usize) -> Result<Plan> {
    let spacing = target_spacing(&fp.spacings, &fp.shapes_after_crop);
    let order = transpose_forward(spacing);
    let mut back = [0; 3];
    for (i, &a) in order.iter().enumerate() {
        back[a] = i;
    }
    // Median shape once resampled to the target spacing.
    let resampled: Vec<[f64; 3]> = fp.spacings.iter().zip(&fp.shapes_after_crop).map(|(s, n)| std::array::from_fn(|a| (n[a] as f64 * s[a] / spacing[a]).round())).collect();
    let median: [f64; 3] = std::array::from_fn(|a| percentile(&resampled.iter().map(|r| r[a]).collect::<Vec<_>>(), 50.0));
    let (sp_t, med_t) = (permute(spacing, order), permute(median, order));
    let classes = json.labels.keys().filter(|k| *k != "ignore").count().max(2);
    let channels = json.channels();

    let mut patch = initial_patch(sp_t, med_t);
    let (mut topo, mut padded) = plain_unet(sp_t, patch, channels, classes);
    if topo.stages() < 2 {
        bail!("median shape {:?} (after resampling to {sp_t:?}) is too small to pool once: a U-Net needs at least 8 voxels along an axis", med_t.map(|v| v as usize));
    }
    while gpu_bytes(&topo, padded, 2)? > budget {
        // Shrink the axis whose patch is largest relative to the median shape.
        let axis = (0..3).max_by(|&a, &b| (padded[a] as f64 / med_t[a]).total_cmp(&(padded[b] as f64 / med_t[b]))).unwrap_or(0);
        let step = topo.strides.iter().map(|s| s[axis]).product::<usize>();
        let needs = gpu_bytes(&topo, padded, 2)? as f64 / GIB;
        if padded[axis] <= step {
            bail!("even the smallest patch needs {needs:.2} GiB at batch 2, more than the {:.2} GiB budget", budget as f64 / GIB);
        }
        patch[axis] = padded[axis] - step;
        let (t, p) = plain_unet(sp_t, patch, channels, classes);
        if t.stages() < 2 {
            bail!("patch {padded:?} needs {needs:.2} GiB at batch 2 and smaller patches leave no U-Net: the {:.2} GiB budget is too small", budget as f64 / GIB);
        }
        (topo, padded) = (t, p);
    }
    // Largest batch that fits, at least 2, at most 5 % of the dataset's voxels per step.
    let dataset_voxels: f64 = resampled.iter().map(|r| r.iter().product::<f64>()).sum();
    let five_percent = (dataset_voxels * 0.05 / padded.iter().product::<usize>() as f64).round() as usize;
    let mut batch = 2;
    while batch < five_percent && gpu_bytes(&topo, padded, batch + 1)? <= budget {
        batch += 1;
    }
    let schemes: Vec<Scheme> = (0..channels).map(|c| Scheme::for_channel(json.channel_names.get(&c.to_string()).map(String::as_str).unwrap_or(""))).collect();
    let cropping_helps = percentile(&fp.relative_size_after_cropping, 50.0) < 0.75;
    let use_mask_for_norm = schemes.iter().map(|s| cropping_helps && s.can_use_mask()).collect();
    let normalization = schemes.iter().map(|s| s.name().to_string()).collect();
    Ok(Plan {
        spacing: sp_t,
        transpose_forward: order,
        transpose_backward: back,
        median_shape: med_t.map(|v| v as usize),
        patch_size: padded,
        batch_size: batch,
        gpu_memory_needed_bytes: gpu_bytes(&topo, padded, batch)?,
        topology: topo,
        normalization,
        use_mask_for_norm,
        gpu_memory_budget_bytes: budget,
        checkpointing: PLAN_CHECKPOINTING.level(),
    })
}

/// segk's plan from configuration `name` of an nnU-Net plans file (nnU-Net's own, or the one
/// `segk plan` wrote): the same spacing, axis order, patch, batch, network and normalisation,
/// with what the step needs on a GPU with segk at checkpoint level 1.
pub fn from_nnunet(plans: &super::plans_json::PlansJson, name: &str, json: &DatasetJson) -> Result<Plan> {
    use anyhow::Context;
    let c = super::nnunet::resolve(plans, name)?;
    let topology = super::nnunet::segk_topology(&c, json).with_context(|| format!("configuration {name} of {}", plans.plans_name))?;
    let missing = |key: &str| anyhow::anyhow!("configuration {name} of {} has no {key}", plans.plans_name);
    let three = |v: &[usize], key: &str| -> Result<[usize; 3]> { v.try_into().map_err(|_| anyhow::anyhow!("{key} of configuration {name} has {} axes, not 3", v.len())) };
    let patch_size = three(c.patch_size.as_deref().ok_or_else(|| missing("patch_size"))?, "patch_size")?;
    let spacing = c.spacing.clone().ok_or_else(|| missing("spacing"))?;
    let spacing: [f64; 3] = spacing.as_slice().try_into().map_err(|_| anyhow::anyhow!("spacing of configuration {name} has {} axes, not 3", spacing.len()))?;
    let median: Vec<usize> = c.median_image_size_in_voxels.clone().ok_or_else(|| missing("median_image_size_in_voxels"))?.iter().map(|n| n.as_f64().unwrap_or(0.0).round() as usize).collect();
    let batch_size = c.batch_size.ok_or_else(|| missing("batch_size"))?;
    ensure!(batch_size >= 1, "configuration {name} of {}: batch_size must be at least 1", plans.plans_name);
    let axes = |v: &[usize]| -> Result<[usize; 3]> { v.try_into().map_err(|_| anyhow::anyhow!("transpose of {} has {} axes", plans.plans_name, v.len())) };
    let normalization = c.normalization_schemes.clone().ok_or_else(|| missing("normalization_schemes"))?;
    ensure!(normalization.len() == json.channels(), "configuration {name} normalises {} channels, dataset.json has {}", normalization.len(), json.channels());
    for n in &normalization {
        Scheme::from_name(n)?;
    }
    let needed = gpu_bytes(&topology, patch_size, batch_size)?;
    Ok(Plan {
        spacing,
        transpose_forward: axes(&plans.transpose_forward)?,
        transpose_backward: axes(&plans.transpose_backward)?,
        median_shape: three(&median, "median_image_size_in_voxels")?,
        patch_size,
        batch_size,
        topology,
        normalization,
        use_mask_for_norm: c.use_mask_for_norm.clone().ok_or_else(|| missing("use_mask_for_norm"))?,
        gpu_memory_budget_bytes: needed,
        gpu_memory_needed_bytes: needed,
        checkpointing: PLAN_CHECKPOINTING.level(),
    })
}

/// segk's plans.json from an nnU-Net plans file: its 3d_fullres, and its intensity statistics
/// (what CT normalisation clips and scales with).
pub fn plans_file_from_nnunet(plans: &super::plans_json::PlansJson, json: &DatasetJson) -> Result<PlansFile> {
    let stats = plans.foreground_intensity_properties_per_channel.as_object().ok_or_else(|| anyhow::anyhow!("{}: foreground_intensity_properties_per_channel is not an object", plans.plans_name))?;
    let mut channels: Vec<(usize, IntensityStats)> = stats
        .iter()
        .map(|(k, v)| Ok((k.parse::<usize>().map_err(|_| anyhow::anyhow!("{}: intensity statistics for channel {k:?}", plans.plans_name))?, serde_json::from_value(v.clone())?)))
        .collect::<Result<_>>()?;
    channels.sort_by_key(|(c, _)| *c);
    Ok(PlansFile {
        dataset_name: plans.dataset_name.clone(),
        plans_name: plans.plans_name.clone(),
        configurations: Configurations { fullres: from_nnunet(plans, "3d_fullres", json)? },
        foreground_intensity_properties_per_channel: channels.into_iter().map(|(_, s)| s).collect(),
    })
}

/// An nnU-Net plans file as it is on disk.
pub fn read_nnunet_plans(path: &std::path::Path) -> Result<super::plans_json::PlansJson> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: not an nnU-Net plans file: {e}", path.display()))
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// The plans name of segk's own sizing.
pub const SEGK_PLANS: &str = "segkPlans";

fn segk_plans() -> String {
    SEGK_PLANS.to_string()
}

/// plans.json: what `segk plan` writes and `segk preprocess` and `segk train` read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlansFile {
    pub dataset_name: String,
    /// The plans this plan comes from: "nnUNetPlans" (nnU-Net's 3d_fullres), or "segkPlans"
    /// (segk's own sizing, `segk plan --gpu-memory`; also plans.json files older than this field).
    #[serde(default = "segk_plans")]
    pub plans_name: String,
    pub configurations: Configurations,
    pub foreground_intensity_properties_per_channel: Vec<IntensityStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Configurations {
    #[serde(rename = "3d_fullres")]
    pub fullres: Plan,
}

impl PlansFile {
    pub const NAME: &'static str = "plans.json";
    /// The store of this plan in the preprocessed folder: one per nnU-Net data identifier, under
    /// segk's prefix because its files are not nnU-Net's and nnU-Net's preprocessing replaces
    /// its own folder. segkPlans preprocesses as nnUNetPlans does (its own sizing changes only
    /// the patch and batch), as do nnU-Net's ResEnc presets: they share nnUNetPlans_3d_fullres.
    /// (A store made under other settings is found stale and redone, case by case.)
    pub fn store_dir(&self) -> String {
        "segk_nnUNetPlans_3d_fullres".to_string()
    }
    pub fn read(dir: &std::path::Path) -> anyhow::Result<PlansFile> {
        use anyhow::Context;
        let p = dir.join(Self::NAME);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read (run `segk plan` first)", p.display()))?;
        let plans: PlansFile = serde_json::from_str(&text).with_context(|| format!("{}: not a segk plans.json", p.display()))?;
        let plan = &plans.configurations.fullres;
        anyhow::ensure!(plan.batch_size >= 1, "{}: batch_size must be at least 1", p.display());
        anyhow::ensure!(plan.patch_size.iter().all(|&s| s >= 1), "{}: patch_size {:?} has an empty axis", p.display(), plan.patch_size);
        Ok(plans)
    }
}
