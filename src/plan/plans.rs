//! segk's view of a configuration it trains ([`Plan`]: spacing, axis order, patch, batch,
//! network, and what a step needs on a GPU), read from an nnU-Net plans file; and segk's own
//! sizing (`segk plan --gpu-memory GB`, plans name segkPlans): nnU-Net's 3d_fullres with the
//! patch and batch sized to a GPU budget by segk's exact memory model, written in nnU-Net's
//! schema with segk's figures in a key nnU-Net ignores.

use super::fingerprint::{Fingerprint, IntensityStats};
use super::nnunet::{self as nn, NnunetFingerprint, PoolProps};
use super::plans_json::{ArchKwargs, Architecture, Configuration, Ordered, PlansJson};
use crate::dataset::DatasetJson;
use crate::model::params::ParamLayout;
use crate::model::plan::activation_bytes;
use crate::model::{Checkpointing, Topology};
use crate::preprocess::normalize::Scheme;
use anyhow::{bail, ensure, Context, Result};
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

/// segk's plan from configuration `name` of an nnU-Net plans file (nnU-Net's own, or the one
/// `segk plan` wrote): the same spacing, axis order, patch, batch, network and normalisation,
/// with what the step needs on a GPU with segk at checkpoint level 1.
pub fn from_nnunet(plans: &PlansJson, name: &str, json: &DatasetJson) -> Result<Plan> {
    let c = nn::resolve(plans, name)?;
    let topology = nn::segk_topology(&c, json).with_context(|| format!("configuration {name} of {}", plans.plans_name))?;
    let missing = |key: &str| anyhow::anyhow!("configuration {name} of {} has no {key}", plans.plans_name);
    let three = |v: &[usize], key: &str| -> Result<[usize; 3]> { v.try_into().map_err(|_| anyhow::anyhow!("{key} of configuration {name} has {} axes, not 3", v.len())) };
    let patch = c.patch_size.as_deref().ok_or_else(|| missing("patch_size"))?;
    let patch_size = nn::patch_3d(patch).with_context(|| format!("patch_size of configuration {name}"))?;
    ensure!(topology.planar == (patch.len() == 2), "configuration {name}: a {}d patch for a {}d network", patch.len(), if topology.planar { 2 } else { 3 });
    let spacing = c.spacing.clone().ok_or_else(|| missing("spacing"))?;
    // A 2d configuration keeps each case's own spacing along the first axis (0 here: unknown).
    let spacing: [f64; 3] = match *spacing.as_slice() {
        [a, b] if topology.planar => [0.0, a, b],
        [a, b, c] if !topology.planar => [a, b, c],
        _ => bail!("spacing of configuration {name} has {} axes, its patch {}", spacing.len(), patch.len()),
    };
    let median: Vec<usize> = c.median_image_size_in_voxels.clone().ok_or_else(|| missing("median_image_size_in_voxels"))?.iter().map(|n| n.as_f64().unwrap_or(0.0).round() as usize).collect();
    let median = if topology.planar && median.len() == 2 { vec![0, median[0], median[1]] } else { median };
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
        gpu_memory_budget_bytes: plans.extra.get(SEGK_KEY).and_then(|v| v["gpu_memory_budget_bytes"].as_u64()).map_or(needed, |b| b as usize),
        gpu_memory_needed_bytes: needed,
        checkpointing: PLAN_CHECKPOINTING.level(),
    })
}

/// An nnU-Net plans file as it is on disk.
pub fn read_nnunet_plans(path: &std::path::Path) -> Result<PlansJson> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    parse_plans(&bytes, &path.display().to_string())
}

pub const GIB: f64 = (1u64 << 30) as f64;

/// The plans name of segk's own sizing.
pub const SEGK_PLANS: &str = "segkPlans";


/// The top-level key of segk's own facts in a plans file it sized (nnU-Net ignores it).
pub const SEGK_KEY: &str = "segk";

