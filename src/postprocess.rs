//! nnU-Net's postprocessing: keep only the largest connected component of some labels (the
//! whole foreground, then each label or region), each step accepted only when it raises the
//! cross-validation Dice (`determine`), recorded in nnU-Net's postprocessing.json and applied to
//! prediction folders (`apply_folder`).
//!
//! Components are 26-connected (skimage's full connectivity, which nnU-Net uses); components
//! tied for largest are all kept, as nnU-Net's filter keeps every one of maximal size.

use crate::imageio;
use crate::evaluate::{key, mean, metrics, Metrics};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Keeps the largest 26-connected component(s) of the voxels holding any of `labels`; the
/// other voxels of those labels become background (0). Returns how many voxels changed.
pub fn keep_largest(data: &mut [f32], shape: [usize; 3], labels: &[i64]) -> usize {
    let (comp, sizes) = crate::morphology::components(shape, |i| labels.contains(&(data[i] as i64)));
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let mut changed = 0;
    for (v, &c) in data.iter_mut().zip(&comp) {
        if c != 0 && sizes[c as usize] < largest {
            *v = 0.0;
            changed += 1;
        }
    }
    changed
}

/// Applies the steps (each a set of labels whose largest component is kept) in order.
pub fn apply(data: &mut [f32], shape: [usize; 3], steps: &[Vec<i64>]) {
    for s in steps {
        keep_largest(data, shape, s);
    }
}

/// nnU-Net's postprocessing.json: the steps as `postprocessing_fns` (each
/// remove_all_but_largest_component_from_segmentation) and `postprocessing_kwargs`
/// (`labels_or_regions`: a label, or a list of labels whose union is one mask).
pub fn read_steps(path: &Path) -> Result<Vec<Vec<i64>>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?).with_context(|| format!("{}: not JSON", path.display()))?;
    let fns = v["postprocessing_fns"].as_array().with_context(|| format!("{}: no postprocessing_fns", path.display()))?;
    let kwargs = v["postprocessing_kwargs"].as_array().with_context(|| format!("{}: no postprocessing_kwargs", path.display()))?;
    ensure!(fns.len() == kwargs.len(), "{}: {} functions but {} argument sets", path.display(), fns.len(), kwargs.len());
    fns.iter()
        .zip(kwargs)
        .map(|(f, k)| {
            ensure!(f == "remove_all_but_largest_component_from_segmentation", "{}: unknown postprocessing function {f}", path.display());
            let labels = &k["labels_or_regions"];
            // A label, a list of labels, or a list of regions (lists): the union of their labels
            // is the mask, as nnU-Net builds it.
            let flat: Option<Vec<i64>> = match labels {
                serde_json::Value::Number(n) => n.as_i64().map(|l| vec![l]),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| match x {
                        serde_json::Value::Array(r) => r.iter().map(|y| y.as_i64()).collect::<Option<Vec<i64>>>(),
                        other => other.as_i64().map(|l| vec![l]),
                    })
                    .collect::<Option<Vec<Vec<i64>>>>()
                    .map(|v| v.concat()),
                _ => None,
            };
            flat.with_context(|| format!("{}: labels_or_regions {labels} is not a label or a list of labels", path.display()))
        })
        .collect()
}

/// The predictions in `pred` (nnU-Net scores the predicted files), each with its reference in
/// `gt` checked to be there.
fn case_names(pred: &Path, gt: &Path, ending: &str) -> Result<Vec<String>> {
    let names = crate::predict::names_in(pred, |n| n.strip_suffix(ending))?;
    ensure!(!names.is_empty(), "{}: no predicted label maps ending in {ending}", pred.display());
    for n in &names {
        let reference = gt.join(format!("{n}{ending}"));
        ensure!(reference.is_file(), "{}: no reference for the prediction {n}", reference.display());
    }
    Ok(names)
}

/// Per scored label or region of one case: its metrics.
fn case_metrics(pred: &[f32], reference: &[f32], scored: &[Vec<i64>], ignore: Option<i64>) -> Vec<Metrics> {
    scored.iter().map(|l| metrics(pred, reference, &l.iter().map(|&v| v as f32).collect::<Vec<_>>(), ignore.map(|i| i as f32))).collect()
}

/// Per case, the metrics of each scored label or region.
type PerCase = Vec<Vec<Metrics>>;

/// One pass over the cases, one case in memory at a time: each prediction with `steps`
/// applied is scored, and with each of `trials` applied on top of that. Returns per case the
/// metrics of the base and of every trial.
fn pass(pred: &Path, gt: &Path, ending: &str, names: &[String], scored: &[Vec<i64>], ignore: Option<i64>, steps: &[Vec<i64>], trials: &[Vec<i64>]) -> Result<(PerCase, Vec<PerCase>)> {
    let (mut base, mut tried) = (Vec::new(), vec![Vec::new(); trials.len()]);
    for n in names {
        let file = format!("{n}{ending}");
        let (mut p, r) = (imageio::read(&pred.join(&file))?, imageio::read(&gt.join(&file))?);
        ensure!(p.shape == r.shape, "{}: shape {:?}, the reference's {:?}", pred.join(&file).display(), p.shape, r.shape);
        apply(&mut p.data, p.shape, steps);
        base.push(case_metrics(&p.data, &r.data, scored, ignore));
        for (t, labels) in trials.iter().enumerate() {
            let mut q = p.data.clone();
            keep_largest(&mut q, p.shape, labels);
            tried[t].push(case_metrics(&q, &r.data, scored, ignore));
        }
    }
    Ok((base, tried))
}

