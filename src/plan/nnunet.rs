//! nnU-Net v2.8.1's experiment planners, reproduced: `ExperimentPlanner` (nnUNetPlans) and the
//! residual-encoder presets `nnUNetPlannerResEnc{M,L,XL}` (nnUNetResEncUNet{M,L,XL}Plans), from a
//! dataset.json and nnU-Net's dataset fingerprint, into nnU-Net's plans schema: 2d, 3d_fullres,
//! 3d_lowres and 3d_cascade_fullres as nnU-Net writes them (its VRAM estimate counts feature-map
//! elements against fitted reference values; segk's exact memory model is stated beside the
//! plan, never used to change it). tests/fixtures/nnunet_plans holds nnU-Net's own output for
//! eleven generated datasets; the files written here are byte-identical to it.

use super::plans_json::{ArchKwargs, Architecture, Configuration, Ordered, PlansJson, ResamplingKwargs};
use super::spacing::{target_spacing, transpose_forward};
use crate::dataset::DatasetJson;
use crate::preprocess::normalize::Scheme;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;

/// One of nnU-Net's planners: its names and the constants that differ between them.
#[derive(Clone, Copy, Debug)]
pub struct Planner {
    /// The class name nnU-Net's `-pl` takes and writes as `experiment_planner_used`.
    pub class: &'static str,
    pub plans_name: &'static str,
    /// GPU memory the reference values were fitted for, and the default target.
    pub reference_gb: f64,
    pub reference_3d: f64,
    pub reference_2d: f64,
    /// Largest share of the dataset's voxels one batch may cover.
    pub max_dataset_covered: f64,
    pub residual: bool,
}

pub const PLANNERS: [Planner; 4] = [
    Planner { class: "ExperimentPlanner", plans_name: "nnUNetPlans", reference_gb: 8.0, reference_3d: 560e6, reference_2d: 85e6, max_dataset_covered: 0.05, residual: false },
    Planner { class: "nnUNetPlannerResEncM", plans_name: "nnUNetResEncUNetMPlans", reference_gb: 8.0, reference_3d: 680e6, reference_2d: 135e6, max_dataset_covered: 1.0, residual: true },
    Planner { class: "nnUNetPlannerResEncL", plans_name: "nnUNetResEncUNetLPlans", reference_gb: 24.0, reference_3d: 2100e6, reference_2d: 380e6, max_dataset_covered: 1.0, residual: true },
    Planner { class: "nnUNetPlannerResEncXL", plans_name: "nnUNetResEncUNetXLPlans", reference_gb: 40.0, reference_3d: 3600e6, reference_2d: 560e6, max_dataset_covered: 1.0, residual: true },
];

/// The planner `-pl NAME` names: its class name (nnU-Net's spelling) or its plans name.
pub fn planner(name: &str) -> Result<&'static Planner> {
    PLANNERS.iter().find(|p| p.class == name || p.plans_name == name).ok_or_else(|| {
        anyhow::anyhow!("no planner named {name:?}: nnU-Net's are {}", PLANNERS.iter().map(|p| p.class).collect::<Vec<_>>().join(", "))
    })
}

const BASE_FEATURES: usize = 32;
const MAX_FEATURES_3D: usize = 320;
const MAX_FEATURES_2D: usize = 512;
const MIN_EDGE: f64 = 4.0;
const REF_BATCH_3D: f64 = 2.0;
const REF_BATCH_2D: f64 = 12.0;
const MIN_BATCH: usize = 2;
const LOWRES_THRESHOLD: f64 = 0.25;
const LOWRES_STEP: f64 = 1.03;
const RESENC_BLOCKS: [usize; 13] = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6];

/// nnU-Net's dataset_fingerprint.json (the keys the planner reads and copies).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NnunetFingerprint {
    pub foreground_intensity_properties_per_channel: BTreeMap<String, serde_json::Value>,
    pub median_relative_size_after_cropping: f64,
    pub shapes_after_crop: Vec<[usize; 3]>,
    pub spacings: Vec<[f64; 3]>,
}

