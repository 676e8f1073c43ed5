//! `segk evaluate PRED_DIR GT_DIR`: per case and per label TP/FP/FN/TN, Dice and IoU, the
//! means over cases and over foreground labels, written as nnU-Net's summary.json (same keys;
//! a Dice or IoU with nothing in either map is NaN there and null here) and printed as a table.
//! With an ignore label, the reference's ignore voxels are left out of every count, as
//! nnU-Net's compute_metrics does.

use crate::imageio;
use anyhow::{bail, ensure, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Metrics {
    #[serde(rename = "Dice")]
    pub dice: Option<f64>,
    #[serde(rename = "IoU")]
    pub iou: Option<f64>,
    #[serde(rename = "TP")]
    pub tp: f64,
    #[serde(rename = "FP")]
    pub fp: f64,
    #[serde(rename = "FN")]
    pub fn_: f64,
    #[serde(rename = "TN")]
    pub tn: f64,
    pub n_pred: f64,
    pub n_ref: f64,
}

/// Counts and scores of one label, or one region (the voxels of any of its labels), in one pair
/// of maps, without the voxels whose reference is the `ignore` label.
pub fn metrics(pred: &[f32], reference: &[f32], region: &[f32], ignore: Option<f32>) -> Metrics {
    let (mut tp, mut fp, mut fn_, mut counted) = (0u64, 0u64, 0u64, 0u64);
    for (&p, &r) in pred.iter().zip(reference) {
        if Some(r) == ignore {
            continue;
        }
        counted += 1;
        match (region.contains(&p), region.contains(&r)) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            _ => {}
        }
    }
    let tn = counted - tp - fp - fn_;
    let any = tp + fp + fn_ > 0;
    Metrics {
        dice: any.then(|| 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64),
        iou: any.then(|| tp as f64 / (tp + fp + fn_) as f64),
        tp: tp as f64,
        fp: fp as f64,
        fn_: fn_ as f64,
        tn: tn as f64,
        n_pred: (tp + fp) as f64,
        n_ref: (tp + fn_) as f64,
    }
}

/// Mean of each field over `m` (Dice and IoU over the cases where they exist, as nanmean).
pub fn mean(m: &[Metrics]) -> Metrics {
    let avg = |f: &dyn Fn(&Metrics) -> Option<f64>| {
        let v: Vec<f64> = m.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let avg0 = |f: &dyn Fn(&Metrics) -> f64| avg(&|x| Some(f(x))).unwrap_or(0.0);
    Metrics { dice: avg(&|x| x.dice), iou: avg(&|x| x.iou), tp: avg0(&|x| x.tp), fp: avg0(&|x| x.fp), fn_: avg0(&|x| x.fn_), tn: avg0(&|x| x.tn), n_pred: avg0(&|x| x.n_pred), n_ref: avg0(&|x| x.n_ref) }
}

/// The mean over labels of their means, as nnU-Net's np.mean: a label whose Dice (or IoU) is
/// missing in every case leaves the foreground's missing too (nnU-Net's NaN).
pub fn foreground_mean(per_label: &[Metrics]) -> Metrics {
    let mut m = mean(per_label);
    if per_label.iter().any(|l| l.dice.is_none()) {
        m.dice = None;
    }
    if per_label.iter().any(|l| l.iou.is_none()) {
        m.iou = None;
    }
    m
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub metrics: BTreeMap<String, Metrics>,
    pub prediction_file: String,
    pub reference_file: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub foreground_mean: Metrics,
    pub mean: BTreeMap<String, Metrics>,
    pub metric_per_case: Vec<CaseResult>,
}

/// The label maps in `dir`: files of every image ending segk reads, hidden ones left out.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let v = crate::dataset::files_with(dir, "")?;
    Ok(v.into_iter().filter(|p| p.file_name().map(|n| n.to_string_lossy().to_string()).is_some_and(|n| !n.starts_with('.') && crate::imageio::is_image_file(&n))).collect())
}

