//! Models trained by nnU-Net itself (tests/fixtures/nnunet_model, made by make.py there with
//! nnunetv2 2.8.1): `segk predict -m` on nnU-Net's model folders gives nnU-Net's labels and
//! probabilities; bad checkpoints get one clear error; segk's .pth export reads back;
//! prediction sharded over jobs equals one run.

use segk::imageio;
use segk::predict::probs::read_npz;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nnunet_model")
}

const PLAIN: &str = "plain/nnUNetTrainer__nnUNetPlans__3d_fullres";
const RESENC: &str = "resenc/nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres";
const PLAIN_2D: &str = "plain2d/nnUNetTrainer__nnUNetPlans__2d";
const CASES: [&str; 3] = ["ts_000", "ts_001", "ts_002"];

fn fresh_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-nnmodel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn segk(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `segk predict` on the CPU in f32, nnU-Net's own precision there.
fn predict(model: &str, out: &Path, extra: &[&str]) -> String {
    predict_in(model, out, "f32", extra)
}

fn predict_in(model: &str, out: &Path, precision: &str, extra: &[&str]) -> String {
    let (images, model) = (fixture().join("imagesTs"), fixture().join(model));
    let mut args = vec!["predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-m", model.to_str().unwrap(), "-f", "0", "--device", "cpu", "--precision", precision];
    args.extend_from_slice(extra);
    let (ok, text) = segk(&args);
    assert!(ok, "{text}");
    text
}

/// Labels: the share of voxels equal to nnU-Net's. Probabilities: the largest difference.
fn compare(mine: &Path, theirs: &Path, case: &str) -> (f64, f32) {
    let (a, b) = (imageio::read(&mine.join(format!("{case}.nii.gz"))).unwrap(), imageio::read(&theirs.join(format!("{case}.nii.gz"))).unwrap());
    assert_eq!(a.shape, b.shape, "{case}");
    let same = a.data.iter().zip(&b.data).filter(|(x, y)| x == y).count() as f64 / a.data.len() as f64;
    let (sa, pa) = read_npz(&mine.join(format!("{case}.npz"))).unwrap();
    let (sb, pb) = read_npz(&theirs.join(format!("{case}.npz"))).unwrap();
    assert_eq!(sa, sb, "{case}: probability shapes");
    (same, pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max))
}

