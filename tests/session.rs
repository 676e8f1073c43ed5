//! Prediction of arrays in memory (`segk::predict::session`, what `import segk` calls): the same
//! label maps as `segk predict` on the same images as files, and clear errors.

use segk::imageio;
use segk::predict::session::{Request, Session, SessionOptions};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nnunet_model")
}

fn options() -> SessionOptions {
    SessionOptions { folds: Some(vec!["0".into()]), device: "cpu".into(), tta: false, threads: Some(2), ..SessionOptions::default() }
}

#[test]
fn arrays_predict_as_the_command_predicts_files() {
    let model = fixtures().join("plain/nnUNetTrainer__nnUNetPlans__3d_fullres");
    let out = std::env::temp_dir().join(format!("segk-session-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let images = fixtures().join("imagesTs");
    let cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segk"))
        .args(["predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-m", model.to_str().unwrap(), "-f", "0", "--device", "cpu", "--no-tta"])
        .output()
        .unwrap();
    assert!(cmd.status.success(), "{}", String::from_utf8_lossy(&cmd.stderr));
    let s = Session::open(&model, options()).unwrap();
    assert!(s.description.contains("3d_fullres") && s.description.contains("fold_0"), "{}", s.description);
    assert_eq!((s.channels, s.outputs), (1, s.label_values.len()));
    for case in ["ts_000", "ts_001", "ts_002"] {
        let v = imageio::read(&images.join(format!("{case}_0000.nii.gz"))).unwrap();
        let want = imageio::read(&out.join(format!("{case}.nii.gz"))).unwrap();
        let p = s.predict(Request { channels: vec![v.data.clone()], shape: v.shape, spacing: v.spacing, probabilities: true }).unwrap();
        assert!(p.labels.iter().zip(&want.data).all(|(&a, &b)| a as f32 == b), "{case}: labels differ from segk predict's");
        let probs = p.probabilities.unwrap();
        let n = v.voxels();
        assert_eq!(probs.len(), s.outputs * n);
        for i in (0..n).step_by(97) {
            let sum: f32 = (0..s.outputs).map(|k| probs[k * n + i]).sum();
            assert!((sum - 1.0).abs() < 1e-4, "{case}: voxel {i} probabilities sum to {sum}");
            let best = (0..s.outputs).max_by(|&a, &b| probs[a * n + i].total_cmp(&probs[b * n + i])).unwrap();
            assert_eq!(s.label_values[best], p.labels[i], "{case}: voxel {i}");
        }
    }
    // Bad requests come back as errors, and the session keeps serving.
    let v = imageio::read(&images.join("ts_000_0000.nii.gz")).unwrap();
    let ask = |channels: Vec<Vec<f32>>, spacing: [f64; 3]| s.predict(Request { channels, shape: v.shape, spacing, probabilities: false }).map(|_| ()).unwrap_err().to_string();
    assert!(ask(vec![v.data.clone(), v.data.clone()], v.spacing).contains("takes 1 channel(s), the image has 2"));
    assert!(ask(vec![v.data[1..].to_vec()], v.spacing).contains("every channel must hold"));
    assert!(ask(vec![v.data.clone()], [0.0, 1.0, 1.0]).contains("spacing must be positive"));
    let mut nan = v.data.clone();
    nan[5] = f32::NAN;
    assert!(ask(vec![nan], v.spacing).contains("non-finite"));
    assert!(s.predict(Request { channels: vec![v.data.clone()], shape: v.shape, spacing: v.spacing, probabilities: false }).is_ok());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_session_names_what_it_cannot_load() {
    let e = |dir: PathBuf, o: SessionOptions| Session::open(&dir, o).map(|_| ()).unwrap_err().to_string();
    assert!(e(fixtures().join("imagesTs"), options()).contains("not a model folder"));
    let model = fixtures().join("plain/nnUNetTrainer__nnUNetPlans__3d_fullres");
    assert!(e(model.clone(), SessionOptions { folds: Some(vec!["7".into()]), ..options() }).contains("fold 7 is not trained"));
    assert!(e(model.clone(), SessionOptions { device: "tpu".into(), ..options() }).contains("unknown device"));
    assert!(e(model, SessionOptions { step: 0.0, ..options() }).contains("step must be in (0, 1]"));
}