/// Evaluates every reference in `gt` against the prediction of the same file name in `pred`.
/// `labels`: the labels or regions to score (default: every nonzero label in the references
/// but the ignore label).
pub fn evaluate(pred: &Path, gt: &Path, labels: Option<Vec<Vec<i64>>>, ignore: Option<i64>) -> Result<Summary> {
    let refs = image_files(gt)?;
    ensure!(!refs.is_empty(), "{}: no reference label maps ({})", gt.display(), crate::imageio::ENDINGS.join(", "));
    let pairs: Vec<(PathBuf, PathBuf)> = refs.iter().map(|r| (pred.join(r.file_name().unwrap_or_default()), r.clone())).collect();
    let missing: Vec<String> = pairs.iter().filter(|(p, _)| !p.is_file()).map(|(_, r)| r.file_name().unwrap_or_default().to_string_lossy().to_string()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        bail!("{}: no prediction for {} of the {} references in {}: {shown}{more}", pred.display(), missing.len(), refs.len(), gt.display());
    }
    evaluate_pairs(&pairs, labels, ignore)
}

/// Evaluates (prediction, reference) file pairs.
pub fn evaluate_pairs(pairs: &[(PathBuf, PathBuf)], labels: Option<Vec<Vec<i64>>>, ignore: Option<i64>) -> Result<Summary> {
    // One pair in memory at a time; without labels given, a first pass over the references
    // finds them.
    let labels = match labels {
        Some(l) => l,
        None => {
            let mut l = std::collections::BTreeSet::new();
            for (_, r) in pairs {
                l.extend(imageio::read(r)?.data.iter().map(|&v| v as i64).filter(|&v| v != 0 && Some(v) != ignore));
            }
            l.into_iter().map(|v| vec![v]).collect()
        }
    };
    let mut per_case = Vec::new();
    for (p, r) in pairs {
        let (pv, rv) = (imageio::read(p)?, imageio::read(r)?);
        ensure!(pv.shape == rv.shape, "{}: shape {:?} differs from the reference's {:?}", p.display(), pv.shape, rv.shape);
        let m = labels.iter().map(|l| (key(l), metrics(&pv.data, &rv.data, &l.iter().map(|&v| v as f32).collect::<Vec<_>>(), ignore.map(|i| i as f32)))).collect();
        per_case.push(CaseResult { metrics: m, prediction_file: p.display().to_string(), reference_file: r.display().to_string() });
    }
    let mean_per_label: BTreeMap<String, Metrics> = labels
        .iter()
        .map(|l| {
            let k = key(l);
            let ms: Vec<Metrics> = per_case.iter().map(|c| c.metrics[&k]).collect();
            (k, mean(&ms))
        })
        .collect();
    let fg: Vec<Metrics> = mean_per_label.values().copied().collect();
    Ok(Summary { foreground_mean: foreground_mean(&fg), mean: mean_per_label, metric_per_case: per_case })
}

/// nnU-Net's summary key of a label ("2") or a region ("(1, 2, 3)", Python's tuple).
pub fn key(region: &[i64]) -> String {
    match region {
        [one] => one.to_string(),
        many => format!("({})", many.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// The summary as a readable table: one row per label, then the foreground mean.
pub fn table(s: &Summary) -> String {
    let f = |v: Option<f64>| v.map_or("   -  ".to_string(), |x| format!("{x:.4}"));
    let mut out = format!("{:>8}  {:>6}  {:>6}  {:>12}  {:>12}  {:>12}   (means over cases; voxel counts)\n", "label", "Dice", "IoU", "TP", "FP", "FN");
    for (l, m) in &s.mean {
        out += &format!("{l:>8}  {}  {}  {:>12.1}  {:>12.1}  {:>12.1}\n", f(m.dice), f(m.iou), m.tp, m.fp, m.fn_);
    }
    out += &format!("{:>8}  {}  {}\n", "mean", f(s.foreground_mean.dice), f(s.foreground_mean.iou));
    out
}