/// Per channel, the foreground intensity statistics of a plans file (what CT normalisation
/// clips and scales with), in channel order.
pub fn intensity_stats(plans: &PlansJson) -> Result<Vec<IntensityStats>> {
    let stats = plans.foreground_intensity_properties_per_channel.as_object().ok_or_else(|| anyhow::anyhow!("{}: foreground_intensity_properties_per_channel is not an object", plans.plans_name))?;
    let mut channels: Vec<(usize, IntensityStats)> = stats
        .iter()
        .map(|(k, v)| {
            let c = k.parse::<usize>().map_err(|_| anyhow::anyhow!("{}: intensity statistics for channel {k:?}", plans.plans_name))?;
            Ok((c, serde_json::from_value(v.clone()).with_context(|| format!("{}: intensity statistics of channel {k}", plans.plans_name))?))
        })
        .collect::<Result<_>>()?;
    channels.sort_by_key(|(c, _)| *c);
    ensure!(channels.iter().enumerate().all(|(i, (c, _))| i == *c), "{}: intensity statistics for channels {:?}, not 0..{}", plans.plans_name, channels.iter().map(|(c, _)| *c).collect::<Vec<_>>(), channels.len());
    Ok(channels.into_iter().map(|(_, s)| s).collect())
}

/// The store folder of a configuration in the preprocessed folder: one per nnU-Net data
/// identifier (configurations and plans that preprocess alike share one), under segk's prefix
/// because its files are not nnU-Net's and nnU-Net's preprocessing replaces its own folder.
pub fn store_dir(plans: &PlansJson, configuration: &str) -> Result<String> {
    let c = nn::resolve(plans, configuration)?;
    Ok(format!("segk_{}", c.data_identifier.unwrap_or_else(|| format!("{}_{configuration}", plans.plans_name))))
}

/// nnU-Net's default plans (ExperimentPlanner) from segk's fingerprint, in memory.
pub fn nnunet_default(dataset_name: &str, json: &DatasetJson, fp: &Fingerprint) -> Result<PlansJson> {
    nn::plan_experiment(&nn::PLANNERS[0], dataset_name, json, &NnunetFingerprint::from_segk(fp)?, &crate::dataset::reader_writer(json, None), None)
}

/// segkPlans: `base`'s 3d_fullres (its spacing, preprocessing and network rules) with the patch
/// sized by segk's exact memory model to `budget` bytes at batch 2 -- nnU-Net's first patch,
/// shrunk by nnU-Net's rule while it does not fit -- then the largest batch that fits, at
/// least 2, covering at most 5 % of the dataset's voxels.
pub fn segk_sized(base: &PlansJson, json: &DatasetJson, budget: usize) -> Result<PlansJson> {
    let c = nn::resolve(base, "3d_fullres").context("segk sizes 3d_fullres")?;
    let spacing = c.spacing.clone().context("3d_fullres has no spacing")?;
    let median: Vec<f64> = c.median_image_size_in_voxels.clone().context("3d_fullres has no median_image_size_in_voxels")?.iter().map(|n| n.as_f64().unwrap_or(0.0)).collect();
    ensure!(spacing.len() == 3 && median.len() == 3, "3d_fullres of {} is not 3D", base.plans_name);
    let configure = |t: &PoolProps, batch: usize| Configuration {
        patch_size: Some(t.patch.clone()),
        batch_size: Some(batch),
        architecture: Some(Architecture::nnunet(false, ArchKwargs::new(false, 3, nn::features(t.strides.len(), 3), t.kernels.clone(), t.strides.clone(), &[]))),
        ..c.clone()
    };
    let needs = |t: &PoolProps, batch: usize| -> Result<usize> { gpu_bytes(&nn::segk_topology(&configure(t, batch), json)?, [t.patch[0], t.patch[1], t.patch[2]], batch) };
    let gib = |b: usize| b as f64 / GIB;
    let mut t = nn::pool_and_conv(&spacing, &nn::initial_patch(&spacing, &median));
    ensure!(t.strides.len() >= 2, "median shape {median:?} (at spacing {spacing:?}) is too small to pool once: a U-Net needs at least 8 voxels along an axis");
    while needs(&t, 2)? > budget {
        let next = nn::shrink(&spacing, &median, &t);
        if next.strides.len() < 2 || next.patch.contains(&0) {
            bail!("patch {:?} needs {:.2} GiB at batch 2 and smaller patches leave no U-Net: the {:.2} GiB budget is too small", t.patch, gib(needs(&t, 2)?), gib(budget));
        }
        t = next;
    }
    let dataset_voxels = median.iter().product::<f64>() * json.num_training as f64;
    let cap = (dataset_voxels * 0.05 / t.patch.iter().map(|&v| v as f64).product::<f64>()).round_ties_even() as usize;
    let mut batch = 2;
    while batch < cap && needs(&t, batch + 1)? <= budget {
        batch += 1;
    }
    let mut extra = base.extra.clone();
    extra.insert(
        SEGK_KEY.into(),
        serde_json::json!({
            "sized_from": base.plans_name,
            "gpu_memory_budget_bytes": budget,
            "gpu_memory_needed_bytes": needs(&t, batch)?,
            "checkpoint_level": PLAN_CHECKPOINTING.level(),
        }),
    );
    Ok(PlansJson { plans_name: SEGK_PLANS.into(), configurations: Ordered(vec![("3d_fullres".into(), configure(&t, batch))]), extra, ..base.clone() })
}