impl NnunetFingerprint {
    /// The same facts from segk's own fingerprint.
    pub fn from_segk(fp: &super::fingerprint::Fingerprint) -> Result<NnunetFingerprint> {
        let stats = fp.foreground_intensity_properties_per_channel.iter().enumerate().map(|(c, s)| Ok((c.to_string(), serde_json::to_value(s)?))).collect::<Result<_>>()?;
        Ok(NnunetFingerprint {
            foreground_intensity_properties_per_channel: stats,
            median_relative_size_after_cropping: median(&fp.relative_size_after_cropping),
            shapes_after_crop: fp.shapes_after_crop.clone(),
            spacings: fp.spacings.clone(),
        })
    }
}

/// np.median: the middle value, or the mean of the two middle values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Python's round(): to nearest, ties to even.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// nnU-Net's network topology for a patch: strides and kernels per stage, the patch padded to
/// a multiple of the total stride (the divisor).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolProps {
    pub strides: Vec<Vec<usize>>,
    pub kernels: Vec<Vec<usize>>,
    pub patch: Vec<usize>,
    pub divisor: Vec<usize>,
}

/// get_pool_and_conv_props (min edge 4, no pooling limit): pool the axes at least 8 voxels long
/// whose spacing is under twice the finest such axis; kernel 3 once an axis's spacing is under
/// twice the finest overall.
pub fn pool_and_conv(spacing: &[f64], patch: &[f64]) -> PoolProps {
    let dim = spacing.len();
    let (mut sp, mut size) = (spacing.to_vec(), patch.to_vec());
    let (mut strides, mut kernels) = (vec![vec![1; dim]], Vec::new());
    let mut pools = vec![0u32; dim];
    let mut kernel = vec![1; dim];
    loop {
        let valid: Vec<usize> = (0..dim).filter(|&a| size[a] >= 2.0 * MIN_EDGE).collect();
        if valid.is_empty() {
            break;
        }
        let finest = valid.iter().map(|&a| sp[a]).fold(f64::INFINITY, f64::min);
        let valid: Vec<usize> = valid.into_iter().filter(|&a| sp[a] / finest < 2.0).collect();
        if valid.len() == 1 && size[valid[0]] < 3.0 * MIN_EDGE {
            break;
        }
        if valid.is_empty() {
            break;
        }
        let finest_all = sp.iter().copied().fold(f64::INFINITY, f64::min);
        for a in 0..dim {
            if kernel[a] == 1 && sp[a] / finest_all < 2.0 {
                kernel[a] = 3;
            }
        }
        let mut stride = vec![1; dim];
        for &a in &valid {
            stride[a] = 2;
            pools[a] += 1;
            sp[a] *= 2.0;
            size[a] = (size[a] / 2.0).ceil();
        }
        strides.push(stride);
        kernels.push(kernel.clone());
    }
    kernels.push(vec![3; dim]);
    let divisor: Vec<usize> = pools.iter().map(|&p| 1usize << p).collect();
    let padded = patch
        .iter()
        .zip(&divisor)
        .map(|(&p, &d)| {
            let r = p % d as f64;
            (if r == 0.0 { p } else { p + d as f64 - r }) as usize
        })
        .collect();
    PoolProps { strides, kernels, patch: padded, divisor }
}

/// Features per stage, doubling from 32 up to the cap.
pub fn features(stages: usize, dim: usize) -> Vec<usize> {
    let cap = if dim == 2 { MAX_FEATURES_2D } else { MAX_FEATURES_3D };
    (0..stages).map(|s| (BASE_FEATURES << s).min(cap)).collect()
}

