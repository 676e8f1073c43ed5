//! Postprocessing as nnU-Net determines and applies it: the largest 26-connected component of
//! some labels kept, each step accepted only when it raises the Dice.

use segk::imageio::{self, header_for, Volume, VoxelType};
use segk::postprocess::keep_largest;
use std::path::Path;

const SHAPE: [usize; 3] = [12, 16, 16];

fn volume(data: Vec<f32>) -> Volume {
    let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let header = header_for(SHAPE, [1.0; 3], eye, [0.0; 3]);
    Volume { shape: SHAPE, spacing: [1.0; 3], affine: [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], data, header }
}

/// A box of `value` from `lo` to `hi` (exclusive), [z, y, x].
fn paint(data: &mut [f32], lo: [usize; 3], hi: [usize; 3], value: f32) {
    for z in lo[0]..hi[0] {
        for y in lo[1]..hi[1] {
            for x in lo[2]..hi[2] {
                data[(z * SHAPE[1] + y) * SHAPE[2] + x] = value;
            }
        }
    }
}

#[test]
fn keep_largest_joins_diagonal_neighbours_and_keeps_ties() {
    let n: usize = SHAPE.iter().product();
    let mut d = vec![0.0f32; n];
    paint(&mut d, [0, 0, 0], [2, 2, 2], 1.0);
    // Touches the box only at a corner: 26-connected, so the same component.
    paint(&mut d, [2, 2, 2], [3, 3, 3], 1.0);
    paint(&mut d, [8, 8, 8], [9, 9, 9], 1.0);
    let mut e = d.clone();
    assert_eq!(keep_largest(&mut e, SHAPE, &[1]), 1, "only the far voxel goes");
    assert_eq!(e.iter().filter(|&&v| v == 1.0).count(), 9);
    // Two components of equal size: both kept.
    let mut t = vec![0.0f32; n];
    paint(&mut t, [0, 0, 0], [2, 2, 2], 2.0);
    paint(&mut t, [6, 6, 6], [8, 8, 8], 2.0);
    assert_eq!(keep_largest(&mut t, SHAPE, &[2]), 0);
    // Labels outside the set are untouched; the set's union is one mask.
    let mut u = vec![0.0f32; n];
    paint(&mut u, [0, 0, 0], [2, 2, 2], 1.0);
    paint(&mut u, [0, 0, 2], [2, 2, 4], 2.0);
    paint(&mut u, [9, 9, 9], [10, 10, 10], 2.0);
    paint(&mut u, [5, 5, 5], [6, 6, 6], 3.0);
    assert_eq!(keep_largest(&mut u, SHAPE, &[1, 2]), 1);
    assert_eq!(u.iter().filter(|&&v| v == 3.0).count(), 1);
}

fn write(dir: &Path, name: &str, data: Vec<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    imageio::write(&dir.join(format!("{name}.nii.gz")), &volume(data), VoxelType::U8).unwrap();
}

/// Three cases under a fresh folder (base, gt, pred): references with a box of label 1 and
/// one of label 2, which `make` may add to before it writes the prediction from them.
fn three_cases(tag: &str, make: impl Fn(&mut [f32], &mut [f32], usize)) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let base = std::env::temp_dir().join(format!("segk-postprocess-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (gt, pred) = (base.join("gt"), base.join("pred"));
    let n: usize = SHAPE.iter().product();
    for case in 0..3 {
        let (mut r, mut p) = (vec![0.0f32; n], vec![0.0f32; n]);
        paint(&mut r, [1, 1, 1], [6, 7, 7], 1.0);
        paint(&mut r, [8, 1, 10], [11, 5, 14], 2.0);
        make(&mut r, &mut p, case);
        write(&gt, &format!("case_{case}"), r);
        write(&pred, &format!("case_{case}"), p);
    }
    (base, gt, pred)
}

/// A planted spurious component of label 1 is removed (its Dice rises); label 2's true second
/// component is kept (removing it would lower its Dice), and so is the foreground as a whole
/// (keeping only its largest component would drop label 2). The decision is written as
/// nnU-Net's postprocessing.json, which `segk postprocess` applies.
#[test]
fn determine_postprocessing_removes_what_hurts_and_keeps_what_helps() {
    let (base, gt, pred) = three_cases("labels", |r, p, case| {
        paint(r, [8, 10, 1], [10, 13, 4], 2.0);
        p.copy_from_slice(r);
        paint(p, [10, 14, 14 - case], [11, 15, 15 - case], 1.0);
    });
    std::fs::write(base.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 3, "file_ending": ".nii.gz"}"#).unwrap();
    let segk = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, text) = segk(&["determine-postprocessing", "-i", pred.to_str().unwrap(), "--ref", gt.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("largest foreground component does not improve") && text.contains("component of 1 raises its Dice") && text.contains("component of 2 does not raise"), "{text}");
    let pp: serde_json::Value = serde_json::from_slice(&std::fs::read(pred.join("postprocessing.json")).unwrap()).unwrap();
    assert_eq!(pp["postprocessing_kwargs"], serde_json::json!([{"labels_or_regions": 1}]), "{pp}");
    assert_eq!(pp["postprocessing_fns"], serde_json::json!(["remove_all_but_largest_component_from_segmentation"]));
    assert_eq!(pp["postprocessed"]["mean"]["1"]["Dice"], serde_json::json!(1.0), "{pp}");
    let out = base.join("applied");
    let json = base.join("dataset.json");
    let (ok, text) = segk(&["postprocess", "-i", pred.to_str().unwrap(), "-o", out.to_str().unwrap(), "--pp-json", pred.join("postprocessing.json").to_str().unwrap(), "--dataset-json", json.to_str().unwrap()]);
    assert!(ok, "{text}");
    for case in 0..3 {
        let f = format!("case_{case}.nii.gz");
        assert_eq!(imageio::read(&out.join(&f)).unwrap().data, imageio::read(&gt.join(&f)).unwrap().data, "{f}: the reference again");
        assert_eq!(imageio::read(&pred.join("postprocessed").join(&f)).unwrap().data, imageio::read(&gt.join(&f)).unwrap().data);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// Regions overlap, so each region's step is tried on what the steps before it left: a
/// spurious blob of label 2 goes with region (2,) while the region (1, 2), whose second true
/// component is label 2's box, keeps everything.
#[test]
fn region_postprocessing_decides_region_by_region() {
    let (base, gt, pred) = three_cases("regions", |r, p, case| {
        p.copy_from_slice(r);
        paint(p, [10, 14, 1 + case], [11, 15, 2 + case], 2.0);
    });
    std::fs::write(base.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2], "numTraining": 3, "file_ending": ".nii.gz"}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["determine-postprocessing", "-i", pred.to_str().unwrap(), "--ref", gt.to_str().unwrap()]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let pp: serde_json::Value = serde_json::from_slice(&std::fs::read(pred.join("postprocessing.json")).unwrap()).unwrap();
    assert_eq!(pp["postprocessing_kwargs"], serde_json::json!([{"labels_or_regions": 2}]), "{text}\n{pp}");
    for case in 0..3 {
        let f = format!("case_{case}.nii.gz");
        assert_eq!(imageio::read(&pred.join("postprocessed").join(&f)).unwrap().data, imageio::read(&gt.join(&f)).unwrap().data, "{f}");
    }
    let _ = std::fs::remove_dir_all(&base);
}