/// A plans.json of segk before it wrote nnU-Net's schema (model folders trained then):
/// {"dataset_name", "plans_name"?, "configurations": {"3d_fullres": Plan}, stats as a list}.
#[derive(Deserialize)]
struct Legacy {
    dataset_name: String,
    #[serde(default = "segk_plans")]
    plans_name: String,
    configurations: LegacyConfigurations,
    foreground_intensity_properties_per_channel: Vec<IntensityStats>,
}

#[derive(Deserialize)]
struct LegacyConfigurations {
    #[serde(rename = "3d_fullres")]
    fullres: Plan,
}

fn segk_plans() -> String {
    SEGK_PLANS.to_string()
}

/// A plans file in nnU-Net's schema, or segk's older one converted to it (`what` names the
/// file in errors).
pub fn parse_plans(bytes: &[u8], what: &str) -> Result<PlansJson> {
    let value: serde_json::Value = serde_json::from_slice(bytes).with_context(|| format!("{what}: not JSON"))?;
    if value.pointer("/configurations/3d_fullres/topology").is_none() {
        return serde_json::from_value(value).with_context(|| format!("{what}: not an nnU-Net plans file"));
    }
    let old: Legacy = serde_json::from_value(value).with_context(|| format!("{what}: not a segk plans.json"))?;
    let p = old.configurations.fullres;
    let t = &p.topology;
    let n = t.features.len();
    let mut arch = ArchKwargs::new(false, 3, t.features.clone(), t.kernels.iter().map(|k| k.to_vec()).collect(), t.strides.iter().map(|s| s.to_vec()).collect(), &[]);
    arch.n_conv_per_stage = Some(vec![t.convs_per_stage; n]);
    arch.n_conv_per_stage_decoder = vec![t.convs_per_stage; n - 1];
    let config = nn::with_default_preprocessing(Configuration {
        data_identifier: Some("nnUNetPlans_3d_fullres".into()),
        batch_size: Some(p.batch_size),
        patch_size: Some(p.patch_size.to_vec()),
        median_image_size_in_voxels: Some(p.median_shape.iter().map(|&v| serde_json::Number::from(v)).collect()),
        spacing: Some(p.spacing.to_vec()),
        normalization_schemes: Some(p.normalization.clone()),
        use_mask_for_norm: Some(p.use_mask_for_norm.clone()),
        architecture: Some(Architecture::nnunet(false, arch)),
        batch_dice: Some(t.dice == crate::backend::DiceMode::Batch),
        ..Configuration::default()
    });
    let stats: serde_json::Map<String, serde_json::Value> = old.foreground_intensity_properties_per_channel.iter().enumerate().map(|(c, s)| Ok((c.to_string(), serde_json::to_value(s)?))).collect::<Result<_>>()?;
    let mut extra = serde_json::Map::new();
    extra.insert(SEGK_KEY.into(), serde_json::json!({"converted_from": "segk's plans.json schema before nnU-Net's", "gpu_memory_budget_bytes": p.gpu_memory_budget_bytes}));
    // nnU-Net resolves the planner by class name; the plan is its 3d_fullres in layout.
    Ok(PlansJson {
        dataset_name: old.dataset_name,
        plans_name: old.plans_name,
        original_median_spacing_after_transp: p.spacing.to_vec(),
        original_median_shape_after_transp: p.median_shape.iter().map(|&v| v as i64).collect(),
        image_reader_writer: "SimpleITKIO".into(),
        transpose_forward: p.transpose_forward.to_vec(),
        transpose_backward: p.transpose_backward.to_vec(),
        configurations: Ordered(vec![("3d_fullres".into(), config)]),
        experiment_planner_used: nn::PLANNERS[0].class.into(),
        label_manager: "LabelManager".into(),
        foreground_intensity_properties_per_channel: serde_json::Value::Object(stats),
        extra,
    })
}