/// nnU-Net's static VRAM estimate: feature-map elements of the network (no deep-supervision
/// heads, no input channels, no batch), which its reference values were fitted to.
fn estimate(p: &Planner, t: &PoolProps, labels: usize) -> f64 {
    let n = t.strides.len();
    let f = features(n, t.patch.len());
    let mut size = t.patch.clone();
    let mut voxels = Vec::with_capacity(n);
    for s in &t.strides {
        size = size.iter().zip(s).map(|(a, b)| a / b).collect();
        voxels.push(size.iter().product::<usize>() as f64);
    }
    let mut total = 0.0;
    if p.residual {
        total += f[0] as f64 * voxels[0];
        for s in 0..n {
            total += 2.0 * RESENC_BLOCKS[s] as f64 * f[s] as f64 * voxels[s];
            if s >= 1 {
                total += f[s] as f64 * voxels[s];
            }
        }
    } else {
        total += (0..n).map(|s| 2.0 * f[s] as f64 * voxels[s]).sum::<f64>();
    }
    let dec_convs = if p.residual { 1.0 } else { 2.0 };
    total += (0..n - 1).map(|l| (dec_convs + 1.0) * f[l] as f64 * voxels[l]).sum::<f64>();
    total + labels as f64 * voxels[0]
}

/// nnU-Net's first patch: 1/spacing scaled to 256^3 voxels (2048^2 in 2d), clipped to the
/// median shape.
pub fn initial_patch(spacing: &[f64], median: &[f64]) -> Vec<f64> {
    let inv: Vec<f64> = spacing.iter().map(|s| 1.0 / s).collect();
    let prod: f64 = inv.iter().product();
    let k = if spacing.len() == 3 { (256f64.powi(3) / prod).powf(1.0 / 3.0) } else { (2048f64.powi(2) / prod).powf(0.5) };
    inv.iter().zip(median).map(|(v, &m)| py_round(v * k).min(m)).collect()
}

/// One step of nnU-Net's patch-shrinking loop: the axis whose patch is largest against the
/// median (ties to the last axis) loses what keeps the patch divisible, and the topology is
/// planned again.
pub fn shrink(spacing: &[f64], median: &[f64], t: &PoolProps) -> PoolProps {
    let ratio: Vec<f64> = t.patch.iter().zip(median).map(|(&a, &m)| a as f64 / m).collect();
    let axis = (0..ratio.len()).fold(0, |best, a| if ratio[a] >= ratio[best] { a } else { best });
    let mut tmp: Vec<f64> = t.patch.iter().map(|&v| v as f64).collect();
    tmp[axis] -= t.divisor[axis] as f64;
    let step = pool_and_conv(spacing, &tmp).divisor[axis];
    let mut patch: Vec<f64> = t.patch.iter().map(|&v| v as f64).collect();
    patch[axis] -= step as f64;
    pool_and_conv(spacing, &patch)
}

/// What a configuration is planned from.
struct Request<'a> {
    spacing: Vec<f64>,
    /// Median shape in this configuration's voxels (nnU-Net keeps x.5 for 2d and 3d_fullres).
    median: Vec<f64>,
    median_is_int: bool,
    data_identifier: String,
    approx_dataset_voxels: f64,
    json: &'a DatasetJson,
    use_mask: &'a [bool],
    schemes: &'a [String],
}

fn plan_configuration(p: &Planner, gpu_gb: f64, r: &Request) -> Configuration {
    let dim = r.spacing.len();
    let mut t = pool_and_conv(&r.spacing, &initial_patch(&r.spacing, &r.median));
    let labels = r.json.labels.len();
    let (reference, ref_bs) = if dim == 2 { (p.reference_2d, REF_BATCH_2D) } else { (p.reference_3d, REF_BATCH_3D) };
    let reference = reference * gpu_gb / p.reference_gb;
    let over = |est: f64| if p.residual { est > reference } else { est / ref_bs * 2.0 > reference };
    let mut est = estimate(p, &t, labels);
    while over(est) {
        t = shrink(&r.spacing, &r.median, &t);
        est = estimate(p, &t, labels);
    }
    let bs = py_round(reference / est * ref_bs);
    let cap = py_round(r.approx_dataset_voxels * p.max_dataset_covered / t.patch.iter().map(|&v| v as f64).product::<f64>());
    let batch = (bs.min(cap) as usize).max(MIN_BATCH);
    let n = t.strides.len();
    let median = r.median.iter().map(|&m| if r.median_is_int { serde_json::Number::from(m as i64) } else { serde_json::Number::from_f64(m).unwrap_or_else(|| 0.into()) }).collect();
    with_default_preprocessing(Configuration {
        data_identifier: Some(r.data_identifier.clone()),
        batch_size: Some(batch),
        patch_size: Some(t.patch.clone()),
        median_image_size_in_voxels: Some(median),
        spacing: Some(r.spacing.clone()),
        normalization_schemes: Some(r.schemes.to_vec()),
        use_mask_for_norm: Some(r.use_mask.to_vec()),
        architecture: Some(Architecture::nnunet(p.residual, ArchKwargs::new(p.residual, dim, features(n, dim), t.kernels.clone(), t.strides.clone(), &RESENC_BLOCKS))),
        ..Configuration::default()
    })
}

