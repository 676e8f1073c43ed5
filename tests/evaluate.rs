//! `segk evaluate` on hand-made cases with known Dice.

use segk::imageio::{self, header_for, Volume, VoxelType};
use segk::evaluate::{evaluate, metrics};

const I3: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

fn write(path: &std::path::Path, data: Vec<f32>) {
    let shape = [2, 2, 4];
    let v = Volume { shape, spacing: [1.0; 3], affine: [[0.0; 4]; 3], data, header: header_for(shape, [1.0; 3], I3, [0.0; 3]) };
    imageio::write(path, &v, VoxelType::U8).unwrap();
}

#[test]
fn dice_iou_and_counts_match_hand_computed_values() {
    let m = metrics(&[1.0, 1.0, 0.0, 2.0], &[1.0, 0.0, 1.0, 2.0], &[1.0], None);
    assert_eq!((m.tp, m.fp, m.fn_, m.tn, m.n_pred, m.n_ref), (1.0, 1.0, 1.0, 1.0, 2.0, 2.0));
    assert_eq!(m.dice, Some(0.5));
    assert_eq!(m.iou, Some(1.0 / 3.0));
    assert_eq!(metrics(&[0.0; 4], &[0.0; 4], &[1.0], None).dice, None, "nothing in either map: undefined");
    // The reference's ignore voxels (3) count nowhere, whatever was predicted there.
    let m = metrics(&[1.0, 1.0, 0.0, 2.0, 1.0, 0.0], &[1.0, 0.0, 1.0, 2.0, 3.0, 3.0], &[1.0], Some(3.0));
    assert_eq!((m.tp, m.fp, m.fn_, m.tn, m.n_pred, m.n_ref), (1.0, 1.0, 1.0, 1.0, 2.0, 2.0));

    let base = std::env::temp_dir().join(format!("segk-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (pred, gt) = (base.join("pred"), base.join("gt"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    // Case a: label 1 perfect (4 voxels), label 2 half (2 of 4 found, no false positives).
    let a_ref: Vec<f32> = (0..16).map(|i| if i < 4 { 1.0 } else if i < 8 { 2.0 } else { 0.0 }).collect();
    let a_pred: Vec<f32> = (0..16).map(|i| if i < 4 { 1.0 } else if i < 6 { 2.0 } else { 0.0 }).collect();
    // Case b: no label 2 anywhere; label 1 missed entirely.
    let b_ref: Vec<f32> = (0..16).map(|i| if i < 2 { 1.0 } else { 0.0 }).collect();
    let b_pred = vec![0.0; 16];
    write(&gt.join("a.nii.gz"), a_ref);
    write(&pred.join("a.nii.gz"), a_pred);
    write(&gt.join("b.nii.gz"), b_ref);
    write(&pred.join("b.nii.gz"), b_pred);
    let s = evaluate(&pred, &gt, None, None).unwrap();
    let d = |case: usize, l: &str| s.metric_per_case[case].metrics[l].dice;
    assert_eq!((d(0, "1"), d(0, "2"), d(1, "1"), d(1, "2")), (Some(1.0), Some(2.0 * 2.0 / (4.0 + 2.0)), Some(0.0), None));
    assert_eq!(s.mean["1"].dice, Some(0.5));
    assert_eq!(s.mean["2"].dice, Some(2.0 / 3.0), "cases without the label are left out of its mean");
    assert!((s.foreground_mean.dice.unwrap() - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("evaluate").arg(&pred).arg(&gt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pred.join("summary.json")).unwrap()).unwrap();
    assert_eq!(v["mean"]["1"]["Dice"], 0.5);
    assert!(v["metric_per_case"][1]["metrics"]["2"]["Dice"].is_null());
    assert!(String::from_utf8_lossy(&out.stdout).contains("mean"));
    // nnU-Net's `-l 1 2` spelling of the labels works as `1,2` does.
    for labels in [vec!["1", "2"], vec!["1,2"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("evaluate").arg(&pred).arg(&gt).arg("--labels").args(&labels).output().unwrap();
        assert!(out.status.success(), "{labels:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_file(pred.join("b.nii.gz")).unwrap();
    let e = evaluate(&pred, &gt, None, None).unwrap_err().to_string();
    assert!(e.contains("no prediction for 1 of the 2 references") && e.contains(": b.nii.gz"), "{e}");
}

/// `segk evaluate --ignore-label` (nnU-Net's -il) and `--dataset-json` (-djfile): ignore
/// voxels are left out, and the ignore label is not scored.
#[test]
fn ignore_label_voxels_are_not_scored() {
    let base = std::env::temp_dir().join(format!("segk-eval-ignore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (pred, gt) = (base.join("pred"), base.join("gt"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    // Label 1 on 0..4, ignore (2) on 8..16; the prediction puts 1 on 0..4 and on 8..12.
    write(&gt.join("a.nii.gz"), (0..16).map(|i| if i < 4 { 1.0 } else if i >= 8 { 2.0 } else { 0.0 }).collect());
    write(&pred.join("a.nii.gz"), (0..16).map(|i| if i < 4 || (8..12).contains(&i) { 1.0 } else { 0.0 }).collect());
    let s = evaluate(&pred, &gt, None, None).unwrap();
    assert_eq!(s.mean["1"].dice, Some(2.0 * 4.0 / (8.0 + 4.0)), "without an ignore label the voxels count");
    let s = evaluate(&pred, &gt, None, Some(2)).unwrap();
    assert_eq!((s.mean["1"].dice, s.mean["1"].tn), (Some(1.0), 4.0));
    assert!(!s.mean.contains_key("2"), "the ignore label is not scored");
    std::fs::write(base.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "ignore": 2}, "numTraining": 1, "file_ending": ".nii.gz"}"#).unwrap();
    for args in [vec!["-il", "2"], vec!["--ignore-label", "2"], vec!["-djfile", base.join("dataset.json").to_str().unwrap()]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("evaluate").arg(&pred).arg(&gt).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pred.join("summary.json")).unwrap()).unwrap();
        assert_eq!(v["mean"]["1"]["Dice"], 1.0, "{args:?}");
        assert!(v["mean"]["2"].is_null(), "{args:?}");
    }
}

/// With a region dataset.json (-djfile), the regions are scored as nnU-Net's evaluate_folder
/// does: a voxel is in a region when its label is, keys as Python's tuples.
#[test]
fn regions_are_scored_from_the_dataset_json() {
    use segk::evaluate::key;
    assert_eq!((key(&[3]), key(&[1, 2, 3])), ("3".to_string(), "(1, 2, 3)".to_string()));
    // Region (1, 2): 1 vs 2 counts as a hit; label 1 alone it does not.
    let m = metrics(&[1.0, 2.0, 0.0, 2.0], &[2.0, 2.0, 1.0, 0.0], &[1.0, 2.0], None);
    assert_eq!((m.tp, m.fp, m.fn_, m.tn), (2.0, 1.0, 1.0, 0.0));
    let base = std::env::temp_dir().join(format!("segk-eval-regions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (pred, gt) = (base.join("pred"), base.join("gt"));
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    write(&gt.join("a.nii.gz"), (0..16).map(|i| (i % 3) as f32).collect());
    write(&pred.join("a.nii.gz"), (0..16).map(|i| if i % 3 == 0 { 0.0 } else { 1.0 }).collect());
    std::fs::write(base.join("dataset.json"), r#"{"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2], "numTraining": 1, "file_ending": ".nii.gz"}"#).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("evaluate").arg(&pred).arg(&gt).args(["-djfile", base.join("dataset.json").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pred.join("summary.json")).unwrap()).unwrap();
    assert_eq!(v["mean"]["(1, 2)"]["Dice"], 1.0, "{v}");
    assert_eq!(v["mean"]["2"]["Dice"], 0.0, "{v}");
}

/// The foreground mean is nnU-Net's np.mean over the labels' means: a label with no Dice in
/// any case (absent from every prediction and reference) leaves it missing, as nnU-Net's NaN.
#[test]
fn foreground_mean_is_missing_when_a_label_is() {
    use segk::evaluate::{foreground_mean, Metrics};
    let a = Metrics { dice: Some(0.5), iou: Some(1.0 / 3.0), tp: 1.0, ..Default::default() };
    let b = Metrics { dice: Some(1.0), iou: Some(1.0), tp: 3.0, ..Default::default() };
    let both = foreground_mean(&[a, b]);
    assert_eq!((both.dice, both.tp), (Some(0.75), 2.0));
    let missing = foreground_mean(&[a, Metrics::default()]);
    assert_eq!((missing.dice, missing.iou), (None, None));
}
