//! nnU-Net raw datasets: NIfTI round trips and the integrity check on a broken dataset.

use segk::dataset::integrity::check;
use segk::imageio::{self, header_for, Volume, VoxelType};
use std::path::{Path, PathBuf};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const OBLIQUE: [[f64; 3]; 3] = [[0.8, 0.6, 0.0], [-0.6, 0.8, 0.0], [0.0, 0.0, -1.0]];
const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

fn volume(shape: [usize; 3], spacing: [f64; 3], dirs: [[f64; 3]; 3], f: impl Fn(usize) -> f32) -> Volume {
    let n = shape.iter().product();
    Volume { shape, spacing, affine: [[0.0; 4]; 3], data: (0..n).map(f).collect(), header: header_for(shape, spacing, dirs, [10.0, -20.0, 30.5]) }
}

#[test]
fn nifti_round_trips_every_voxel_type_and_geometry() {
    let dir = tmpdir("nifti");
    let (shape, spacing) = ([3, 4, 5], [2.5, 0.75, 0.8]);
    for (ty, ending) in [(VoxelType::U8, ".nii.gz"), (VoxelType::I16, ".nii"), (VoxelType::U16, ".nii.gz"), (VoxelType::I32, ".nii"), (VoxelType::F32, ".nii.gz"), (VoxelType::F64, ".nii")] {
        let v = volume(shape, spacing, OBLIQUE, |i| (i % 200) as f32 + if matches!(ty, VoxelType::F32 | VoxelType::F64) { 0.25 } else { 0.0 });
        let p = dir.join(format!("v_{ty:?}{ending}"));
        imageio::write(&p, &v, ty).unwrap();
        let r = imageio::read(&p).unwrap();
        assert_eq!(r.shape, shape, "{ty:?}");
        assert_eq!(r.data, v.data, "{ty:?}: voxels in [z][y][x] order");
        assert!(r.spacing.iter().zip(&spacing).all(|(a, b)| (a - b).abs() < 1e-6), "{ty:?} spacing {:?}", r.spacing);
        let d = r.directions();
        for c in 0..3 {
            for i in 0..3 {
                assert!((d[c][i] - OBLIQUE[c][i]).abs() < 1e-6, "{ty:?} direction {d:?}");
            }
        }
        assert_eq!([r.affine[0][3], r.affine[1][3], r.affine[2][3]], [10.0, -20.0, 30.5]);
    }
    // x is the fastest axis: voxel (z=1, y=2, x=3) of a [3,4,5] volume is index (1*4+2)*5+3.
    let r = imageio::read(&dir.join("v_F32.nii.gz")).unwrap();
    assert_eq!(r.data[(4 + 2) * 5 + 3], ((4 + 2) * 5 + 3) as f32 + 0.25);
}

#[test]
fn nifti_applies_scaling_and_qform() {
    let dir = tmpdir("scl");
    let mut v = volume([2, 2, 2], [1.0, 1.0, 1.0], IDENTITY, |i| i as f32);
    // qform only: 90 degrees about z (b = c = 0, d = sin 45).
    let segk::imageio::Header::Nifti(h) = &mut v.header else { unreachable!("a NIfTI header") };
    h.sform_code = 0;
    h.qform_code = 1;
    h.quatern_d = std::f32::consts::FRAC_1_SQRT_2;
    let p = dir.join("s.nii");
    imageio::write(&p, &v, VoxelType::I16).unwrap();
    // The writer stores unscaled values; set scl_slope = 2, scl_inter = -3 in the header
    // (NIfTI-1 byte offsets 112 and 116, little endian).
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[112..116].copy_from_slice(&2.0f32.to_le_bytes());
    bytes[116..120].copy_from_slice(&(-3.0f32).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let r = imageio::read(&p).unwrap();
    let want: Vec<f32> = (0..8).map(|i| 2.0 * i as f32 - 3.0).collect();
    assert_eq!(r.data, want);
    let d = r.directions();
    assert!((d[0][1] - 1.0).abs() < 1e-5 && (d[1][0] + 1.0).abs() < 1e-5, "x axis -> +y, y axis -> -x: {d:?}");
}

fn write_case(root: &Path, id: &str, channels: usize, img: &Volume, lab: &Volume) {
    for c in 0..channels {
        imageio::write(&root.join(format!("imagesTr/{id}_{c:04}.nii.gz")), img, VoxelType::F32).unwrap();
    }
    imageio::write(&root.join(format!("labelsTr/{id}.nii.gz")), lab, VoxelType::U8).unwrap();
}

#[test]
fn integrity_check_reports_every_fault_once() {
    let root = tmpdir("broken").join("Dataset001_Broken");
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1, "tumor": 2},
        "numTraining": 99, "file_ending": ".nii.gz"}"#).unwrap();
    let (shape, sp) = ([4, 5, 6], [2.0, 1.0, 1.0]);
    let img = volume(shape, sp, OBLIQUE, |i| i as f32 * 0.1);
    let lab = volume(shape, sp, OBLIQUE, |i| (i % 3) as f32);
    write_case(&root, "good", 2, &img, &lab);
    write_case(&root, "missing", 1, &img, &lab);
    write_case(&root, "shape", 2, &volume([4, 5, 7], sp, OBLIQUE, |_| 0.0), &lab);
    write_case(&root, "spacing", 2, &volume(shape, [3.0, 1.0, 1.0], OBLIQUE, |_| 0.0), &lab);
    write_case(&root, "orient", 2, &volume(shape, sp, IDENTITY, |_| 0.0), &lab);
    write_case(&root, "undeclared", 2, &img, &volume(shape, sp, OBLIQUE, |i| if i == 7 { 7.0 } else { 1.0 }));
    write_case(&root, "nan", 2, &volume(shape, sp, OBLIQUE, |i| if i % 10 == 0 { f32::NAN } else { 1.0 }), &lab);
    write_case(&root, "truncated", 2, &img, &lab);
    let t = root.join("imagesTr/truncated_0001.nii.gz");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    imageio::write(&root.join("imagesTr/orphan_0000.nii.gz"), &img, VoxelType::F32).unwrap();
    imageio::write(&root.join("imagesTr/good_0002.nii.gz"), &img, VoxelType::F32).unwrap();

    let problems = check(&root);
    let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    eprintln!("{}", lines.join("\n"));
    let has = |file: &str, text: &str| problems.iter().filter(|p| p.file.to_string_lossy().ends_with(file) && p.message.contains(text)).count();
    assert_eq!(has("dataset.json", "numTraining is 99 but labelsTr holds 8"), 1);
    assert_eq!(has("missing_0001.nii.gz", "missing: channel 1 (PET)"), 1);
    assert_eq!(has("shape_0000.nii.gz", "shape [4, 5, 7]"), 1);
    assert_eq!(has("spacing_0000.nii.gz", "spacing"), 1);
    assert_eq!(has("orient_0000.nii.gz", "orientation"), 1);
    assert_eq!(has("labelsTr/undeclared.nii.gz", "not declared in dataset.json: 7"), 1);
    assert_eq!(has("nan_0000.nii.gz", "12 NaN/inf voxels"), 1);
    assert_eq!(has("truncated_0001.nii.gz", "unreadable"), 1);
    // Read directly (as predict and evaluate do), the cause is said in words, not Rust's Debug form.
    let e = format!("{:#}", imageio::read(&t).unwrap_err());
    assert!(e.contains("truncated_0001.nii.gz") && !e.contains("Io(") && !e.contains("Custom {"), "{e}");
    assert_eq!(has("orphan_0000.nii.gz", "without a label map"), 1);
    assert_eq!(has("good_0002.nii.gz", "channel 0002 is beyond dataset.json's channel_names"), 1);
    assert!(!lines.iter().any(|l| l.contains("/good") && !l.contains("good_0002")), "the good case has no other problem");
    // Each faulty file is named once per fault; channels repeat per-channel faults.
    assert_eq!(problems.len(), 1 + 1 + 2 + 2 + 2 + 1 + 2 + 1 + 1 + 1, "{lines:#?}");
}

