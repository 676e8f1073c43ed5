//! The integrity check `segk check` (and `segk plan`) runs first: every problem of a raw
//! dataset, one line each naming the file, none fatal to the check itself.

use crate::imageio::{self, Volume};
use super::{files_with, read_json, Dataset, DatasetJson, LabelValue};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub file: PathBuf,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

fn problem(file: &Path, message: impl Into<String>) -> Problem {
    Problem { file: file.to_path_buf(), message: message.into() }
}

fn label_rules(json: &DatasetJson, file: &Path) -> Vec<Problem> {
    let mut out = Vec::new();
    match json.labels.get("background") {
        Some(LabelValue::One(0)) => {}
        _ => out.push(problem(file, "labels must declare \"background\": 0")),
    }
    if let Some(ig) = json.labels.get("ignore") {
        let max_other = json.labels.iter().filter(|(k, _)| *k != "ignore").flat_map(|(_, v)| super::values_of(v)).max().unwrap_or(0);
        match ig {
            LabelValue::One(v) if *v == max_other + 1 => {}
            _ => out.push(problem(file, format!("the \"ignore\" label must be a single value, one above the highest other label ({}), as nnU-Net requires", max_other + 1))),
        }
    }
    if json.label_values().iter().any(|&v| !(0..=255).contains(&v)) {
        out.push(problem(file, "label values must lie in 0..=255"));
    }
    if json.has_regions() {
        out.extend(region_rules(json, file));
        return out;
    }
    // No regions past this point: each label is one value.
    let mut plain: Vec<i64> = json.labels.iter().filter(|(k, _)| *k != "ignore").flat_map(|(_, v)| super::values_of(v)).collect();
    plain.sort();
    if plain.windows(2).any(|w| w[0] == w[1]) {
        out.push(problem(file, format!("two labels share a value: {plain:?}")));
    } else if plain.iter().enumerate().any(|(i, &v)| v != i as i64) {
        out.push(problem(file, format!("label values must be consecutive from 0 (nnU-Net's rule): found {plain:?}")));
    }
    out
}

/// nnU-Net's region labels (BraTS: "whole tumor": [1, 2, 3], "tumor core": [2, 3], ...): one
/// output per foreground region, and `regions_class_order` giving the label value each region
/// writes into a prediction, later regions over earlier ones.
fn region_rules(json: &DatasetJson, file: &Path) -> Vec<Problem> {
    let mut out = Vec::new();
    let regions = json.regions();
    if json.ignore_label().is_some_and(|v| v >= crate::backend::REGION_LABELS as i64) {
        out.push(problem(file, format!("with an \"ignore\" label, region label values must lie below {}", crate::backend::REGION_LABELS - 1)));
    }
    if regions.len() > crate::backend::MAX_REGIONS {
        out.push(problem(file, format!("{} regions: segk trains at most {}", regions.len(), crate::backend::MAX_REGIONS)));
    }
    for r in &regions {
        if r.is_empty() || r.iter().any(|&v| !(1..crate::backend::REGION_LABELS as i64).contains(&v)) {
            out.push(problem(file, format!("region {r:?}: region label values must lie in 1..{} (background 0 is in no region)", crate::backend::REGION_LABELS)));
        }
    }
    let mut values: Vec<i64> = regions.iter().flatten().copied().chain([0]).collect();
    values.sort();
    values.dedup();
    if values.iter().enumerate().any(|(i, &v)| v != i as i64) {
        out.push(problem(file, format!("the label values of the regions must be consecutive from 1: found {:?}", &values[1..])));
    }
    match &json.regions_class_order {
        None => out.push(problem(file, "labels are regions but regions_class_order is missing: it gives the label value each region writes into a prediction")),
        Some(order) if order.len() != regions.len() => out.push(problem(file, format!("regions_class_order has {} entries for {} foreground regions", order.len(), regions.len()))),
        Some(order) => {
            for (r, v) in regions.iter().zip(order) {
                if !r.contains(v) {
                    out.push(problem(file, format!("regions_class_order writes {v} for region {r:?}, a value outside that region")));
                }
            }
            let unreachable: Vec<i64> = values[1..].iter().copied().filter(|v| !order.contains(v)).collect();
            if !unreachable.is_empty() {
                out.push(problem(file, format!("label values {unreachable:?} are in no entry of regions_class_order: predictions could never contain them")));
            }
        }
    }
    out
}

/// Geometry of an image against its label map.
fn geometry(img: &Volume, lab: &Volume, file: &Path) -> Vec<Problem> {
    let mut out = Vec::new();
    if img.shape != lab.shape {
        out.push(problem(file, format!("shape {:?} (z,y,x) differs from the label map's {:?}", img.shape, lab.shape)));
    }
    if img.spacing.iter().zip(&lab.spacing).any(|(a, b)| (a - b).abs() > 1e-3 + 1e-4 * b.abs()) {
        out.push(problem(file, format!("spacing {:?} (z,y,x) differs from the label map's {:?}", img.spacing, lab.spacing)));
    }
    let (di, dl) = (img.directions(), lab.directions());
    if di.iter().flatten().zip(dl.iter().flatten()).any(|(a, b)| (a - b).abs() > 1e-3) {
        out.push(problem(file, "orientation (direction cosines) differs from the label map's"));
    }
    let (oi, ol) = ([img.affine[0][3], img.affine[1][3], img.affine[2][3]], [lab.affine[0][3], lab.affine[1][3], lab.affine[2][3]]);
    if oi.iter().zip(&ol).any(|(a, b)| (a - b).abs() > 1e-3 + 1e-4 * b.abs()) {
        out.push(problem(file, format!("origin {oi:?} differs from the label map's {ol:?}")));
    }
    out
}

