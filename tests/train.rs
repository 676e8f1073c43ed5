//! A short CPU training run must reduce the loss and segment held-out cases.

use segk::backend::cpu::CpuBackend;
use segk::demo::{self, DemoConfig};

/// Six short epochs on eight generated cases, then Dice on two held-out ones.
fn short_run(sparse: bool, regions: bool) -> demo::DemoReport {
    short_run_with(DemoConfig { sparse, regions, ..DemoConfig::default() }, 6)
}

fn short_run_with(base: DemoConfig, epochs: usize) -> demo::DemoReport {
    short_run_on(&CpuBackend::<f32>::new(), base, epochs)
}

fn short_run_on<B: segk::backend::Backend>(be: &B, base: DemoConfig, epochs: usize) -> demo::DemoReport {
    let cfg = DemoConfig { train_cases: 8, test_cases: 2, size: [32, 32, 32], patch: [32, 32, 32], epochs, iters_per_epoch: 25, progress: false, seed: 7, ..base };
    let r = demo::run_on(be, &cfg).unwrap();
    eprintln!("sparse {} regions {} blocks {:?}: loss {:.4} -> {:.4}, dice {:?}, mean {:.4}, {:.1} s", cfg.sparse, cfg.regions, cfg.blocks_per_stage, r.first_epoch_loss, r.last_epoch_loss, r.dice, r.mean_dice, r.train_secs);
    assert!(r.mean_dice >= 0.7, "held-out mean foreground Dice {:.4} < 0.7", r.mean_dice);
    r
}

#[test]
fn short_training_run_learns() {
    let r = short_run(false, false);
    assert!(r.last_epoch_loss < r.first_epoch_loss - 0.3, "loss did not fall enough: {} -> {}", r.first_epoch_loss, r.last_epoch_loss);
}

/// Training with bf16 convolutions on the CPU (`segk train --precision bf16`: AVX512-BF16
/// products, f32 weights, norms, loss and optimizer) learns as the f32 run does.
#[test]
fn bf16_training_run_learns() {
    let Some(be) = CpuBackend::<f32>::with_bf16_products() else {
        println!("SKIPPED bf16_training_run_learns: this CPU has no AVX512-BF16");
        return;
    };
    let r = short_run_on(&be, DemoConfig { features: vec![16, 32, 32], ..DemoConfig::default() }, 6);
    assert!(r.last_epoch_loss < r.first_epoch_loss - 0.3, "loss did not fall enough: {} -> {}", r.first_epoch_loss, r.last_epoch_loss);
}

/// A residual-encoder net (nnU-Net's ResEnc encoder: blocks 1, 3, 4 as the presets begin)
/// learns as the plain one does.
#[test]
fn residual_encoder_net_learns() {
    let r = short_run_with(DemoConfig { blocks_per_stage: vec![1, 3, 4], ..DemoConfig::default() }, 10);
    assert!(r.last_epoch_loss < r.first_epoch_loss - 0.3, "loss did not fall enough: {} -> {}", r.first_epoch_loss, r.last_epoch_loss);
}

/// Sparse annotation (nnU-Net's ignore label on two thirds of every training volume) still
/// learns: the held-out cases, fully labelled, reach the same Dice threshold.
#[test]
fn sparse_annotation_with_an_ignore_label_learns() {
    short_run(true, false);
}

/// A region net (three nested regions as BraTS's; sigmoid + Dice + BCE) learns: the held-out
/// Dice per region reaches the threshold.
#[test]
fn region_net_learns_nested_regions() {
    let r = short_run(false, true);
    assert_eq!(r.dice.len(), 3, "one Dice per region");
    assert!(r.dice.iter().all(|&d| d >= 0.75), "Dice per region {:?}", r.dice);
}