/// nnU-Net's DefaultPreprocessor with its resampling functions (third order for images,
/// linear for labels and probabilities, a separate z axis when anisotropic).
pub fn with_default_preprocessing(c: Configuration) -> Configuration {
    Configuration {
        preprocessor_name: Some("DefaultPreprocessor".into()),
        resampling_fn_data: Some(RESAMPLE.into()),
        resampling_fn_seg: Some(RESAMPLE.into()),
        resampling_fn_data_kwargs: Some(ResamplingKwargs::new(false, 3)),
        resampling_fn_seg_kwargs: Some(ResamplingKwargs::new(true, 1)),
        resampling_fn_probabilities: Some(RESAMPLE.into()),
        resampling_fn_probabilities_kwargs: Some(ResamplingKwargs::new(false, 1)),
        ..c
    }
}

const RESAMPLE: &str = "resample_data_or_seg_to_shape";

fn permute<T: Copy>(v: &[T], order: &[usize]) -> Vec<T> {
    order.iter().map(|&a| v[a]).collect()
}

/// nnU-Net's plan_experiment for planner `p`: the plans an nnU-Net user gets from
/// `nnUNetv2_plan_experiment -pl CLASS` (`gpu_gb`: its `-gpu_memory_target`, default the
/// planner's own).
pub fn plan_experiment(p: &Planner, dataset_name: &str, json: &DatasetJson, fp: &NnunetFingerprint, image_reader_writer: &str, gpu_gb: Option<f64>) -> Result<PlansJson> {
    ensure!(!fp.spacings.is_empty() && fp.spacings.len() == fp.shapes_after_crop.len(), "the fingerprint has {} spacings and {} shapes", fp.spacings.len(), fp.shapes_after_crop.len());
    let gpu_gb = gpu_gb.unwrap_or(p.reference_gb);
    ensure!(gpu_gb.is_finite() && gpu_gb > 0.0, "the GPU memory target must be a positive number of GB, got {gpu_gb}");
    let spacing = target_spacing(&fp.spacings, &fp.shapes_after_crop);
    let tf = transpose_forward(spacing);
    let mut tb = [0; 3];
    for (i, &a) in tf.iter().enumerate() {
        tb[a] = i;
    }
    let resampled: Vec<[f64; 3]> = fp.spacings.iter().zip(&fp.shapes_after_crop).map(|(s, n)| std::array::from_fn(|a| py_round(s[a] / spacing[a] * n[a] as f64))).collect();
    let median_shape: Vec<f64> = (0..3).map(|a| median(&resampled.iter().map(|r| r[a]).collect::<Vec<_>>())).collect();
    let (sp_t, med_t) = (permute(&spacing, &tf), permute(&median_shape, &tf));
    let approx = med_t.iter().product::<f64>() * json.num_training as f64;

    let mut channels: Vec<(usize, &String)> = json.channel_names.iter().map(|(k, v)| Ok((k.parse::<usize>().map_err(|_| anyhow::anyhow!("channel_names key {k:?} is not a number"))?, v))).collect::<Result<_>>()?;
    channels.sort();
    let schemes: Vec<Scheme> = channels.iter().map(|(_, n)| Scheme::for_channel(n)).collect();
    let masked = fp.median_relative_size_after_cropping < 0.75;
    let use_mask: Vec<bool> = schemes.iter().map(|s| masked && s.can_use_mask()).collect();
    let schemes: Vec<String> = schemes.iter().map(|s| s.name().to_string()).collect();
    let id = |config: &str| {
        let shared = p.residual && config != "3d_lowres";
        format!("{}_{config}", if shared { "nnUNetPlans" } else { p.plans_name })
    };
    let request = |spacing: Vec<f64>, median: Vec<f64>, median_is_int, config: &str, approx| Request { spacing, median, median_is_int, data_identifier: id(config), approx_dataset_voxels: approx, json, use_mask: &use_mask, schemes: &schemes };

    let mut configurations = Vec::new();
    let mut fullres = None;
    let mut lowres = None;
    if med_t[0] != 1.0 {
        let full = plan_configuration(p, gpu_gb, &request(sp_t.clone(), med_t.clone(), false, "3d_fullres", approx));
        let full_patch = full.patch_size.clone().unwrap_or_default();
        let mut patch_voxels: f64 = full_patch.iter().map(|&v| v as f64).product();
        let mut median_voxels: f64 = med_t.iter().product();
        let mut low_spacing = sp_t.clone();
        let mut low = None;
        while patch_voxels / median_voxels < LOWRES_THRESHOLD {
            let max = low_spacing.iter().copied().fold(f64::MIN, f64::max);
            if low_spacing.iter().any(|&s| max / s > 2.0) {
                for s in low_spacing.iter_mut().filter(|s| max / **s > 2.0) {
                    *s *= LOWRES_STEP;
                }
            } else {
                low_spacing.iter_mut().for_each(|s| *s *= LOWRES_STEP);
            }
            let scaled: Vec<f64> = sp_t.iter().zip(&low_spacing).zip(&med_t).map(|((f, l), m)| f / l * m).collect();
            median_voxels = scaled.iter().product();
            let c = plan_configuration(p, gpu_gb, &request(low_spacing.clone(), scaled.iter().map(|&v| py_round(v)).collect(), true, "3d_lowres", median_voxels * json.num_training as f64));
            patch_voxels = c.patch_size.as_ref().map(|v| v.iter().map(|&x| x as f64).product()).unwrap_or(f64::INFINITY);
            low = Some(c);
        }
        if med_t.iter().product::<f64>() / median_voxels >= 2.0 {
            lowres = low;
        }
        fullres = Some(full);
    }
    let mut two_d = plan_configuration(p, gpu_gb, &request(sp_t[1..].to_vec(), med_t[1..].to_vec(), false, "2d", approx));
    two_d.batch_dice = Some(true);
    configurations.push(("2d".to_string(), two_d));
    if let Some(mut l) = lowres.clone() {
        l.batch_dice = Some(false);
        l.next_stage = Some(serde_json::Value::from("3d_cascade_fullres"));
        configurations.push(("3d_lowres".into(), l));
    }
    if let Some(mut f) = fullres {
        f.batch_dice = Some(lowres.is_some());
        configurations.push(("3d_fullres".into(), f));
    }
    if lowres.is_some() {
        configurations.push(("3d_cascade_fullres".into(), Configuration { inherits_from: Some("3d_fullres".into()), previous_stage: Some("3d_lowres".into()), ..Configuration::default() }));
    }
    let raw_spacing: Vec<f64> = (0..3).map(|a| median(&fp.spacings.iter().map(|s| s[a]).collect::<Vec<_>>())).collect();
    let raw_shape: Vec<f64> = (0..3).map(|a| median(&fp.shapes_after_crop.iter().map(|s| s[a] as f64).collect::<Vec<_>>())).collect();
    if json.channel_names.len() != fp.foreground_intensity_properties_per_channel.len() {
        bail!("dataset.json has {} channels, the fingerprint intensity statistics for {}", json.channel_names.len(), fp.foreground_intensity_properties_per_channel.len());
    }
    Ok(PlansJson {
        dataset_name: dataset_name.to_string(),
        plans_name: p.plans_name.to_string(),
        original_median_spacing_after_transp: permute(&raw_spacing, &tf),
        original_median_shape_after_transp: permute(&raw_shape, &tf).iter().map(|&v| py_round(v) as i64).collect(),
        image_reader_writer: image_reader_writer.to_string(),
        transpose_forward: tf.to_vec(),
        transpose_backward: tb.to_vec(),
        configurations: Ordered(configurations),
        experiment_planner_used: p.class.to_string(),
        label_manager: "LabelManager".into(),
        foreground_intensity_properties_per_channel: serde_json::to_value(&fp.foreground_intensity_properties_per_channel)?,
        extra: Default::default(),
    })
}