#[test]
fn integrity_check_names_a_broken_dataset_json() {
    let root = tmpdir("badjson");
    std::fs::write(root.join("dataset.json"), r#"{"labels": {"background": 0}}"#).unwrap();
    let p = check(&root);
    assert_eq!(p.len(), 1);
    assert!(p[0].file.ends_with("dataset.json") && p[0].message.contains("channel_names"), "{}", p[0]);
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "MR"}, "labels": {"background": 1, "ignore": 0}, "numTraining": 0, "file_ending": ".nii.gz"}"#).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    let p: Vec<String> = check(&root).iter().map(|p| p.to_string()).collect();
    assert!(p.iter().any(|l| l.contains("\"background\": 0")) && p.iter().any(|l| l.contains("\"ignore\"")), "{p:?}");
    // nnU-Net's label-table rules segk also needs: consecutive values, no shared value; for
    // regions, regions_class_order present and consistent, every value reachable. Refused
    // before any planning.
    let brats = r#"{"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}"#;
    for (labels, says) in [
        (r#"{"background": 0, "liver": 1, "tumor": 3}"#, "consecutive from 0 (nnU-Net's rule): found [0, 1, 3]"),
        (r#"{"background": 0, "liver": 1, "tumor": 1}"#, "two labels share a value"),
        (r#"{"background": 0, "organ": [1, 2], "lesion": 2}"#, "regions_class_order is missing"),
        (&format!(r#"{brats}, "regions_class_order": [1, 2, 3]"#), ""),
        (&format!(r#"{brats}, "regions_class_order": [1, 2]"#), "regions_class_order has 2 entries for 3 foreground regions"),
        (&format!(r#"{brats}, "regions_class_order": [1, 3, 3]"#), "label values [2] are in no entry of regions_class_order"),
        (&format!(r#"{brats}, "regions_class_order": [1, 3, 2]"#), "writes 2 for region [3]"),
        (r#"{"background": 0, "a": [1, 3], "b": 3}, "regions_class_order": [1, 3]"#, "consecutive from 1: found [1, 3]"),
        (r#"{"background": 0, "a": [1, 2], "b": 2, "ignore": 3}, "regions_class_order": [1, 2]"#, ""),
        (r#"{"background": 0, "liver": 1, "tumor": 2, "ignore": 5}"#, "one above the highest other label (3)"),
        (r#"{"background": 0, "liver": 1, "tumor": 2, "ignore": 3}"#, ""),
        (r#"{"background": 0, "liver": [1], "tumor": 2}"#, ""),
        (r#"{"background": 0, "liver": "1"}"#, "a label's value must be an integer or a list of integers"),
    ] {
        let json = format!(r#"{{"channel_names": {{"0": "MR"}}, "numTraining": 0, "file_ending": ".nii.gz", "labels": {labels}}}"#);
        std::fs::write(root.join("dataset.json"), json).unwrap();
        let p: Vec<String> = check(&root).iter().map(|p| p.to_string()).collect();
        if says.is_empty() {
            assert!(p.is_empty(), "{labels}: {p:?}");
        } else {
            assert!(p.len() == 1 && p[0].contains(says), "{labels}: {p:?}");
        }
    }
}
