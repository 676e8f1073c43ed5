//! nnU-Net's postprocessing: keep only the largest connected component of some labels (the
//! whole foreground, then each label or region), each step accepted only when it raises the
//! cross-validation Dice (`determine`), recorded in nnU-Net's postprocessing.json and applied to
//! prediction folders (`apply_folder`).
//!
//! Components are 26-connected (skimage's full connectivity, which nnU-Net uses); components
//! tied for largest are all kept, as nnU-Net's filter keeps every one of maximal size.

use crate::dataset::nifti_io::{self, VoxelType};
use crate::evaluate::{key, mean, metrics, Metrics};
use anyhow::{ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Keeps the largest 26-connected component(s) of the voxels holding any of `labels`; the
/// other voxels of those labels become background (0). Returns how many voxels changed.
pub fn keep_largest(data: &mut [f32], shape: [usize; 3], labels: &[i64]) -> usize {
    let [nz, ny, nx] = shape;
    let inside = |v: f32| labels.contains(&(v as i64));
    // Component id per voxel (0: outside the mask), filled by depth-first flood fill.
    let mut comp = vec![0u32; data.len()];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..data.len() {
        if comp[start] != 0 || !inside(data[start]) {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        comp[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[id as usize] += 1;
            let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
            for dz in -1i64..=1 {
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (zz, yy, xx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
                        if zz < 0 || yy < 0 || xx < 0 || zz >= nz as i64 || yy >= ny as i64 || xx >= nx as i64 {
                            continue;
                        }
                        let j = (zz as usize * ny + yy as usize) * nx + xx as usize;
                        if comp[j] == 0 && inside(data[j]) {
                            comp[j] = id;
                            stack.push(j);
                        }
                    }
                }
            }
        }
    }
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

/// One prediction folder's cases in memory with their references: (name, shape, prediction,
/// reference).
type Cases = Vec<(String, [usize; 3], Vec<f32>, Vec<f32>)>;

/// The predictions in `pred`, each with its reference (nnU-Net scores the predicted files).
fn load_cases(pred: &Path, gt: &Path, ending: &str) -> Result<Cases> {
    let names = crate::predict::names_in(pred, |n| n.strip_suffix(ending))?;
    ensure!(!names.is_empty(), "{}: no predicted label maps ending in {ending}", pred.display());
    names
        .into_iter()
        .map(|n| {
            let file = format!("{n}{ending}");
            let reference = gt.join(&file);
            ensure!(reference.is_file(), "{}: no reference for the prediction {n}", reference.display());
            let (p, r) = (nifti_io::read(&pred.join(&file))?, nifti_io::read(&reference)?);
            ensure!(p.shape == r.shape, "{}: shape {:?}, the reference's {:?}", pred.join(&file).display(), p.shape, r.shape);
            Ok((n, p.shape, p.data, r.data))
        })
        .collect()
}

/// Mean metrics per label or region over the cases, and their foreground mean.
fn score(cases: &Cases, preds: &[Vec<f32>], scored: &[Vec<i64>], ignore: Option<i64>) -> (BTreeMap<String, Metrics>, Metrics) {
    let per: BTreeMap<String, Metrics> = scored
        .iter()
        .map(|l| {
            let region: Vec<f32> = l.iter().map(|&v| v as f32).collect();
            let ms: Vec<Metrics> = cases.iter().zip(preds).map(|(c, p)| metrics(p, &c.3, &region, ignore.map(|i| i as f32))).collect();
            (key(l), mean(&ms))
        })
        .collect();
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
    let foreground: Vec<i64> = json.label_values().into_iter().filter(|&v| v != 0 && Some(v) != ignore).collect();
    let cases = load_cases(pred, gt, &json.file_ending)?;
    let mut current: Vec<Vec<f32>> = cases.iter().map(|c| c.2.clone()).collect();
    let before = score(&cases, &current, &scored, ignore);
    let (mut steps, mut log) = (Vec::new(), Vec::new());
    let trial = |source: &[Vec<f32>], labels: &[i64]| -> Vec<Vec<f32>> {
        cases
            .iter()
            .zip(source)
            .map(|(c, p)| {
                let mut q = p.clone();
                keep_largest(&mut q, c.1, labels);
                q
            })
            .collect()
    };
    let tried = trial(&current, &foreground);
    let (per, fg) = score(&cases, &tried, &scored, ignore);
    let no_worse = per.iter().all(|(k, m)| !better(before.0[k].dice, m.dice));
    if better(fg.dice, before.1.dice) && no_worse {
        log.push(format!("keeping the largest foreground component raises the foreground mean Dice {:.5} -> {:.5}: kept", before.1.dice.unwrap_or(0.0), fg.dice.unwrap_or(0.0)));
        steps.push(foreground.clone());
        current = tried;
    } else {
        log.push("keeping the largest foreground component does not improve the Dice: not done".into());
    }
    if scored.len() > 1 {
        for l in &scored {
            let base = score(&cases, &current, &scored, ignore);
            let tried = trial(&current, l);
            let after = score(&cases, &tried, &scored, ignore);
            let k = key(l);
            let (b, a) = (base.0[&k].dice, after.0[&k].dice);
            if better(a, b) {
                log.push(format!("keeping the largest component of {k} raises its Dice {:.5} -> {:.5}: kept", b.unwrap_or(0.0), a.unwrap_or(0.0)));
                steps.push(l.clone());
                current = tried;
            } else {
                log.push(format!("keeping the largest component of {k} does not raise its Dice ({:.5} -> {:.5}): not done", b.unwrap_or(0.0), a.unwrap_or(0.0)));
            }
        }
    }
    let after = score(&cases, &current, &scored, ignore);
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
        let mut v = nifti_io::read(&input.join(&file))?;
        apply(&mut v.data, v.shape, steps);
        let ty = if v.data.iter().all(|&x| (0.0..=255.0).contains(&x)) { VoxelType::U8 } else { VoxelType::I16 };
        (v.header.scl_slope, v.header.scl_inter) = (1.0, 0.0);
        nifti_io::write(&output.join(&file), &v, ty)?;
    }
    Ok(names.len())
}