/// Where a plans file of `plans_name` lives in a preprocessed folder.
pub fn plans_path(dir: &std::path::Path, plans_name: &str) -> std::path::PathBuf {
    dir.join(format!("{plans_name}.json"))
}

/// What `segk plan -pl` did with the plans file.
pub enum Written {
    New,
    Same,
    /// A different file was there (nnU-Net's own, or an edited one): kept as it is.
    KeptDifferent,
}

/// Writes nnU-Net's plans into `dir` as nnU-Net names and formats them; an existing file with
/// other contents is never replaced (it may be nnU-Net's or the user's own).
pub fn write_plans(dir: &std::path::Path, plans: &PlansJson) -> Result<(std::path::PathBuf, Written)> {
    let path = plans_path(dir, &plans.plans_name);
    let bytes = super::plans_json::to_python_json(plans)?;
    if path.exists() {
        let same = std::fs::read(&path).map(|old| old == bytes).unwrap_or(false);
        return Ok((path, if same { Written::Same } else { Written::KeptDifferent }));
    }
    crate::store::write_atomic_via(&path, &format!(".{}.tmp", std::process::id()), |w| w.write_all(&bytes))?;
    Ok((path, Written::New))
}

/// segk's network for a configuration of a plans file, when segk can train it: a 3D
/// PlainConvUNet with as many encoder as decoder convs per stage, or a ResidualEncoderUNet
/// (the ResEnc presets) with one decoder conv count.
pub fn segk_topology(c: &Configuration, json: &DatasetJson) -> Result<crate::model::Topology> {
    let arch = c.architecture.as_ref().ok_or_else(|| anyhow::anyhow!("the configuration has no architecture"))?;
    let a = &arch.arch_kwargs;
    let residual = arch.network_class_name == super::plans_json::RESENC_UNET;
    ensure!(residual || arch.network_class_name == super::plans_json::PLAIN_UNET, "segk does not train {} (PlainConvUNet and ResidualEncoderUNet only)", arch.network_class_name.rsplit('.').next().unwrap_or(""));
    let dims = a.kernel_sizes.first().map_or(0, Vec::len);
    ensure!(dims == 2 || dims == 3, "kernel sizes of {dims} axes: neither a 2d nor a 3d network");
    ensure!(a.kernel_sizes.iter().chain(&a.strides).all(|k| k.len() == dims), "kernel sizes and strides mix 2d and 3d");
    let dec = &a.n_conv_per_stage_decoder;
    ensure!(!dec.is_empty() && dec.iter().all(|&n| n == dec[0]), "segk's U-Net decoder has one conv count for every stage, the plans have {dec:?}");
    let blocks = match residual {
        true => a.n_blocks_per_stage.clone().ok_or_else(|| anyhow::anyhow!("a ResidualEncoderUNet's arch_kwargs need n_blocks_per_stage"))?,
        false => {
            let convs = a.n_conv_per_stage.clone().unwrap_or_default();
            ensure!(convs.iter().all(|&n| n == dec[0]), "segk's PlainConvUNet has one conv count for every stage, the plans have {convs:?} and {dec:?}");
            Vec::new()
        }
    };
    ensure!(a.conv_bias || !residual, "segk's residual encoder has conv biases, as nnU-Net's ResEnc plans do (conv_bias true)");
    // A 2d net runs as a 3D one over patches one slice deep.
    let triple = |v: &Vec<usize>| if dims == 2 { [1, v[0], v[1]] } else { [v[0], v[1], v[2]] };
    let regions = if json.has_regions() { json.regions() } else { Vec::new() };
    let t = crate::model::Topology {
        // A cascade stage also takes the previous stage's labels, one-hot per foreground label.
        in_channels: json.channels() + if c.previous_stage.is_some() { json.foreground_values().len() } else { 0 },
        n_classes: if regions.is_empty() { json.labels.keys().filter(|k| *k != "ignore").count().max(2) } else { regions.len() },
        features: a.features_per_stage.clone(),
        kernels: a.kernel_sizes.iter().map(triple).collect(),
        strides: a.strides.iter().map(triple).collect(),
        convs_per_stage: dec[0],
        deep_supervision: true,
        dice: if c.batch_dice.unwrap_or(false) { crate::backend::DiceMode::Batch } else { crate::backend::DiceMode::PerSample },
        ignore_label: json.ignore_label().is_some(),
        regions,
        blocks_per_stage: blocks,
        planar: dims == 2,
    };
    t.validate()?;
    Ok(t)
}

