//! One command opens its dataset once: `segk train` on a dataset never planned runs check,
//! fingerprint, plan, preprocess and training through one [`Experiment`] (counted in-process;
//! alone in this test binary, so that no other test opens datasets meanwhile).

use segk::experiment::{run_train, Experiment, TrainOpts};

#[test]
fn train_opens_the_dataset_once() {
    let base = std::env::temp_dir().join(format!("segk-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset036_Once");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["synth", "--cases", "3", "--shape", "24,32,32", "--spacing", "1,1,1"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ex = Experiment::new(&root).unwrap();
    let opts = TrainOpts { epochs: 1, iters_per_epoch: 1, val_iters: 1, checkpointing: "auto".into(), save_every: 50, resume: false, pretrained: None, validation: false, npz: false, workers: Some(1), seed: 0, precision: segk::device::Precision::Auto };
    let before = segk::dataset::opens();
    run_train(&ex, "3d_fullres", "all", None, "cpu", opts, Some(base.join("pre")), Some(base.join("results/fold_all"))).unwrap();
    assert_eq!(segk::dataset::opens() - before, 1, "check, fingerprint, plan, preprocess and train share one opening");
    assert!(base.join("pre/nnUNetPlans.json").is_file() && base.join("results/fold_all/checkpoint_final.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&base);
}