/// Mean metrics per label or region over the cases (per case metrics in `scored` order), and
/// their foreground mean.
fn summarize(per_case: &[Vec<Metrics>], scored: &[Vec<i64>]) -> (BTreeMap<String, Metrics>, Metrics) {
    let per: BTreeMap<String, Metrics> = scored.iter().enumerate().map(|(k, l)| (key(l), mean(&per_case.iter().map(|c| c[k]).collect::<Vec<_>>()))).collect();
    let fg = crate::evaluate::foreground_mean(&per.values().copied().collect::<Vec<_>>());
    (per, fg)
}

/// Strictly better, as nnU-Net's `>` (a missing Dice is never better).
fn better(a: Option<f64>, b: Option<f64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a > b)
}

/// What `determine` decided, with the scores before and after.
pub struct Decision {
    pub steps: Vec<Vec<i64>>,
    pub before: (BTreeMap<String, Metrics>, Metrics),
    pub after: (BTreeMap<String, Metrics>, Metrics),
    pub log: Vec<String>,
}

/// nnU-Net's determine_postprocessing on a folder of cross-validation predictions: first
/// keep the largest foreground component (every foreground label as one mask), accepted when
/// the foreground mean Dice rises and no label's falls; then, when there is more than one
/// label or region, each one's largest component, accepted when its own Dice rises.
pub fn determine(pred: &Path, gt: &Path, json: &crate::dataset::DatasetJson) -> Result<Decision> {
    let scored = crate::experiment::foreground_labels(json);
    let ignore = json.ignore_label();
    let foreground = json.foreground_values();
    let ending = &json.file_ending;
    let names = case_names(pred, gt, ending)?;
    // Cases are read once per decision, never held together: memory is one case's.
    let (raw, fg_tried) = pass(pred, gt, ending, &names, &scored, ignore, &[], std::slice::from_ref(&foreground))?;
    let before = summarize(&raw, &scored);
    let (per, fg) = summarize(&fg_tried[0], &scored);
    let (mut steps, mut log) = (Vec::new(), Vec::new());
    let no_worse = per.iter().all(|(k, m)| !better(before.0[k].dice, m.dice));
    if better(fg.dice, before.1.dice) && no_worse {
        log.push(format!("keeping the largest foreground component raises the foreground mean Dice {:.5} -> {:.5}: kept", before.1.dice.unwrap_or(0.0), fg.dice.unwrap_or(0.0)));
        steps.push(foreground.clone());
    } else {
        log.push("keeping the largest foreground component does not improve the Dice: not done".into());
    }
    if scored.len() > 1 {
        // Labels of a softmax net are disjoint: one label's step leaves the others' masks as
        // they are, so every label is tried in one pass. Regions overlap: one pass each, in
        // order, on what the steps accepted before them left.
        let disjoint = !json.has_regions();
        let mut trials_done: Option<(PerCase, Vec<PerCase>)> = None;
        if disjoint {
            trials_done = Some(pass(pred, gt, ending, &names, &scored, ignore, &steps, &scored)?);
        }
        for (t, l) in scored.iter().enumerate() {
            let (base_cases, tried_cases) = match &trials_done {
                Some((b, tr)) => (b.clone(), tr[t].clone()),
                None => {
                    let (b, mut tr) = pass(pred, gt, ending, &names, &scored, ignore, &steps, std::slice::from_ref(l))?;
                    (b, tr.remove(0))
                }
            };
            let k = key(l);
            let (b, a) = (summarize(&base_cases, &scored).0[&k].dice, summarize(&tried_cases, &scored).0[&k].dice);
            if better(a, b) {
                log.push(format!("keeping the largest component of {k} raises its Dice {:.5} -> {:.5}: kept", b.unwrap_or(0.0), a.unwrap_or(0.0)));
                steps.push(l.clone());
            } else {
                log.push(format!("keeping the largest component of {k} does not raise its Dice ({:.5} -> {:.5}): not done", b.unwrap_or(0.0), a.unwrap_or(0.0)));
            }
        }
    }
    let (after_cases, _) = pass(pred, gt, ending, &names, &scored, ignore, &steps, &[])?;
    let after = summarize(&after_cases, &scored);
    Ok(Decision { steps, before, after, log })
}

/// Writes nnU-Net's postprocessing.json for `d`.
pub fn write_json(path: &Path, d: &Decision) -> Result<()> {
    let means = |m: &(BTreeMap<String, Metrics>, Metrics)| serde_json::json!({"foreground_mean": m.1, "mean": m.0});
    let kwargs: Vec<serde_json::Value> = d.steps.iter().map(|s| serde_json::json!({"labels_or_regions": if s.len() == 1 { serde_json::json!(s[0]) } else { serde_json::json!(s) }})).collect();
    let v = serde_json::json!({
        "input_folder": means(&d.before),
        "postprocessed": means(&d.after),
        "postprocessing_fns": vec!["remove_all_but_largest_component_from_segmentation"; d.steps.len()],
        "postprocessing_kwargs": kwargs,
    });
    std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", path.display()))
}

/// Applies `steps` to every label map in `input` (ending `ending`), written to `output` with
/// the input's header.
pub fn apply_folder(input: &Path, output: &Path, steps: &[Vec<i64>], ending: &str) -> Result<usize> {
    let names = crate::predict::names_in(input, |n| n.strip_suffix(ending))?;
    ensure!(!names.is_empty(), "{}: no label maps ending in {ending}", input.display());
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    for n in &names {
        let file = format!("{n}{ending}");
        let mut v = imageio::read(&input.join(&file))?;
        apply(&mut v.data, v.shape, steps);
        let labels = std::mem::take(&mut v.data);
        let v = v.labels_like(labels);
        imageio::write_atomic(&output.join(&file), &v, imageio::label_type(&v.data))?;
    }
    Ok(names.len())
}