/// A configuration's patch as segk runs it: a 2d patch is one slice deep.
pub fn patch_3d(patch: &[usize]) -> Result<[usize; 3]> {
    match *patch {
        [h, w] => Ok([1, h, w]),
        [d, h, w] => Ok([d, h, w]),
        _ => bail!("a patch of {} axes ({patch:?}): neither 2d nor 3d", patch.len()),
    }
}

/// A configuration with what it inherits filled in (nnU-Net's get_configuration).
pub fn resolve(plans: &PlansJson, name: &str) -> Result<Configuration> {
    let mut chain = vec![name.to_string()];
    let mut c = plans.configurations.get(name).cloned().ok_or_else(|| anyhow::anyhow!("the plans {} have no configuration {name:?} (they have {})", plans.plans_name, plans.configurations.keys().collect::<Vec<_>>().join(", ")))?;
    while let Some(parent) = c.inherits_from.take() {
        ensure!(!chain.contains(&parent), "configuration {name:?} inherits from itself through {}", chain.join(" -> "));
        chain.push(parent.clone());
        let base = plans.configurations.get(&parent).cloned().ok_or_else(|| anyhow::anyhow!("configuration {name:?} inherits from {parent:?}, which the plans do not have"))?;
        let child = serde_json::to_value(&c)?;
        let mut merged = serde_json::to_value(&base)?;
        if let (Some(m), Some(ch)) = (merged.as_object_mut(), child.as_object()) {
            for (k, v) in ch {
                m.insert(k.clone(), v.clone());
            }
        }
        c = serde_json::from_value(merged)?;
    }
    Ok(c)
}

