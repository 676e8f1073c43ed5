//! nnU-Net's exact plans: for eleven generated datasets (tests/fixtures/nnunet_plans, written by
//! nnunetv2 2.8.1 itself with make.py beside them), every planner's plans file -- 2d,
//! 3d_fullres, 3d_lowres and 3d_cascade_fullres where nnU-Net makes them, every field -- is
//! reproduced byte for byte; and nnU-Net's files read back and write out unchanged.

use segk::dataset::DatasetJson;
use segk::plan::nnunet::{plan_experiment, NnunetFingerprint, PLANNERS};
use segk::plan::plans_json::{to_python_json, PlansJson};
use std::path::{Path, PathBuf};

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nnunet_plans");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("dataset.json").is_file()).collect();
    v.sort();
    assert!(v.len() >= 10, "fixtures missing under {}", root.display());
    v
}

fn read<T: serde::de::DeserializeOwned>(p: &Path) -> T {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The first differing line of two texts, for a readable failure.
fn first_difference(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let i = la.iter().zip(&lb).position(|(x, y)| x != y).unwrap_or(la.len().min(lb.len()));
    format!("line {}: segk {:?}, nnU-Net {:?}", i + 1, la.get(i), lb.get(i))
}

#[test]
fn every_planner_reproduces_nnunets_plans_on_every_fixture() {
    let mut configs = std::collections::BTreeSet::new();
    for dir in scenarios() {
        let json: DatasetJson = read(&dir.join("dataset.json"));
        let fp: NnunetFingerprint = read(&dir.join("dataset_fingerprint.json"));
        for p in &PLANNERS {
            let file = dir.join(format!("{}.json", p.plans_name));
            let theirs = std::fs::read_to_string(&file).unwrap();
            let want: serde_json::Value = serde_json::from_str(&theirs).unwrap();
            let name = want["dataset_name"].as_str().unwrap();
            let plans = plan_experiment(p, name, &json, &fp, "SimpleITKIO", None).unwrap();
            let ours = String::from_utf8(to_python_json(&plans).unwrap()).unwrap();
            // Field by field first (ints and floats told apart), then the bytes.
            let got: serde_json::Value = serde_json::from_str(&ours).unwrap();
            assert_eq!(got, want, "{}: {}", file.display(), first_difference(&ours, &theirs));
            assert_eq!(ours, theirs, "{}: {}", file.display(), first_difference(&ours, &theirs));
            configs.extend(plans.configurations.keys().map(String::from));
        }
    }
    // The fixtures cover every configuration nnU-Net plans.
    assert_eq!(configs.into_iter().collect::<Vec<_>>(), ["2d", "3d_cascade_fullres", "3d_fullres", "3d_lowres"]);
}

#[test]
fn nnunets_plans_files_read_and_write_back_unchanged() {
    for dir in scenarios() {
        for p in &PLANNERS {
            let file = dir.join(format!("{}.json", p.plans_name));
            let theirs = std::fs::read_to_string(&file).unwrap();
            let plans: PlansJson = serde_json::from_str(&theirs).unwrap();
            assert_eq!(String::from_utf8(to_python_json(&plans).unwrap()).unwrap(), theirs, "{}", file.display());
        }
    }
    // Keys segk does not know survive, in a configuration and at the top.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scenarios()[0].join("nnUNetPlans.json")).unwrap()).unwrap();
    v["configurations"]["3d_fullres"]["my_key"] = serde_json::json!([1, 2.5]);
    v["my_top"] = serde_json::json!("x");
    let plans: PlansJson = serde_json::from_value(v.clone()).unwrap();
    let back: serde_json::Value = serde_json::from_slice(&to_python_json(&plans).unwrap()).unwrap();
    assert_eq!(back, v);
}

#[test]
fn python_float_repr() {
    use segk::plan::plans_json::python_float;
    for (v, s) in [(1.0, "1.0"), (1e-5, "1e-05"), (0.7000099999999999, "0.7000099999999999"), (163.5, "163.5"), (0.0001, "0.0001"), (1.5e-7, "1.5e-07"), (1e16, "1e+16"), (123456789012345.0, "123456789012345.0"), (-2.5, "-2.5"), (560000000.0, "560000000.0"), (0.0, "0.0")] {
        assert_eq!(python_float(v), s, "{v:e}");
    }
}

/// `segk plan -pl`: nnU-Net's plans file, with segk's memory per configuration; an existing
/// plans file with other contents is kept, not rewritten, and used.
#[test]
fn segk_plan_writes_nnunets_plans_and_keeps_a_different_file() {
    let base = std::env::temp_dir().join(format!("segk-nnplans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset905_Plans");
    let segk = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_raw").output().unwrap();
    let out = segk(&["synth", root.to_str().unwrap(), "--cases", "4", "--shape", "24,40,40"]);
    assert!(out.status.success());
    let out = segk(&["plan", root.to_str().unwrap(), "-pl", "ExperimentPlanner"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let file = base.join("segk_preprocessed/Dataset905_Plans/nnUNetPlans.json");
    let plans: PlansJson = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(plans.plans_name, "nnUNetPlans");
    assert_eq!(plans.experiment_planner_used, "ExperimentPlanner");
    assert!(plans.configurations.get("3d_fullres").is_some() && plans.configurations.get("2d").is_some());
    assert!(stdout.contains("3d_fullres: patch ") && stdout.contains("at checkpoint levels 0 / 1 / 2"), "{stdout}");
    assert!(stdout.contains("segk trains nnUNetPlans' 3d_fullres as planned") && stdout.contains("segk trains nnUNetPlans' 2d as planned"), "{stdout}");
    assert!(stdout.contains("2d: patch ") && stdout.lines().filter(|l| l.contains("at checkpoint levels 0 / 1 / 2")).count() == 2, "2d's memory too: {stdout}");
    assert!(!base.join("segk_preprocessed/Dataset905_Plans/plans.json").exists(), "plans files by plans name only");
    // A plans file already there (nnU-Net's, or edited by hand) is read and used unchanged: a
    // 3d_fullres batch of 3, a smaller patch and other intensity statistics are what segk then
    // trains with, and the model folder carries that file as its plans.json (as nnU-Net's).
    let mut edited: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    edited["configurations"]["3d_fullres"]["batch_size"] = serde_json::json!(3);
    edited["configurations"]["3d_fullres"]["patch_size"] = serde_json::json!([16, 32, 32]);
    edited["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] = serde_json::json!(120.0);
    let edited_bytes = to_python_json(&edited).unwrap();
    std::fs::write(&file, &edited_bytes).unwrap();
    let out = segk(&["plan", root.to_str().unwrap()]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("kept as it is, and used"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read(&file).unwrap(), edited_bytes, "never rewritten");
    let out = segk(&["train", root.to_str().unwrap(), "3d_fullres", "all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "1", "--no-validation"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("patch [16, 32, 32], batch 3"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let model_plans = std::fs::read(base.join("segk_results/Dataset905_Plans/segkTrainer__nnUNetPlans__3d_fullres/plans.json")).unwrap();
    assert_eq!(model_plans, edited_bytes, "the model folder carries the plans file byte for byte");
    std::fs::remove_file(&file).unwrap();
    assert!(segk(&["plan", root.to_str().unwrap()]).status.success());
    // nnU-Net's -gpu_memory_target shrinks the default planner's patch as it does nnU-Net's.
    let small = segk(&["plan", root.to_str().unwrap(), "-gpu_memory_target", "0.001", "--out", base.join("small").to_str().unwrap()]);
    assert!(small.status.success(), "{}", String::from_utf8_lossy(&small.stderr));
    let small: PlansJson = serde_json::from_slice(&std::fs::read(base.join("small/nnUNetPlans.json")).unwrap()).unwrap();
    let voxels = |p: &PlansJson| p.configurations.get("3d_fullres").unwrap().patch_size.clone().unwrap().iter().product::<usize>();
    assert!(voxels(&small) < voxels(&plans), "{} vs {}", voxels(&small), voxels(&plans));
    // --gpu-memory: segk's own sizing (segkPlans.json, nnU-Net's schema), said to deviate. The
    // store first as nnUNetPlans has it now (the training above preprocessed with the edited
    // file's statistics).
    let pre = segk(&["preprocess", root.to_str().unwrap(), "-c", "3d_fullres"]);
    assert!(pre.status.success() && String::from_utf8_lossy(&pre.stdout).contains("4 cases preprocessed"), "{}", String::from_utf8_lossy(&pre.stdout));
    let own = segk(&["plan", root.to_str().unwrap(), "--gpu-memory", "1"]);
    assert!(own.status.success() && String::from_utf8_lossy(&own.stdout).contains("a deviation from nnU-Net's plan"));
    let sized: PlansJson = serde_json::from_slice(&std::fs::read(base.join("segk_preprocessed/Dataset905_Plans/segkPlans.json")).unwrap()).unwrap();
    assert_eq!((sized.plans_name.as_str(), sized.configurations.keys().collect::<Vec<_>>()), ("segkPlans", vec!["3d_fullres"]));
    assert_eq!(sized.extra["segk"]["gpu_memory_budget_bytes"], serde_json::json!(1u64 << 30));
    let (a, b) = (sized.configurations.get("3d_fullres").unwrap(), plans.configurations.get("3d_fullres").unwrap());
    assert_eq!((&a.spacing, &a.data_identifier, &a.normalization_schemes), (&b.spacing, &b.data_identifier, &b.normalization_schemes), "only the patch, batch and network change");
    // It preprocesses as nnUNetPlans does: the store made above is shared, not redone.
    let pre = segk(&["preprocess", root.to_str().unwrap(), "-p", "segkPlans"]);
    let text = String::from_utf8_lossy(&pre.stdout);
    assert!(text.contains("3d_fullres: 0 cases preprocessed, 4 already done") && text.contains("segkPlans has no configuration 2d: skipped"), "{text}");
    // The same plan again: unchanged. An edited file: kept.
    let out = segk(&["plan", root.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("is already this plan"));
    std::fs::write(&file, b"{\"edited\": true}").unwrap();
    let out = segk(&["plan", root.to_str().unwrap(), "-pl", "ExperimentPlanner"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept as it is"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read(&file).unwrap(), b"{\"edited\": true}");
    // What is kept is what is used: one that is not a plans file is refused, by name.
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not an nnU-Net plans file"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&file).unwrap();
    // An unknown planner is named with nnU-Net's.
    let out = segk(&["plan", root.to_str().unwrap(), "-pl", "MyPlanner"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nnUNetPlannerResEncM"));
    // nnU-Net's PlansManager loads what segk writes and builds every network, where nnunetv2 is
    // installed (tests/fixtures/nnunet_plans/make.py's venv).
    let py = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/segk/nnunet-venv/bin/python");
    if py.is_file() {
        for planner in ["ExperimentPlanner", "nnUNetPlannerResEncM"] {
            let out = segk(&["plan", root.to_str().unwrap(), "-pl", planner]);
            assert!(out.status.success());
        }
        for name in ["nnUNetPlans.json", "nnUNetResEncUNetMPlans.json", "segkPlans.json"] {
            let make = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nnunet_plans/make.py");
            let f = base.join("segk_preprocessed/Dataset905_Plans").join(name);
            let out = std::process::Command::new(&py).arg(make).arg("--check-load").arg(&f).arg(root.join("dataset.json")).output().unwrap();
            assert!(out.status.success(), "nnU-Net could not load {}:\n{}{}", f.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
    } else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED nnU-Net loading segk's plans: no nnunetv2 venv at {} (tests/fixtures/nnunet_plans/make.py says how to make one)", py.display());
    }
    let _ = std::fs::remove_dir_all(&base);
}