/// nnU-Net's own model folders, plain and ResEnc M 3d_fullres and plain 2d, TTA on and off: segk's labels are
/// nnU-Net's (the fixture's cases include crop-to-nonzero, resampling on the way in and
/// out, the separate-z path and several tiles). Probabilities: within float rounding of nnU-Net
/// run with float32 sliding-window sums, and within nnU-Net's float16 rounding of its
/// files as nnUNetv2_predict writes them (it sums the tiles in float16, even on the CPU).
#[test]
fn nnunet_model_folders_predict_as_nnunet_does() {
    let base = fresh_dir("predict");
    for (model, tta, theirs, f32acc) in [
        (PLAIN, true, "plain/pred_tta", Some("plain/pred_tta_f32acc")),
        (PLAIN, false, "plain/pred_notta", None),
        (RESENC, true, "resenc/pred_tta", Some("resenc/pred_tta_f32acc")),
        (PLAIN_2D, true, "plain2d/pred_tta", Some("plain2d/pred_tta_f32acc")),
        (PLAIN_2D, false, "plain2d/pred_notta", None),
    ] {
        let out = base.join(format!("{}-{tta}", model.split('/').next().unwrap()));
        let mut extra = vec!["--save-probabilities"];
        if !tta {
            extra.push("--disable_tta");
        }
        let text = predict(model, &out, &extra);
        assert!(text.contains("nnU-Net's checkpoint_final.pth, trainer nnUNetTrainer"), "{text}");
        for case in CASES {
            let (same, fp16) = compare(&out, &fixture().join(theirs), case);
            eprintln!("{model} tta {tta} {case}: labels equal on {:.4} %, probabilities within {fp16:.2e} of nnUNetv2_predict's", 100.0 * same);
            assert!(same >= 0.999, "{model} {case}: labels equal on only {:.3} % of voxels", 100.0 * same);
            assert!(fp16 <= 5e-3, "{model} {case}: probabilities {fp16} from nnU-Net's");
            if let Some(f32acc) = f32acc {
                let (same, d) = compare(&out, &fixture().join(f32acc), case);
                assert!(same == 1.0 && d <= 1e-5, "{model} {case}: against f32 sums, labels {same}, probabilities {d}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// bf16 on the CPU (`--precision auto`, the default where the CPU has AVX512-BF16) against
/// f32 on nnU-Net's models: labels equal on at least 99.9 % of voxels, probabilities within
/// 1e-2 (the gate for making bf16 the default); and the same against nnUNetv2_predict's.
#[test]
fn bf16_prediction_keeps_f32_labels() {
    if !segk::backend::cpu::bf16::available() {
        println!("SKIPPED bf16_prediction_keeps_f32_labels: this CPU has no AVX512-BF16");
        return;
    }
    let base = fresh_dir("bf16");
    for (model, tta, theirs) in [(PLAIN, false, "plain/pred_notta"), (PLAIN, true, "plain/pred_tta"), (RESENC, true, "resenc/pred_tta"), (PLAIN_2D, false, "plain2d/pred_notta")] {
        let tag = format!("{}-{tta}", model.split('/').next().unwrap());
        let mut extra = vec!["--save-probabilities"];
        if !tta {
            extra.push("--disable_tta");
        }
        let (f32_out, bf16_out) = (base.join(format!("{tag}-f32")), base.join(format!("{tag}-bf16")));
        predict(model, &f32_out, &extra);
        let text = predict_in(model, &bf16_out, "auto", &extra);
        assert!(text.contains("bf16 convolutions on AVX512-BF16"), "{text}");
        for case in CASES {
            let (same, d) = compare(&bf16_out, &f32_out, case);
            let (same_nn, d_nn) = compare(&bf16_out, &fixture().join(theirs), case);
            eprintln!("{model} tta {tta} {case} bf16: labels equal to f32 on {:.4} %, probabilities within {d:.2e}; to nnUNetv2_predict's on {:.4} %, within {d_nn:.2e}", 100.0 * same, 100.0 * same_nn);
            assert!(same >= 0.999 && d <= 1e-2, "{model} tta {tta} {case}: bf16 labels equal to f32 on {:.3} %, probabilities {d}", 100.0 * same);
            assert!(same_nn >= 0.999 && d_nn <= 1e-2, "{model} tta {tta} {case}: bf16 labels equal to nnU-Net's on {:.3} %, probabilities {d_nn}", 100.0 * same_nn);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// A foreign PyTorch file, a pickle that would run a command if Python unpickled it, a
/// truncated checkpoint and a checkpoint of another network: each one error naming the file
/// and the problem; nothing is executed.
#[test]
fn bad_checkpoints_get_one_clear_error() {
    let base = fresh_dir("bad");
    let model = base.join("nnUNetTrainer__nnUNetPlans__3d_fullres");
    std::fs::create_dir_all(model.join("fold_0")).unwrap();
    for f in ["plans.json", "dataset.json"] {
        std::fs::copy(fixture().join(PLAIN).join(f), model.join(f)).unwrap();
    }
    let good = std::fs::read(fixture().join(PLAIN).join("fold_0/checkpoint_final.pth")).unwrap();
    let resenc = std::fs::read(fixture().join(RESENC).join("fold_0/checkpoint_final.pth")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("foreign", std::fs::read(fixture().join("bad/foreign.pth")).unwrap(), "not an nnU-Net checkpoint (no network_weights; its top-level keys are model)"),
        ("malicious", std::fs::read(fixture().join("bad/malicious.pth")).unwrap(), "not an nnU-Net checkpoint (its top level is an object"),
        ("truncated", good[..good.len() / 2].to_vec(), "not a readable PyTorch checkpoint"),
        ("another network", resenc, "tensor encoder.stages.0.0.convs.0.conv.weight is missing (a checkpoint of another network?)"),
        ("not a zip", b"hello".to_vec(), "not a readable PyTorch checkpoint"),
    ];
    let pwned = Path::new("/tmp/segk_pwned");
    let _ = std::fs::remove_file(pwned);
    for (what, bytes, expect) in cases {
        let ckpt = model.join("fold_0/checkpoint_final.pth");
        std::fs::write(&ckpt, bytes).unwrap();
        let images = fixture().join("imagesTs");
        let out = base.join("out");
        let (ok, text) = segk(&["predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-m", model.to_str().unwrap(), "-f", "0", "--device", "cpu", "--disable_tta"]);
        assert!(!ok, "{what}: {text}");
        let error: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(error.len(), 1, "{what}: one error line\n{text}");
        assert!(error[0].contains(ckpt.to_str().unwrap()) && error[0].contains(expect), "{what}: {text}");
        assert!(!text.contains("panicked"), "{what}: {text}");
    }
    assert!(!pwned.exists(), "the malicious pickle ran its command");
    let _ = std::fs::remove_dir_all(&base);
}

/// Every key of nnU-Net's state dicts (PlainConvUNet and ResidualEncoderUNet, read from the
/// fixtures' checkpoints) is one of segk's parameter names or an alias `aliases_of` derives
/// from one; so segk's .pth export lists exactly the keys a strict `load_state_dict` wants.
#[test]
fn aliases_are_the_ones_pytorch_lists() {
    for model in [PLAIN, RESENC] {
        let ckpt = segk::pth::TorchCheckpoint::open(&fixture().join(model).join("fold_0/checkpoint_final.pth")).unwrap();
        let mut derived: Vec<String> = ckpt.names().iter().flat_map(|n| std::iter::once(n.to_string()).chain(segk::pth::aliases_of(n))).collect();
        derived.sort();
        let stored: Vec<String> = ckpt.all_names().iter().map(|s| s.to_string()).collect();
        assert_eq!(derived, stored, "{model}");
        assert!(stored.len() > ckpt.names().len(), "{model} has aliases");
    }
}

/// segk's .pth export read back: every tensor and alias, values exact, and the values nnU-Net's
/// predictor reads (trainer, configuration, mirroring axes).
#[test]
fn exported_checkpoints_read_back() {
    let dir = fresh_dir("export");
    std::fs::create_dir_all(&dir).unwrap();
    let weights = vec![
        ("encoder.stages.0.0.convs.0.conv.weight".to_string(), vec![2, 1, 1, 3, 3], (0..18).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<f32>>()),
        ("encoder.stages.0.0.convs.0.norm.bias".to_string(), vec![2], vec![f32::MIN_POSITIVE, -1e30]),
        ("decoder.seg_layers.0.weight".to_string(), vec![3, 2, 1, 1, 1], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    ];
    let plans = serde_json::json!({"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {"patch_size": [20, 28, 24], "spacing": [2.0, 1.0, 1.0]}}, "x": null, "flag": true});
    let ds = serde_json::json!({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"});
    let info = segk::pth::CheckpointInfo { configuration: "3d_fullres", fold: "2", plans: &plans, dataset_json: &ds, epoch: 7, best_ema: Some(0.5), mirror_axes: &[0, 1, 2] };
    let path = dir.join("checkpoint_final.pth");
    segk::pth::write_checkpoint(&path, &weights, &info).unwrap();
    let ckpt = segk::pth::TorchCheckpoint::open(&path).unwrap();
    assert_eq!((ckpt.trainer_name.as_deref(), ckpt.configuration.as_deref(), ckpt.mirror_axes.clone()), (Some("nnUNetTrainer"), Some("3d_fullres"), Some(vec![0, 1, 2])));
    for (name, shape, data) in &weights {
        for key in std::iter::once(name.clone()).chain(segk::pth::aliases_of(name)) {
            assert_eq!(ckpt.tensor(&key).unwrap(), Some((shape.clone(), data.clone())), "{key}");
        }
    }
    assert_eq!(ckpt.all_names().len(), 4 + 4 + 1, "an encoder conv and norm: themselves, all_modules, the decoder's twin and its all_modules; a head: itself");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--num-parts N --part-id I` splits the cases as nnU-Net does (every N-th of the sorted list),
/// the parts together are one unsharded run, and `--continue` skips what is already there.
#[test]
fn sharded_prediction_equals_one_run() {
    let base = fresh_dir("shard");
    let whole = base.join("whole");
    predict(PLAIN, &whole, &["--disable_tta"]);
    let parts = base.join("parts");
    for part in ["0", "1"] {
        let text = predict(PLAIN, &parts, &["--disable_tta", "--num-parts", "2", "--part-id", part]);
        assert!(text.contains(&format!("part {part} of 2: {} of the 3 cases", if part == "0" { 2 } else { 1 })), "{text}");
    }
    for case in CASES {
        let f = format!("{case}.nii.gz");
        assert_eq!(imageio::read(&whole.join(&f)).unwrap().data, imageio::read(&parts.join(&f)).unwrap().data, "{case}");
    }
    std::fs::remove_file(parts.join("ts_001.nii.gz")).unwrap();
    let text = predict(PLAIN, &parts, &["--disable_tta", "--continue"]);
    assert!(text.contains("--continue: 2 already predicted") && text.contains("1 to do") && text.contains("wrote 1 label map"), "{text}");
    assert!(parts.join("ts_001.nii.gz").is_file());
    let (ok, text) = segk(&["predict", "-i", "x", "-o", "y", "-m", fixture().join(PLAIN).to_str().unwrap(), "--num-parts", "2", "--part-id", "2"]);
    assert!(!ok && text.contains("--part-id must be below --num-parts"), "{text}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Fine-tuning (`segk train --pretrained-weights`): every weight but the segmentation heads
/// comes from the file, nnU-Net's .pth or segk's .safetensors alike; a file of another
/// network is refused before training with every mismatch named.
#[test]
fn pretrained_weights_start_fine_tuning() {
    use segk::backend::cpu::CpuBackend;
    use segk::backend::Backend;
    use segk::checkpoint::{load_pretrained, load_weights, WeightsFile};
    let base = fresh_dir("finetune");
    let root = base.join("Dataset039_Tune");
    let (ok, text) = segk(&["synth", root.to_str().unwrap(), "--cases", "3", "--shape", "16,24,24", "--spacing", "1,1,1"]);
    assert!(ok, "{text}");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", root.to_str().unwrap(), "3d_fullres", "all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "1", "--no-validation"];
        args.extend_from_slice(extra);
        segk(&args)
    };
    let (ok, text) = train(&[]);
    assert!(ok, "{text}");
    let model = base.join("segk_results/Dataset039_Tune/segkTrainer__nnUNetPlans__3d_fullres");
    let fold = model.join("fold_all");
    assert!(fold.join("checkpoint_final.pth").is_file(), "{text}");

    let m = segk::predict::Model::open(&model, Some(&["all".to_string()]), "checkpoint_final").unwrap();
    let be = CpuBackend::<f32>::new();
    let params = |net: &segk::model::UNet<CpuBackend<f32>>| {
        let mut v = vec![0.0f32; net.layout.len];
        be.download(net.params(&be), &mut v).unwrap();
        v
    };
    let mut trained = segk::model::UNet::new(&be, m.plan.topology.clone(), 1).unwrap();
    load_weights(&fold, &WeightsFile::Segk("checkpoint_final".into()), &be, &mut trained).unwrap();
    let trained = params(&trained);
    for file in ["checkpoint_final.pth", "checkpoint_final.safetensors"] {
        let mut net = segk::model::UNet::new(&be, m.plan.topology.clone(), 77).unwrap();
        let fresh = params(&net);
        let n = load_pretrained(&fold.join(file), &be, &mut net).unwrap();
        let loaded = params(&net);
        for t in &net.layout.tensors {
            let r = t.offset..t.offset + t.len();
            let want = if t.name.contains(".seg_layers.") { &fresh[r.clone()] } else { &trained[r.clone()] };
            assert_eq!(&loaded[r], want, "{file}: {}", t.name);
        }
        assert_eq!(n, net.layout.tensors.iter().filter(|t| !t.name.contains(".seg_layers.")).count());
    }
    // nnU-Net's fixture model is another network (4, 8, 16 features): refused, every mismatch named.
    let foreign = fixture().join(PLAIN).join("fold_0/checkpoint_final.pth");
    let out = base.join("tuned");
    let (ok, text) = train(&["--pretrained-weights", foreign.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && text.contains("weights (segmentation heads aside) do not match") && text.contains("encoder.stages.0.0.convs.0.conv.weight: [4, 1, "), "{text}");
    assert!(!text.contains("epoch    0"), "refused before training: {text}");
    let (ok, text) = train(&["--pretrained-weights", fold.join("checkpoint_final.pth").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok && text.contains("pretrained weights: ") && text.contains("segmentation heads initialised fresh"), "{text}");
    let _ = std::fs::remove_dir_all(&base);
}

/// `segk ensemble` of nnU-Net's plain and ResEnc predictions (the fixtures' TTA folders):
/// the label map is the argmax of the averaged probabilities (label values in class order,
/// the first of equal classes winning), on the first folder's grid; the averaged probabilities
/// are written when asked. A folder ensembled with itself is the identity.
#[test]
fn ensemble_averages_probabilities_and_takes_the_argmax() {
    let base = fresh_dir("ensemble");
    let (a, b) = (fixture().join("plain/pred_tta"), fixture().join("resenc/pred_tta"));
    let json = fixture().join(PLAIN).join("dataset.json");
    let out = base.join("ens");
    let (ok, text) = segk(&["ensemble", "-i", a.to_str().unwrap(), b.to_str().unwrap(), "-o", out.to_str().unwrap(), "--save-probabilities", "--dataset-json", json.to_str().unwrap()]);
    assert!(ok && text.contains("ensembled 2 folders") && text.contains("3 cases"), "{text}");
    for case in CASES {
        let (sa, pa) = read_npz(&a.join(format!("{case}.npz"))).unwrap();
        let (_, pb) = read_npz(&b.join(format!("{case}.npz"))).unwrap();
        let (so, po) = read_npz(&out.join(format!("{case}.npz"))).unwrap();
        assert_eq!(so, sa);
        let avg: Vec<f32> = pa.iter().zip(&pb).map(|(x, y)| (x + y) * 0.5).collect();
        assert_eq!(po, avg, "{case}: the averaged probabilities");
        let n = sa[1] * sa[2] * sa[3];
        let expected: Vec<f32> = (0..n)
            .map(|v| {
                let mut best = 0;
                for c in 1..sa[0] {
                    if avg[c * n + v] > avg[best * n + v] {
                        best = c;
                    }
                }
                best as f32
            })
            .collect();
        let labels = imageio::read(&out.join(format!("{case}.nii.gz"))).unwrap();
        assert_eq!(labels.data, expected, "{case}: argmax of the average");
        assert_eq!(labels.shape, imageio::read(&a.join(format!("{case}.nii.gz"))).unwrap().shape);
    }
    let same = base.join("same");
    let (ok, text) = segk(&["ensemble", "-i", a.to_str().unwrap(), a.to_str().unwrap(), "-o", same.to_str().unwrap(), "--dataset-json", json.to_str().unwrap()]);
    assert!(ok, "{text}");
    for case in CASES {
        let f = format!("{case}.nii.gz");
        assert_eq!(imageio::read(&same.join(&f)).unwrap().data, imageio::read(&a.join(&f)).unwrap().data, "{case}: identity");
    }
    // The output may be one of the inputs: its dataset.json survives.
    let inplace = base.join("inplace");
    std::fs::create_dir_all(&inplace).unwrap();
    for case in CASES {
        for ext in ["nii.gz", "npz"] {
            std::fs::copy(a.join(format!("{case}.{ext}")), inplace.join(format!("{case}.{ext}"))).unwrap();
        }
    }
    std::fs::copy(&json, inplace.join("dataset.json")).unwrap();
    let (ok, text) = segk(&["ensemble", "-i", inplace.to_str().unwrap(), b.to_str().unwrap(), "-o", inplace.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert_eq!(std::fs::read(inplace.join("dataset.json")).unwrap(), std::fs::read(&json).unwrap());
    // Folders with different cases are refused.
    let partial = base.join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(a.join("ts_000.npz"), partial.join("ts_000.npz")).unwrap();
    let (ok, text) = segk(&["ensemble", "-i", a.to_str().unwrap(), partial.to_str().unwrap(), "-o", base.join("x").to_str().unwrap(), "--dataset-json", json.to_str().unwrap()]);
    assert!(!ok && text.contains("hold different cases"), "{text}");
    let _ = std::fs::remove_dir_all(&base);
}