/// Lines saying what each configuration is and what it needs on a GPU with segk.
pub fn describe(plans: &PlansJson, json: &DatasetJson) -> Vec<String> {
    use crate::model::plan::activation_bytes;
    use crate::model::Checkpointing;
    let mut out = Vec::new();
    for name in plans.configurations.keys() {
        let Ok(c) = resolve(plans, name) else { continue };
        let (patch, batch) = (c.patch_size.clone().unwrap_or_default(), c.batch_size.unwrap_or(0));
        let x = |v: &[usize]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>().join("x");
        let spacing: Vec<String> = c.spacing.clone().unwrap_or_default().iter().map(|s| format!("{s:.3}")).collect();
        let stages = c.architecture.as_ref().map_or(0, |a| a.arch_kwargs.n_stages);
        let mut line = format!("{name}: patch {}, batch {batch}, spacing {} mm, {stages} stages", x(&patch), spacing.join(" x "));
        if let Some(prev) = &c.previous_stage {
            line += &format!(", after {prev}");
        }
        out.push(line);
        let need = segk_topology(&c, json).and_then(|t| {
            let params = crate::model::params::ParamLayout::new(&t).len;
            let p3 = patch_3d(&patch)?;
            (0..=2u8)
                .map(|l| Ok(params * (3 * 4 + 2) + activation_bytes(&t, p3, batch, Checkpointing::from_level(l)?, super::plans::GPU_ACT_BYTES, 4)?))
                .collect::<Result<Vec<usize>>>()
        });
        out.push(match need {
            Ok(b) => format!("  segk on a GPU needs {:.2} / {:.2} / {:.2} GiB at checkpoint levels 0 / 1 / 2 (exact, bf16 activations)", b[0] as f64 / super::plans::GIB, b[1] as f64 / super::plans::GIB, b[2] as f64 / super::plans::GIB),
            Err(e) => format!("  {e:#}"),
        });
    }
    out
}
