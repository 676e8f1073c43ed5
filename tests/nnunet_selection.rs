//! Model selection's pieces against nnU-Net 2.8.1's own outputs (tests/fixtures/nnunet_selection,
//! made by make.py there from the predictions in tests/fixtures/nnunet_model): `segk ensemble`
//! as nnUNetv2_ensemble, `segk determine-postprocessing` as nnUNetv2_determine_postprocessing
//! (its decisions, scores and postprocessed maps, on inputs that take every branch: the
//! foreground step kept, both label steps kept, one kept, none), `segk postprocess` with
//! nnU-Net's postprocessing.json as nnUNetv2_apply_postprocessing.

use segk::imageio;
use segk::predict::probs::read_npz;
use std::path::{Path, PathBuf};

const CASES: [&str; 3] = ["ts_000", "ts_001", "ts_002"];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn fresh_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-nnselect-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn segk(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

fn labels(path: &Path) -> (Vec<f32>, [usize; 3]) {
    let v = imageio::read(path).unwrap();
    (v.data, v.shape)
}

#[test]
fn ensemble_equals_nnunets() {
    let base = fresh_dir("ensemble");
    let (a, b) = (fixture("nnunet_model/plain/pred_tta"), fixture("nnunet_model/plain2d/pred_tta"));
    let out = base.join("ens");
    let json = fixture("nnunet_selection/dataset.json");
    segk(&["ensemble".as_ref(), "-i".as_ref(), a.as_os_str(), b.as_os_str(), "-o".as_ref(), out.as_os_str(), "--save-probabilities".as_ref(), "--dataset-json".as_ref(), json.as_os_str()]);
    let theirs = fixture("nnunet_selection/ensemble");
    for case in CASES {
        assert_eq!(labels(&out.join(format!("{case}.nii.gz"))), labels(&theirs.join(format!("{case}.nii.gz"))), "{case}: labels");
        let ((sm, pm), (st, pt)) = (read_npz(&out.join(format!("{case}.npz"))).unwrap(), read_npz(&theirs.join(format!("{case}.npz"))).unwrap());
        assert_eq!(sm, st, "{case}");
        let d = pm.iter().zip(&pt).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-7, "{case}: probabilities differ by {d}");
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn postprocessing_decides_and_applies_as_nnunet() {
    let base = fresh_dir("pp");
    let gt = fixture("nnunet_selection/gt");
    let json = fixture("nnunet_selection/dataset.json");
    for (name, input) in [
        ("resenc", fixture("nnunet_model/resenc/pred_tta")),
        ("plain2d", fixture("nnunet_model/plain2d/pred_tta")),
        ("ensemble", fixture("nnunet_selection/ensemble")),
        ("planted", fixture("nnunet_selection/planted")),
    ] {
        // determine-postprocessing writes into its input folder: a copy of the label maps.
        let pred = base.join(name);
        std::fs::create_dir_all(&pred).unwrap();
        for case in CASES {
            std::fs::copy(input.join(format!("{case}.nii.gz")), pred.join(format!("{case}.nii.gz"))).unwrap();
        }
        segk(&["determine-postprocessing".as_ref(), "-i".as_ref(), pred.as_os_str(), "--ref".as_ref(), gt.as_os_str(), "--dataset-json".as_ref(), json.as_os_str()]);
        let theirs = fixture("nnunet_selection/postprocessing").join(name);
        let read = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
        let (mine, nn) = (read(pred.join("postprocessing.json")), read(theirs.join("postprocessing.json")));
        assert_eq!(mine["postprocessing_kwargs"], nn["postprocessing_kwargs"], "{name}: the steps");
        assert_eq!(mine["postprocessing_fns"], nn["postprocessing_fns"], "{name}");
        for stage in ["input_folder", "postprocessed"] {
            let dice = |v: &serde_json::Value, label: Option<&str>| match label {
                Some(l) => v[stage]["mean"][l]["Dice"].as_f64().unwrap(),
                None => v[stage]["foreground_mean"]["Dice"].as_f64().unwrap(),
            };
            for label in [None, Some("1"), Some("2")] {
                let (a, b) = (dice(&mine, label), dice(&nn, label));
                assert!((a - b).abs() < 1e-12, "{name} {stage} {label:?}: Dice {a} vs nnU-Net's {b}");
            }
        }
        for case in CASES {
            let file = format!("{case}.nii.gz");
            assert_eq!(labels(&pred.join("postprocessed").join(&file)), labels(&theirs.join("postprocessed").join(&file)), "{name} {case}: postprocessed");
        }
        // nnU-Net's own postprocessing.json, applied by segk.
        let applied = base.join(format!("{name}_applied"));
        let pp = theirs.join("postprocessing.json");
        segk(&["postprocess".as_ref(), "-i".as_ref(), pred.as_os_str(), "-o".as_ref(), applied.as_os_str(), "--pp-json".as_ref(), pp.as_os_str(), "--dataset-json".as_ref(), json.as_os_str()]);
        for case in CASES {
            let file = format!("{case}.nii.gz");
            assert_eq!(labels(&applied.join(&file)), labels(&fixture("nnunet_selection/apply_pp").join(name).join(&file)), "{name} {case}: applied");
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}