fn read_or_report(path: &Path, out: &mut Vec<Problem>, read: fn(&Path) -> anyhow::Result<Volume>) -> Option<Volume> {
    match read(path) {
        Ok(v) => Some(v),
        Err(e) => {
            out.push(problem(path, format!("unreadable: {}", e.root_cause())));
            None
        }
    }
}

fn check_case(json: &DatasetJson, case: &super::Case, allowed: &[i64]) -> Vec<Problem> {
    let mut out = Vec::new();
    let lab = read_or_report(&case.label, &mut out, imageio::read);
    if let Some(l) = &lab {
        let mut bad: Vec<String> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for &v in &l.data {
            let key = v.to_bits();
            if seen.insert(key) && (v.fract() != 0.0 || !allowed.contains(&(v as i64))) && bad.len() < 5 {
                bad.push(format!("{v}"));
            }
        }
        if !bad.is_empty() {
            out.push(problem(&case.label, format!("label values not declared in dataset.json: {}", bad.join(", "))));
        }
    }
    let (mut channels, mut unread) = (0, false);
    for path in case.images.iter().filter(|p| p.is_file()) {
        let Some(img) = read_or_report(path, &mut out, imageio::read_channels) else {
            unread = true;
            continue;
        };
        channels += img.channels();
        let nonfinite = img.data.iter().filter(|v| !v.is_finite()).count();
        if nonfinite > 0 {
            out.push(problem(path, format!("{nonfinite} NaN/inf voxels")));
        }
        if let Some(l) = &lab {
            out.extend(geometry(&img, l, path));
        }
    }
    let declared = json.channels();
    let missing: Vec<(usize, PathBuf)> = (0..declared).map(|c| (c, super::image_path(case.images[0].parent().unwrap_or(Path::new(".")), &case.id, c, &json.file_ending))).filter(|(_, p)| !p.is_file()).collect();
    if channels < declared && !missing.is_empty() {
        for (c, path) in missing {
            let name = json.channel_names.get(&c.to_string()).cloned().unwrap_or_default();
            out.push(problem(&path, format!("missing: channel {c} ({name}) of case {}", case.id)));
        }
    } else if channels != declared && !unread && case.images.len() <= declared {
        // (More files than channels declared are each reported with the listing.)
        out.push(problem(&case.images[0], format!("case {} has {channels} channel(s) in {} file(s); dataset.json's channel_names declares {declared}", case.id, case.images.len())));
    }
    out
}

/// Every problem of the raw dataset at `root`, sorted by file.
pub fn check(root: &Path) -> Vec<Problem> {
    check_opening(root).0
}

/// The problems, and the dataset as opened to find them (when it could be).
pub fn check_opening(root: &Path) -> (Vec<Problem>, Option<Dataset>) {
    let json_path = root.join("dataset.json");
    let json = match read_json(root) {
        Ok(j) => j,
        Err(e) => return (vec![problem(&json_path, format!("{}", e.root_cause()))], None),
    };
    let mut out = label_rules(&json, &json_path);
    let ds = match Dataset::open(root) {
        Ok(d) => d,
        Err(e) => {
            out.push(problem(&root.join("labelsTr"), format!("{}", e.root_cause())));
            return (out, None);
        }
    };
    if ds.cases.len() != json.num_training {
        let others = std::fs::read_dir(root.join("labelsTr")).map(|d| d.filter_map(|e| e.ok()).filter(|e| !e.file_name().to_string_lossy().ends_with(&json.file_ending)).count()).unwrap_or(0);
        let hint = if others > 0 { format!(" (and {others} other files: file_ending is \"{}\")", json.file_ending) } else { String::new() };
        out.push(problem(&json_path, format!("numTraining is {} but labelsTr holds {} cases{hint}", json.num_training, ds.cases.len())));
    }
    let ids: std::collections::HashSet<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
    let ending = &json.file_ending;
    for img in files_with(&root.join("imagesTr"), ending).unwrap_or_default() {
        let name = img.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let stem = &name[..name.len() - ending.len()];
        let (id, channel) = super::split_channel(stem).map_or((stem, None), |(id, c)| (id, Some(c)));
        if !ids.contains(id) {
            out.push(problem(&img, "image without a label map in labelsTr"));
        } else if let Some(c) = channel.filter(|&c| c >= json.channels()) {
            out.push(problem(&img, format!("channel {c:04} is beyond dataset.json's channel_names ({} channel(s)): every CASE_XXXX file is read as a channel, as in nnU-Net", json.channels())));
        }
    }
    let allowed = json.label_values();
    out.par_extend(ds.cases.par_iter().flat_map_iter(|c| check_case(&json, c, &allowed)));
    out.sort();
    (out, Some(ds))
}