/// Regions and sparse annotation together (nnU-Net masks the ignore label out of the region
/// loss): the held-out, fully labelled cases still reach the threshold per region.
#[test]
fn region_net_with_an_ignore_label_learns() {
    let r = short_run(true, true);
    assert!(r.dice.iter().all(|&d| d >= 0.7), "Dice per region {:?}", r.dice);
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
        .args(["3d_fullres", "all", "-p", "nnUNetPlans", "--device", "cpu", "--epochs", "2", "--iters-per-epoch", "3", "--val-iters", "2", "--workers", "1"])
        .env_remove("nnUNet_preprocessed")
        .env_remove("nnUNet_results")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("preprocessing first") && text.contains("1 augmentation worker (from --workers)"), "{text}");
    let log = std::fs::read_to_string(base.join("segk_results/Dataset031_Train/segkTrainer__nnUNetPlans__3d_fullres/fold_all/training_log.txt")).unwrap();
    let epochs: Vec<&str> = log.lines().filter(|l| l.starts_with("epoch")).collect();
    assert_eq!(epochs.len(), 2, "{log}");
    assert!(epochs.iter().all(|l| l.contains("pseudo dice [") && l.contains("data wait") && l.contains("host peak")), "{log}");
    let png = std::fs::read(base.join("segk_results/Dataset031_Train/segkTrainer__nnUNetPlans__3d_fullres/fold_all/progress.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "progress.png: {} bytes", png.len());
    assert!(!text.contains("progress.png not updated"), "{text}");
    // nnU-Net's validation after training: every case of fold `all`, predicted and scored.
    let val = base.join("segk_results/Dataset031_Train/segkTrainer__nnUNetPlans__3d_fullres/fold_all/validation");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(val.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["metric_per_case"].as_array().unwrap().len(), 5);
    assert!(text.contains("validation: 5 cases"), "{text}");
    // nnU-Net's terms: a configuration the plans lack, or one nnU-Net has not; plans other than the
    // preprocessed folder's are refused by name; the older two-argument form says what it means.
    let refused = |args: &[&str], says: &str| {
        let out = std::process::Command::new(segk).arg("train").arg(&root).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_results").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
        err
    };
    refused(&["3d_cascade_fullres", "all", "--device", "cpu"], "the plans nnUNetPlans have no configuration \"3d_cascade_fullres\" (they have 2d, 3d_fullres)");
    refused(&["3d_midres", "all", "--device", "cpu"], "segk trains nnU-Net's 2d, 3d_fullres, 3d_lowres and 3d_cascade_fullres");
    refused(&["3d_fullres", "all", "-p", "segkPlans", "--device", "cpu"], "segkPlans.json: missing: `segk plan DATASET --gpu-memory GB` writes segkPlans");
    let old_form = refused(&["all", "--device", "cpu"], "already holds a training run");
    assert!(old_form.contains("older form of `segk train DATASET 3d_fullres all`"), "{old_form}");
}

mod resume {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn segk() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_segk"));
        c.env_remove("nnUNet_preprocessed").env_remove("nnUNet_results");
        c
    }

    /// A generated raw dataset, preprocessed.
    fn dataset(tag: &str) -> PathBuf {
        let base = std::env::temp_dir().join(format!("segk-resume-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("Dataset032_Resume");
        let out = segk().args(["synth", "--cases", "5", "--shape", "24,32,32", "--spacing", "1,1,1"]).arg(&root).output().unwrap();
        assert!(out.status.success());
        let out = segk().arg("preprocess").arg(&root).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        root
    }

    fn train(root: &Path, out: &Path, extra: &[&str]) -> Command {
        let mut c = segk();
        c.arg("train").arg(root).args(["all", "--device", "cpu", "--epochs", "3", "--iters-per-epoch", "6", "--val-iters", "1", "--workers", "1", "--save-every", "1", "--seed", "3", "--out"]).arg(out).args(extra);
        c
    }

    fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
        v.sort();
        v
    }

    fn epochs_logged(out: &Path) -> usize {
        std::fs::read_to_string(out.join("training_log.txt")).map(|s| s.lines().filter(|l| l.starts_with("epoch")).count()).unwrap_or(0)
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    /// Starts a run, waits until `epochs` are logged plus `delay`, then sends `signal`.
    fn interrupt(root: &Path, out: &Path, epochs: usize, delay: Duration, signal: &str) -> std::process::Output {
        let child = train(root, out, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let t0 = Instant::now();
        while epochs_logged(out) < epochs {
            assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(delay);
        let ok = Command::new("kill").args(["-s", signal]).arg(child.id().to_string()).status().unwrap();
        assert!(ok.success());
        child.wait_with_output().unwrap()
    }

    #[test]
    fn resumed_runs_end_where_an_uninterrupted_run_ends() {
        let root = dataset("kill");
        let base = root.parent().unwrap().to_path_buf();
        let (a, b, c) = (base.join("a"), base.join("b"), base.join("c"));
        let out = train(&root, &a, &[]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want = tensors(&a.join("checkpoint_final.safetensors"));
        let want_state = tensors(&a.join("checkpoint_final.state.safetensors"));
        assert!(a.join("checkpoint_best.safetensors").is_file() && a.join("checkpoint_latest.state.safetensors").is_file());

        // The same command again, without --resume, must not replace the finished run.
        let out = train(&root, &a, &[]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("already holds a training run (checkpoint_latest at epoch 3)") && err.contains("--resume"), "{err}");
        assert!(want == tensors(&a.join("checkpoint_final.safetensors")), "the refused run changed checkpoint_final");
        // Resuming a finished run for more epochs says that the schedule changes, then trains on.
        copy_dir(&a, &base.join("a4"));
        let out = segk().arg("train").arg(&root).args(["all", "--device", "cpu", "--epochs", "4", "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "1", "--no-validation", "--resume", "--out"]).arg(base.join("a4")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("started for 3 epochs and goes on for 4") && text.contains("epoch    3"), "{text}");
        // A run killed before its first periodic save has only checkpoint_best: it is a run
        // (refused without --resume) and --resume continues from it, as nnU-Net does.
        let best_only = base.join("best_only");
        std::fs::create_dir_all(&best_only).unwrap();
        for f in ["checkpoint_best.safetensors", "checkpoint_best.state.safetensors"] {
            std::fs::copy(a.join(f), best_only.join(f)).unwrap();
        }
        let out = train(&root, &best_only, &[]).output().unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a training run (checkpoint_best"), "{}", String::from_utf8_lossy(&out.stderr));
        let out = train(&root, &best_only, &["--resume"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("resuming from") && text.contains("checkpoint_best.safetensors"), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(best_only.join("checkpoint_final.safetensors").is_file());
        // Nor may a fold of another plan replace the plans.json its model folder's folds use.
        std::fs::create_dir_all(base.join("m")).unwrap();
        std::fs::write(base.join("m/plans.json"), "{}").unwrap();
        let out = train(&root, &base.join("m/fold_all"), &[]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("holds another plan") && std::fs::read_to_string(base.join("m/plans.json")).unwrap() == "{}", "{err}");

        // kill -9 during epoch 2: resume from the checkpoint of epoch 1.
        interrupt(&root, &b, 2, Duration::from_millis(300), "KILL");
        let out = train(&root, &b, &["--resume"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("resuming from"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(want == tensors(&b.join("checkpoint_final.safetensors")), "weights after kill -9 + resume differ from the uninterrupted run");
        assert!(want_state == tensors(&b.join("checkpoint_final.state.safetensors")), "momentum differs");

        // SIGTERM mid-epoch: checkpoint_latest is saved at the next step, and resuming from
        // the middle of an epoch still ends in the same place.
        let out = interrupt(&root, &c, 1, Duration::from_millis(400), "TERM");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("interrupted at epoch") && err.contains("--resume"), "{err}");
        let out = train(&root, &c, &["--resume"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(want == tensors(&c.join("checkpoint_final.safetensors")), "weights after SIGTERM + resume differ");

        // A corrupt checkpoint is refused with its name.
        std::fs::write(c.join("checkpoint_latest.safetensors"), b"garbage").unwrap();
        let out = train(&root, &c, &["--resume"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("checkpoint_latest.safetensors") && err.contains("not a valid safetensors file"), "{err}");
    }

    /// Ctrl-C while `train` plans and preprocesses (or validates) stops the process at once, as
    /// it would without segk's handler; only the training loop saves first.
    #[test]
    fn a_signal_outside_the_training_loop_stops_at_once() {
        use std::io::BufRead;
        let base = std::env::temp_dir().join(format!("segk-resume-sigpre-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("Dataset033_Signal");
        let out = segk().args(["synth", "--cases", "5", "--shape", "64,96,96", "--spacing", "1,1,1"]).arg(&root).output().unwrap();
        assert!(out.status.success());
        let mut child = train(&root, &base.join("out"), &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // The dataset is checked first, then planning begins.
        let planning = lines.by_ref().take(3).map_while(Result::ok).find(|l| l.contains("planning first"));
        assert!(planning.is_some(), "no planning line");
        let t0 = Instant::now();
        assert!(Command::new("kill").args(["-s", "INT"]).arg(child.id().to_string()).status().unwrap().success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code() == Some(130) && err.contains("segk: interrupted"), "{:?} {err}", out.status);
        assert!(t0.elapsed() < Duration::from_secs(5) && !base.join("out/checkpoint_latest.safetensors").exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_corrupt_store_stops_training_with_the_case_named() {
        let root = dataset("nan");
        let store = root.parent().unwrap().join("segk_preprocessed/Dataset032_Resume/segk_nnUNetPlans_3d_fullres");
        for id in ["case_0000", "case_0001", "case_0002", "case_0003", "case_0004"] {
            let p = store.join(format!("{id}.img"));
            let n = std::fs::metadata(&p).unwrap().len() as usize / 4;
            std::fs::write(&p, f32::NAN.to_le_bytes().repeat(n)).unwrap();
        }
        let out = train(&root, &root.parent().unwrap().join("nan"), &[]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("augmentation worker") && err.contains("case_000") && err.contains("NaN"), "{err}");
        assert!(err.contains("saved checkpoint_latest at epoch 0 iteration 0") && root.parent().unwrap().join("nan/checkpoint_latest.safetensors").is_file(), "{err}");
    }
}

#[test]
fn preflight_picks_the_fastest_level_that_fits_or_refuses_with_numbers() {
    use segk::model::{Checkpointing, Topology};
    use segk::plan::plans::Plan;
    use segk::train::{device_bytes, preflight, ElemBytes};
    const F32: ElemBytes = ElemBytes { working: 4, activation: 4 };
    let topology = Topology::isotropic(1, 3, vec![8, 16, 32]);
    let plan = Plan {
        spacing: [1.0; 3],
        transpose_forward: [0, 1, 2],
        transpose_backward: [0, 1, 2],
        median_shape: [32; 3],
        patch_size: [32; 3],
        batch_size: 2,
        topology,
        normalization: vec!["ZScoreNormalization".into()],
        use_mask_for_norm: vec![false],
        gpu_memory_budget_bytes: 0,
        gpu_memory_needed_bytes: 0,
        checkpointing: 1,
    };
    let [l0, l1, l2] = [Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2].map(|l| device_bytes(&plan, l, F32).unwrap() as u64);
    assert!(l0 > l1 && l1 > l2, "{l0} {l1} {l2}");
    assert_eq!(preflight(&plan, None, F32, Some(l0), 0).unwrap(), Checkpointing::None);
    assert_eq!(preflight(&plan, None, F32, Some(l1), 0).unwrap(), Checkpointing::Level1);
    assert_eq!(preflight(&plan, None, F32, Some(l2), 0).unwrap(), Checkpointing::Level2);
    let e = preflight(&plan, None, F32, Some(l2 - 1), 0).unwrap_err().to_string();
    assert!(e.contains("level 2:") && e.contains("GiB is free") && e.contains("--gpu-memory"), "{e}");
    let e = preflight(&plan, Some(Checkpointing::None), F32, Some(l1), 0).unwrap_err().to_string();
    assert!(e.contains("--checkpointing 1 (or auto)"), "an explicit level that does not fit is refused, pointing at one that does: {e}");
    // The budget to plan for is scaled by what this backend needs over what the planner models
    // (here twice): the advice asks for a plan of half the free memory.
    let mut big = Plan { patch_size: [512; 3], ..plan.clone() };
    big.gpu_memory_needed_bytes = device_bytes(&big, Checkpointing::Level1, F32).unwrap() / 2;
    let free = 8u64 << 30;
    let e = preflight(&big, None, F32, Some(free), 0).unwrap_err().to_string();
    let asked: f64 = e.split("--gpu-memory ").nth(1).and_then(|r| r.split('`').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    assert!(!e.contains("--checkpointing 2") && (asked - 8.0 * 0.95 / 2.0).abs() < 0.11, "{e}");
    assert_eq!(preflight(&plan, None, F32, Some(l0), 1).unwrap(), Checkpointing::Level1, "the backend's workspace counts");
}

/// `segk ARGS` with none of nnU-Net's folder variables set (everything beside the dataset).
fn segk_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_results").env_remove("nnUNet_raw").output().unwrap()
}

/// An empty temporary folder for one test.
/// `segk synth` of `cases` cases of `shape` (spacing 1) as NAME under a fresh base: (base, root).
fn synth_dataset(tag: &str, name: &str, cases: &str, shape: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = fresh_dir(tag);
    let root = base.join(name);
    assert!(segk_cli(&["synth", root.to_str().unwrap(), "--cases", cases, "--shape", shape, "--spacing", "1,1,1"]).status.success());
    (base, root)
}

/// `segk predict` of ROOT/imagesTr with `model` on the CPU without TTA: the first case's label
/// map lies on its input's grid.
fn predicts_on_the_input_grid(base: &std::path::Path, root: &std::path::Path, model: &std::path::Path) {
    let out = segk_cli(&["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", base.join("pred").to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |p: std::path::PathBuf| segk::imageio::read(&p).unwrap().shape;
    assert_eq!(read(base.join("pred/case_0000.nii.gz")), read(root.join("labelsTr/case_0000.nii.gz")));
}

/// The organ's pseudo-Dice of a training log's last epoch line, and that line.
fn last_organ_dice(text: &str) -> (f64, &str) {
    let last = text.lines().rfind(|l| l.starts_with("epoch ")).unwrap_or_default();
    (last.split("pseudo dice [").nth(1).and_then(|s| s.split([',', ']']).next()).and_then(|s| s.trim().parse().ok()).unwrap_or(0.0), last)
}

fn fresh_dir(tag: &str) -> std::path::PathBuf {
    let base = std::env::temp_dir().join(format!("segk-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    base
}

/// An nnU-Net dataset with `"ignore": 3` (two thirds of every label map unlabelled) trains,
/// validates, predicts and evaluates: no output for the ignore label, none predicted, its
/// voxels left out of the scores.
#[test]
fn ignore_label_dataset_trains_predicts_and_evaluates() {
    use segk::imageio;
    let base = fresh_dir("ignore");
    let root = base.join("Dataset034_Sparse");
    assert!(segk_cli(&["synth", root.to_str().unwrap(), "--cases", "4", "--shape", "24,32,32", "--spacing", "1,1,1"]).status.success());
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("dataset.json")).unwrap()).unwrap();
    json["labels"]["ignore"] = 3.into();
    std::fs::write(root.join("dataset.json"), json.to_string()).unwrap();
    for e in std::fs::read_dir(root.join("labelsTr")).unwrap() {
        let p = e.unwrap().path();
        let mut v = imageio::read(&p).unwrap();
        let plane = v.shape[1] * v.shape[2];
        v.data.iter_mut().enumerate().filter(|(i, _)| (i / plane / 4) % 3 != 0).for_each(|(_, l)| *l = 3.0);
        imageio::write(&p, &v, imageio::VoxelType::U8).unwrap();
    }
    let out = segk_cli(&["train", root.to_str().unwrap(), "3d_fullres", "all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let model = base.join("segk_results/Dataset034_Sparse/segkTrainer__nnUNetPlans__3d_fullres");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("fold_all/validation/summary.json")).unwrap()).unwrap();
    assert!(summary["mean"]["3"].is_null() && summary["mean"]["1"].is_object(), "the ignore label is not scored: {summary}");
    let out = segk_cli(&["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", base.join("pred").to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for e in std::fs::read_dir(base.join("pred")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".nii.gz") {
            assert!(imageio::read(&p).unwrap().data.iter().all(|&l| l < 3.0), "{}: the ignore label is never predicted", p.display());
        }
    }
    let out = segk_cli(&["evaluate", base.join("pred").to_str().unwrap(), root.join("labelsTr").to_str().unwrap(), "-djfile", root.join("dataset.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("pred/summary.json")).unwrap()).unwrap();
    let case = &s["metric_per_case"][0]["metrics"]["1"];
    let counted = ["TP", "FP", "FN", "TN"].iter().map(|k| case[k].as_f64().unwrap()).sum::<f64>();
    let labelled = (0..24).filter(|z| (z / 4) % 3 == 0).count() * 32 * 32;
    assert_eq!(counted, labelled as f64, "only the labelled voxels are counted");
    let _ = std::fs::remove_dir_all(&base);
}

/// A BraTS-style region dataset (organ = labels 1 and 2, lesion = label 2, nested) passes
/// `segk check`, trains (sigmoid outputs, Dice + BCE), validates per region, predicts label
/// maps by regions_class_order with region probabilities, and evaluates per region. Eighty
/// iterations bring the held-out organ region's Dice above 0.8 (the lesion, a few voxels at
/// this size, is learnt by the demo's region test, not here).
#[test]
fn region_dataset_trains_predicts_and_evaluates() {
    use segk::imageio;
    let base = fresh_dir("regions");
    let root = base.join("Dataset035_Regions");
    assert!(segk_cli(&["synth", root.to_str().unwrap(), "--cases", "6", "--shape", "24,32,32", "--spacing", "1,1,1"]).status.success());
    // By hand: the labels' order is the outputs' order (serde_json would sort the keys).
    let json = r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": [1, 2], "lesion": 2}, "regions_class_order": [1, 2], "numTraining": 6, "file_ending": ".nii.gz"}"#;
    std::fs::write(root.join("dataset.json"), json).unwrap();
    let out = segk_cli(&["check", root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = segk_cli(&["train", root.to_str().unwrap(), "3d_fullres", "0", "--device", "cpu", "--epochs", "8", "--iters-per-epoch", "10", "--val-iters", "2", "--workers", "1"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let model = base.join("segk_results/Dataset035_Regions/segkTrainer__nnUNetPlans__3d_fullres");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("fold_0/validation/summary.json")).unwrap()).unwrap();
    assert!(summary["mean"]["(1, 2)"].is_object() && summary["mean"]["2"].is_object() && summary["mean"]["1"].is_null(), "validation scores the regions: {summary}");
    let organ_dice = summary["mean"]["(1, 2)"]["Dice"].as_f64().unwrap();
    assert!(organ_dice >= 0.8, "held-out organ region Dice {organ_dice} < 0.8");
    let pred = base.join("pred");
    let out = segk_cli(&["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", pred.to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta", "--save-probabilities"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let labels = imageio::read(&pred.join("case_0000.nii.gz")).unwrap();
    let (shape, probs) = segk::predict::probs::read_npz(&pred.join("case_0000.npz")).unwrap();
    let n = labels.data.len();
    assert_eq!(shape[0], 2, "one probability per region, no background");
    assert_eq!(shape[1..].iter().product::<usize>(), n);
    for (i, &l) in labels.data.iter().enumerate() {
        let (organ, lesion) = (probs[i] > 0.5, probs[n + i] > 0.5);
        // regions_class_order [1, 2]: the lesion (2) is written over the organ (1).
        let expected = if lesion { 2.0 } else if organ { 1.0 } else { 0.0 };
        assert_eq!(l, expected, "voxel {i}: label {l} for region probabilities {} {}", probs[i], probs[n + i]);
    }
    let out = segk_cli(&["evaluate", pred.to_str().unwrap(), root.join("labelsTr").to_str().unwrap(), "-djfile", root.join("dataset.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pred.join("summary.json")).unwrap()).unwrap();
    let organ = &s["metric_per_case"][0]["metrics"]["(1, 2)"];
    let reference = imageio::read(&root.join("labelsTr/case_0000.nii.gz")).unwrap();
    let in_organ = |v: &[f32]| v.iter().filter(|&&l| l == 1.0 || l == 2.0).count() as f64;
    assert_eq!(organ["n_ref"].as_f64().unwrap(), in_organ(&reference.data), "the organ region counts labels 1 and 2 of the reference");
    assert_eq!(organ["n_pred"].as_f64().unwrap(), in_organ(&labels.data));
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's ResEnc M preset end to end: `segk train -p nnUNetResEncUNetMPlans` plans with
/// nnUNetPlannerResEncM, trains its ResidualEncoderUNet, validates, and `segk predict` reads
/// the model folder back; the weights carry dynamic_network_architectures' names.
#[test]
fn resenc_preset_trains_and_predicts() {
    let (base, root) = synth_dataset("resenc", "Dataset036_ResEnc", "3", "24,32,32");
    let out = segk_cli(&["train", root.to_str().unwrap(), "3d_fullres", "all", "-p", "nnUNetResEncUNetMPlans", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "1"]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("of nnUNetResEncUNetMPlans (ResidualEncoderUNet, blocks [1, 3, 4"), "the start-up line names the net: {stdout}");
    let model = base.join("segk_results/Dataset036_ResEnc/segkTrainer__nnUNetResEncUNetMPlans__3d_fullres");
    let plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("plans.json")).unwrap()).unwrap();
    assert_eq!(plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"], "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet");
    let weights = std::fs::read(model.join("fold_all/checkpoint_final.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&weights).unwrap().names().into_iter().map(str::to_string).collect();
    assert!(names.iter().any(|n| n == "encoder.stem.convs.0.conv.weight") && names.iter().any(|n| n == "encoder.stages.1.blocks.0.skip.1.conv.weight"), "{names:?}");
    predicts_on_the_input_grid(&base, &root, &model);
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's 3d_lowres: planned when the full-resolution patch covers little of the median
/// image (here forced small with -gpu_memory_target), trained on its own store at its coarser
/// spacing, learning; `segk predict` with its model folder writes label maps on the inputs'
/// own grids.
#[test]
fn lowres_configuration_trains_on_its_own_store_and_predicts() {
    let (base, root) = synth_dataset("lowres", "Dataset041_Low", "3", "32,48,48");
    let out = segk_cli(&["plan", root.to_str().unwrap(), "-gpu_memory_target", "0.02"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("3d_lowres: patch "), "{text}");
    let out = segk_cli(&["train", root.to_str().unwrap(), "3d_lowres", "all", "--device", "cpu", "--epochs", "4", "--iters-per-epoch", "20", "--val-iters", "3", "--workers", "1", "--no-validation"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("training 3d_lowres of nnUNetPlans"), "{text}");
    assert!(base.join("segk_preprocessed/Dataset041_Low/segk_nnUNetPlans_3d_lowres").is_dir(), "its own store");
    let (organ, last) = last_organ_dice(&text);
    assert!(organ > 0.6, "the organ is learnt at the coarse spacing: {last}");
    predicts_on_the_input_grid(&base, &root, &base.join("segk_results/Dataset041_Low/segkTrainer__nnUNetPlans__3d_lowres"));
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's 2d configuration on a thin-slab dataset (8 slices 5 mm apart): planned, trained
/// on slices with in-plane augmentation, learns, predicts slice by slice onto the input grid,
/// and its nnU-Net checkpoint holds Conv2d weights and in-plane mirroring.
#[test]
fn two_d_configuration_trains_on_slices_and_predicts() {
    let base = fresh_dir("2d");
    let root = base.join("Dataset043_Thin");
    assert!(segk_cli(&["synth", root.to_str().unwrap(), "--cases", "4", "--shape", "8,64,64", "--spacing", "5,1,1"]).status.success());
    let out = segk_cli(&["plan", root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("segk trains nnUNetPlans' 2d as planned"), "{text}");
    let out = segk_cli(&["train", root.to_str().unwrap(), "2d", "all", "--device", "cpu", "--epochs", "4", "--iters-per-epoch", "30", "--val-iters", "3", "--workers", "1", "--no-validation"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("training 2d of nnUNetPlans") && text.contains("patch [1, "), "{text}");
    let (organ, last) = last_organ_dice(&text);
    assert!(organ > 0.6, "the organ is learnt slice by slice: {last}");
    let model = base.join("segk_results/Dataset043_Thin/segkTrainer__nnUNetPlans__2d");
    predicts_on_the_input_grid(&base, &root, &model);
    let ckpt = segk::pth::TorchCheckpoint::open(&model.join("fold_all/checkpoint_final.pth")).unwrap();
    assert_eq!(ckpt.mirror_axes, Some(vec![0, 1]));
    assert_eq!(ckpt.configuration.as_deref(), Some("2d"));
    assert_eq!(ckpt.shape("encoder.stages.0.0.convs.0.conv.weight").map(|s| s.len()), Some(4), "Conv2d weights");
    let _ = std::fs::remove_dir_all(&base);
}

/// A 2D dataset as nnU-Net takes one: one-slice NIfTI images (slice spacing 999, nnU-Net's
/// convention for 2D images). nnU-Net plans only 2d for it; it trains, validates and predicts.
#[test]
fn a_one_slice_dataset_trains_2d() {
    use segk::imageio::{header_for, write, Volume, VoxelType};
    let base = fresh_dir("flat");
    let root = base.join("Dataset045_Flat");
    for d in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for i in 0..6usize {
        let (h, w) = (64 + 2 * i, 60);
        let (cy, cx, r) = (20.0 + 3.0 * i as f64, 38.0 - 2.0 * i as f64, 9.0 + i as f64);
        let lab: Vec<f32> = (0..h * w).map(|v| f32::from(u8::from((((v / w) as f64 - cy).powi(2) + ((v % w) as f64 - cx).powi(2)) < r * r))).collect();
        let img: Vec<f32> = lab.iter().enumerate().map(|(v, &l)| 3.0 * l + ((v * 7919 % 101) as f32 / 50.0 - 1.0)).collect();
        let (shape, spacing) = ([1, h, w], [999.0, 0.5, 0.5]);
        let vol = |data: Vec<f32>| Volume { shape, spacing, affine: [[0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 999.0, 0.0]], data, header: header_for(shape, spacing, eye, [0.0; 3]) };
        write(&root.join(format!("imagesTr/c{i:03}_0000.nii.gz")), &vol(img), VoxelType::F32).unwrap();
        write(&root.join(format!("labelsTr/c{i:03}.nii.gz")), &vol(lab), VoxelType::U8).unwrap();
    }
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "MRI"}, "labels": {"background": 0, "disc": 1}, "numTraining": 6, "file_ending": ".nii.gz"}"#).unwrap();
    let out = segk_cli(&["plan", root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("segk trains nnUNetPlans' 2d as planned") && !text.contains("3d_fullres: patch"), "{text}");
    let out = segk_cli(&["train", root.to_str().unwrap(), "2d", "0", "--device", "cpu", "--epochs", "3", "--iters-per-epoch", "20", "--val-iters", "2", "--workers", "1"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("validation: 2 cases"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let (dice, last) = last_organ_dice(&text);
    assert!(dice > 0.8, "the disc is learnt: {last}");
    let out = segk_cli(&["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", base.join("pred").to_str().unwrap(), "-m", base.join("segk_results/Dataset045_Flat/segkTrainer__nnUNetPlans__2d").to_str().unwrap(), "--device", "cpu"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(segk::imageio::read(&base.join("pred/c005.nii.gz")).unwrap().shape, [1, 74, 60]);
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's cascade: 3d_cascade_fullres is refused until 3d_lowres's validation has written
/// its inputs (the file named), then trains on them as extra one-hot channels, validates with
/// them, and predicts only with the previous stage's label maps (--prev-stage-predictions).
#[test]
fn cascade_trains_on_the_lowres_predictions_and_predicts_with_them() {
    let (base, root) = synth_dataset("cascade", "Dataset044_Cascade", "3", "32,48,48");
    let out = segk_cli(&["plan", root.to_str().unwrap(), "-gpu_memory_target", "0.02"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("segk trains nnUNetPlans' 3d_cascade_fullres as planned") && text.contains("after every fold of 3d_lowres"), "{text}");
    let train = |c: &str| segk_cli(&["train", root.to_str().unwrap(), c, "all", "--device", "cpu", "--epochs", "3", "--iters-per-epoch", "20", "--val-iters", "2", "--workers", "1"]);
    let out = train("3d_cascade_fullres");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("predicted_next_stage/3d_cascade_fullres/case_0000.nii.gz: missing"), "{err}");
    let out = train("3d_lowres");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("are also 3d_cascade_fullres's inputs"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let results = base.join("segk_results/Dataset044_Cascade");
    let cascade = results.join("segkTrainer__nnUNetPlans__3d_cascade_fullres");
    let _ = std::fs::remove_dir_all(&cascade);
    let out = train("3d_cascade_fullres");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("cascade: 3d_cascade_fullres takes 3d_lowres's cross-validation predictions") && text.contains("validation: 3 cases"), "{text}");
    let (organ, last) = last_organ_dice(&text);
    assert!(organ > 0.6, "the cascade learns the organ: {last}");
    // One input channel plus one per foreground label (organ, lesion).
    let ckpt = segk::pth::TorchCheckpoint::open(&cascade.join("fold_all/checkpoint_final.pth")).unwrap();
    assert_eq!(ckpt.shape("encoder.stages.0.0.convs.0.conv.weight").map(|s| s[1]), Some(3));
    let images = root.join("imagesTr");
    let predict = |model: &std::path::Path, out: &str, extra: &[&str]| {
        let mut args = vec!["predict", "-i", images.to_str().unwrap(), "-m", model.to_str().unwrap(), "--device", "cpu", "--no-tta", "-o"];
        let o = base.join(out);
        args.push(o.to_str().unwrap());
        args.extend_from_slice(extra);
        segk_cli(&args)
    };
    assert!(predict(&results.join("segkTrainer__nnUNetPlans__3d_lowres"), "low", &[]).status.success());
    let out = predict(&cascade, "casc", &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--prev-stage-predictions"));
    let low = base.join("low");
    let out = predict(&cascade, "casc", &["--prev-stage-predictions", low.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |p: std::path::PathBuf| segk::imageio::read(&p).unwrap().shape;
    assert_eq!(read(base.join("casc/case_0001.nii.gz")), read(root.join("labelsTr/case_0001.nii.gz")));
    // When the cascade wins (its validations planted as the references), the instructions
    // predict its previous stage first and hand that to it.
    let val = cascade.join("fold_all/validation");
    for case in segk::predict::names_in(&val, |n| n.strip_suffix(".nii.gz")).unwrap() {
        std::fs::copy(root.join(format!("labelsTr/{case}.nii.gz")), val.join(format!("{case}.nii.gz"))).unwrap();
    }
    let out = segk_cli(&["find-best-configuration", root.to_str().unwrap(), "-c", "3d_lowres", "3d_cascade_fullres", "-f", "all", "--disable-ensembling"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let instructions = std::fs::read_to_string(results.join("inference_instructions.txt")).unwrap();
    let first = "segk predict -d Dataset044_Cascade -i INPUT_FOLDER -o OUTPUT_FOLDER_PREV_STAGE -f all -tr segkTrainer -c 3d_lowres -p nnUNetPlans\n";
    let then = "segk predict -d Dataset044_Cascade -i INPUT_FOLDER -o OUTPUT_FOLDER -f all -tr segkTrainer -c 3d_cascade_fullres -p nnUNetPlans --prev-stage-predictions OUTPUT_FOLDER_PREV_STAGE\n";
    assert!(instructions.contains(&format!("{first}{then}")), "{instructions}");
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's model selection end to end on generated data: 3d_fullres and 3d_lowres each
/// trained on folds 0 and 1 with --npz, then `segk find-best-configuration -c 3d_fullres
/// 3d_lowres -f 0 1` gathers each one's validation predictions, scores them and their ensemble,
/// picks the best, determines its postprocessing and writes nnU-Net's inference_information.json
/// and inference_instructions.txt with segk's commands.
#[test]
fn find_best_configuration_compares_configurations_and_their_ensemble() {
    let (base, root) = synth_dataset("select", "Dataset042_Select", "5", "32,48,48");
    assert!(segk_cli(&["plan", root.to_str().unwrap(), "-gpu_memory_target", "0.02"]).status.success());
    for c in ["3d_fullres", "3d_lowres"] {
        for f in ["0", "1"] {
            let out = segk_cli(&["train", root.to_str().unwrap(), c, f, "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--workers", "1", "--npz"]);
            assert!(out.status.success(), "{c} fold {f}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    }
    let out = segk_cli(&["find-best-configuration", root.to_str().unwrap(), "-c", "3d_fullres", "3d_lowres", "-f", "0", "1"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let results = base.join("segk_results/Dataset042_Select");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(results.join("inference_information.json")).unwrap()).unwrap();
    let all = info["all_results"].as_object().unwrap();
    let ensemble = "ensemble___segkTrainer__nnUNetPlans__3d_fullres___segkTrainer__nnUNetPlans__3d_lowres___0_1";
    for k in ["segkTrainer__nnUNetPlans__3d_fullres", "segkTrainer__nnUNetPlans__3d_lowres", ensemble] {
        assert!(all.contains_key(k), "{k} scored: {info}");
    }
    let best = all.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(info["best_model_or_ensemble"]["result_on_crossval_pre_pp"].as_f64(), Some(best), "{info}");
    // Two folds of a five-fold split of five cases: two cross-validation cases (label maps only;
    // the ensembles read the probabilities where validation wrote them, with --npz).
    let model = results.join("segkTrainer__nnUNetPlans__3d_fullres");
    let merged = model.join("crossval_results_folds_0_1");
    assert_eq!(segk::predict::names_in(&merged, |n| n.strip_suffix(".nii.gz")).unwrap().len(), 2);
    assert_eq!(segk::predict::names_in(&model.join("fold_0/validation"), |n| n.strip_suffix(".npz")).unwrap().len(), 1);
    assert!(results.join("ensembles").join(ensemble).join("summary.json").is_file());
    assert!(std::path::Path::new(info["best_model_or_ensemble"]["postprocessing_file"].as_str().unwrap()).is_file(), "{info}");
    let instructions = std::fs::read_to_string(results.join("inference_instructions.txt")).unwrap();
    assert!(instructions.contains("segk predict -d Dataset042_Select -i INPUT_FOLDER") && instructions.contains("segk postprocess -i OUTPUT_FOLDER"), "{instructions}");
    // Better by construction: 3d_lowres's validations replaced by the references themselves.
    // Listed second, it must still win, with a Dice of 1 and no postprocessing to gain.
    let lowres = results.join("segkTrainer__nnUNetPlans__3d_lowres");
    for f in ["0", "1"] {
        let val = lowres.join(format!("fold_{f}/validation"));
        for case in segk::predict::names_in(&val, |n| n.strip_suffix(".nii.gz")).unwrap() {
            std::fs::copy(root.join(format!("labelsTr/{case}.nii.gz")), val.join(format!("{case}.nii.gz"))).unwrap();
        }
    }
    let out = segk_cli(&["find-best-configuration", root.to_str().unwrap(), "-c", "3d_fullres", "3d_lowres", "-f", "0", "1", "--disable-ensembling"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(results.join("inference_information.json")).unwrap()).unwrap();
    let best = &info["best_model_or_ensemble"];
    assert_eq!(best["selected_model_or_models"][0]["configuration"], "3d_lowres", "{info}");
    assert_eq!(best["result_on_crossval_pre_pp"].as_f64(), Some(1.0), "{info}");
    let _ = std::fs::remove_dir_all(&base);
}
