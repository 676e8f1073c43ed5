//! A short CPU training run must reduce the loss and segment held-out cases.

use segk::demo::{self, DemoConfig};

#[test]
fn short_training_run_learns() {
    let cfg = DemoConfig {
        train_cases: 8,
        test_cases: 2,
        size: [32, 32, 32],
        patch: [32, 32, 32],
        epochs: 6,
        iters_per_epoch: 25,
        progress: false,
        seed: 7,
        ..DemoConfig::default()
    };
    let r = demo::run(&cfg).unwrap();
    eprintln!("loss {:.4} -> {:.4}, dice {:?}, mean {:.4}, {:.1} s", r.first_epoch_loss, r.last_epoch_loss, r.dice, r.mean_dice, r.train_secs);
    assert!(r.last_epoch_loss < r.first_epoch_loss - 0.3, "loss did not fall enough: {} -> {}", r.first_epoch_loss, r.last_epoch_loss);
    assert!(r.mean_dice >= 0.7, "held-out mean foreground Dice {:.4} < 0.7", r.mean_dice);
}

/// raw dataset -> `segk train` (which plans and preprocesses first) -> a log line per epoch.
#[test]
fn train_command_runs_plan_preprocess_and_epochs() {
    let base = std::env::temp_dir().join(format!("segk-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset031_Train");
    let segk = env!("CARGO_BIN_EXE_segk");
    let out = std::process::Command::new(segk).args(["synth", "--cases", "5", "--shape", "24,32,32", "--spacing", "1,1,1"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(segk)
        .arg("train")
        .arg(&root)
        .args(["all", "--device", "cpu", "--epochs", "2", "--iters-per-epoch", "3", "--val-iters", "2", "--workers", "1"])
        .env_remove("nnUNet_preprocessed")
        .env_remove("nnUNet_results")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("preprocessing first") && text.contains("1 workers (--workers)"), "{text}");
    let log = std::fs::read_to_string(base.join("segk_results/Dataset031_Train/3d_fullres/fold_all/training_log.txt")).unwrap();
    let epochs: Vec<&str> = log.lines().filter(|l| l.starts_with("epoch")).collect();
    assert_eq!(epochs.len(), 2, "{log}");
    assert!(epochs.iter().all(|l| l.contains("pseudo dice [") && l.contains("data wait")), "{log}");
}
