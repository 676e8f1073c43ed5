//! Prediction: tile steps and the gaussian as nnU-Net has them, the sliding window against a
//! single forward pass, and the raw -> train -> predict -> evaluate path with the input's
//! geometry kept on anisotropic and oblique images.

use segk::backend::cpu::CpuBackend;
use segk::imageio::{self, header_for, Volume, VoxelType};
use segk::model::unet::Acts;
use segk::model::{Checkpointing, Topology, UNet};
use segk::predict::window::{gaussian, steps, Predictor, SliceSink};

#[test]
fn tile_steps_and_gaussian_follow_nnunet() {
    assert_eq!(steps(200, 128, 0.5), vec![0, 36, 72]);
    assert_eq!(steps(128, 128, 0.5), vec![0]);
    assert_eq!(steps(129, 128, 0.5), vec![0, 1]);
    assert_eq!(steps(300, 100, 0.5), vec![0, 50, 100, 150, 200]);
    // numpy rounds 2.5 to 2 (half to even): 13 voxels, patch 8 -> actual step 2.5.
    assert_eq!(steps(13, 8, 0.5), vec![0, 2, 5]);
    // A 2d patch's slice axis: every slice once.
    assert_eq!(steps(5, 1, 0.5), vec![0, 1, 2, 3, 4]);
    let p = [16, 24, 32];
    let g = gaussian(p);
    let at = |z: usize, y: usize, x: usize| g[(z * 24 + y) * 32 + x];
    assert_eq!(at(8, 12, 16), 1.0, "maximum 1 at patch/2");
    assert!(g.iter().all(|&v| v > 0.0 && v <= 1.0));
    // One sigma (patch/8 = 4 voxels along x) from the centre: exp(-1/2).
    assert!((at(8, 12, 20) - (-0.5f32).exp()).abs() < 1e-6 && (at(8, 12, 12) - at(8, 12, 20)).abs() < 1e-7);
}

struct Collect(Vec<Vec<f32>>);
impl SliceSink for Collect {
    fn slice(&mut self, k: usize, logits: &[f32]) -> anyhow::Result<()> {
        assert_eq!(k, self.0.len(), "slices arrive in order");
        self.0.push(logits.to_vec());
        Ok(())
    }
}

#[test]
fn a_volume_the_size_of_the_patch_gives_the_plain_forward_pass() {
    let be = CpuBackend::<f32>::new();
    let topo = Topology::isotropic(1, 3, vec![4, 8]);
    let net = UNet::new(&be, topo.clone(), 5).unwrap();
    let p = [8, 12, 16];
    let n: usize = p.iter().product();
    let acts = Acts::new(&be, &topo, p, 1, Checkpointing::Level1, false).unwrap();
    let image: Vec<f32> = (0..n).map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0).collect();
    let nets = [net];
    let pr = Predictor { be: &be, nets: &nets, acts: &acts, patch: p, classes: 3, step: 0.5, mirror_axes: &[] };
    let mut sink = Collect(Vec::new());
    pr.run(std::slice::from_ref(&image), p, &mut sink).unwrap();
    assert_eq!(sink.0.len(), p[0]);
    let lg = nets[0].forward_logits(&be, &acts, &image).unwrap();
    let mut direct = vec![0.0f32; lg.len()];
    segk::backend::Backend::download(&be, segk::backend::Backend::view(&be, &acts.arena, lg.offset, lg.len()), &mut direct).unwrap();
    let plane = p[1] * p[2];
    for (z, s) in sink.0.iter().enumerate() {
        for k in 0..3 {
            for i in 0..plane {
                let (a, b) = (s[k * plane + i], direct[(z * plane + i) * 3 + k]);
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "z {z} class {k} voxel {i}: {a} vs {b}");
            }
        }
    }
    // A larger volume: every slice arrives once, in order, finite.
    let big = [20, 12, 30];
    let img: Vec<f32> = (0..big.iter().product::<usize>()).map(|i| (i % 13) as f32 * 0.1).collect();
    let mut sink = Collect(Vec::new());
    Predictor { mirror_axes: &[0, 1, 2], ..pr }.run(&[img], big, &mut sink).unwrap();
    assert_eq!(sink.0.len(), big[0]);
    assert!(sink.0.iter().all(|s| s.len() == 3 * big[1] * big[2] && s.iter().all(|v| v.is_finite())));
}

/// nnU-Net's 2d prediction: every slice on its own, tiled in-plane; a slice the size of the
/// patch is one plain forward pass of that slice.
#[test]
fn a_2d_net_predicts_each_slice_as_its_own_forward_pass() {
    let be = CpuBackend::<f32>::new();
    let topo = Topology::isotropic(2, 3, vec![4, 8, 8]).as_2d();
    let net = UNet::new(&be, topo.clone(), 9).unwrap();
    let p = [1, 12, 16];
    let acts = Acts::new(&be, &topo, p, 1, Checkpointing::Level1, false).unwrap();
    let shape = [5, 12, 16];
    let n: usize = shape.iter().product();
    let image: Vec<Vec<f32>> = (0..2).map(|c| (0..n).map(|i| ((i * 7919 + c * 31) % 200) as f32 / 100.0 - 1.0).collect()).collect();
    let nets = [net];
    let pr = Predictor { be: &be, nets: &nets, acts: &acts, patch: p, classes: 3, step: 0.5, mirror_axes: &[] };
    let mut sink = Collect(Vec::new());
    pr.run(&image, shape, &mut sink).unwrap();
    assert_eq!(sink.0.len(), shape[0]);
    let plane = p[1] * p[2];
    for (z, s) in sink.0.iter().enumerate() {
        let slice: Vec<f32> = (0..plane).flat_map(|i| [image[0][z * plane + i], image[1][z * plane + i]]).collect();
        let lg = nets[0].forward_logits(&be, &acts, &slice).unwrap();
        let mut direct = vec![0.0f32; lg.len()];
        segk::backend::Backend::download(&be, segk::backend::Backend::view(&be, &acts.arena, lg.offset, lg.len()), &mut direct).unwrap();
        for k in 0..3 {
            for i in 0..plane {
                let (a, b) = (s[k * plane + i], direct[i * 3 + k]);
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "slice {z} class {k} voxel {i}: {a} vs {b}");
            }
        }
    }
    // Mirror TTA over the in-plane axes, on slices larger than the patch: in order, finite.
    let big = [3, 20, 30];
    let img: Vec<Vec<f32>> = (0..2).map(|_| (0..big.iter().product::<usize>()).map(|i| (i % 13) as f32 * 0.1).collect()).collect();
    let mut sink = Collect(Vec::new());
    Predictor { mirror_axes: &topo.mirror_axes(), ..pr }.run(&img, big, &mut sink).unwrap();
    assert_eq!(topo.mirror_axes(), vec![1, 2]);
    assert_eq!(sink.0.len(), big[0]);
    assert!(sink.0.iter().all(|s| s.len() == 3 * big[1] * big[2] && s.iter().all(|v| v.is_finite())));
}

#[test]
fn predictions_keep_each_inputs_grid_and_evaluate_scores_them() {
    let base = std::env::temp_dir().join(format!("segk-predict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset033_Predict");
    let segk = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_segk"));
        c.env_remove("nnUNet_preprocessed").env_remove("nnUNet_results");
        c
    };
    let ok = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    ok(segk().args(["synth", "--cases", "4", "--shape", "24,32,32", "--spacing", "1,1,1"]).arg(&root));
    ok(segk().arg("train").arg(&root).args(["all", "--device", "cpu", "--epochs", "1", "--iters-per-epoch", "3", "--val-iters", "1", "--workers", "1"]));
    let model = base.join("segk_results/Dataset033_Predict/segkTrainer__nnUNetPlans__3d_fullres");
    assert!(model.join("plans.json").is_file() && model.join("dataset.json").is_file());

    // Inputs on other grids: anisotropic spacing, and an oblique qform-free sform with origin.
    let input = base.join("imagesTs");
    std::fs::create_dir_all(&input).unwrap();
    let src = imageio::read(&root.join("imagesTr/case_0000_0000.nii.gz")).unwrap();
    let (c, s) = (0.8f64, 0.6f64);
    let oblique = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
    let identity = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for (name, spacing, dirs, origin) in [("aniso", [3.0, 0.7, 0.9], identity, [0.0; 3]), ("oblique", [1.2, 1.0, 0.8], oblique, [-30.0, 12.5, 7.0])] {
        let v = Volume { header: header_for(src.shape, spacing, dirs, origin), spacing, ..src.clone() };
        imageio::write(&input.join(format!("{name}_0000.nii.gz")), &v, VoxelType::I16).unwrap();
    }
    // Files the model cannot read are named, not silently skipped.
    std::fs::copy(input.join("aniso_0000.nii.gz"), input.join("aniso_0001.nii.gz")).unwrap();
    std::fs::write(input.join("other_0000.nii"), b"").unwrap();
    let pred = base.join("pred");
    let text = ok(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(&pred).arg("-m").arg(&model).args(["--device", "cpu", "--no-tta", "--save-probabilities"]));
    assert!(text.contains("wrote 2 label maps"), "{text}");
    // nnU-Net's spelling: -d DATASET -c CONFIGURATION (-p, -tr defaults) under $nnUNet_results,
    // -f, -chk NAME.pth, --disable_tta: the same label maps.
    let pred_d = base.join("pred_d");
    ok(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(&pred_d).args(["-d", "33", "-c", "3d_fullres", "-f", "all", "-chk", "checkpoint_final.pth", "--disable_tta", "--device", "cpu"]).env("nnUNet_results", base.join("segk_results")));
    for name in ["aniso", "oblique"] {
        let (a, b) = (imageio::read(&pred.join(format!("{name}.nii.gz"))).unwrap(), imageio::read(&pred_d.join(format!("{name}.nii.gz"))).unwrap());
        assert_eq!(a.data, b.data, "{name}: -d -c finds the model -m names");
    }
    let wrong = segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(base.join("pred_x")).args(["-d", "33", "-c", "3d_fullres", "-p", "nnUNetResEncUNetMPlans"]).env("nnUNet_results", base.join("segk_results")).output().unwrap();
    assert!(!wrong.status.success() && String::from_utf8_lossy(&wrong.stderr).contains("segkTrainer__nnUNetResEncUNetMPlans__3d_fullres: no such model folder"), "{}", String::from_utf8_lossy(&wrong.stderr));
    assert!(text.contains("not read: aniso_0001.nii.gz (channel 1; the model reads 1), other_0000.nii (the model's file_ending is .nii.gz)"), "{text}");
    for name in ["aniso", "oblique"] {
        let a = imageio::read(&input.join(format!("{name}_0000.nii.gz"))).unwrap();
        let b = imageio::read(&pred.join(format!("{name}.nii.gz"))).unwrap();
        assert_eq!(a.shape, b.shape, "{name}: shape");
        assert!(a.affine.iter().flatten().zip(b.affine.iter().flatten()).all(|(x, y)| (x - y).abs() < 1e-4), "{name}: affine {:?} vs {:?}", a.affine, b.affine);
        assert!(b.data.iter().all(|&l| l == 0.0 || l == 1.0 || l == 2.0), "{name}: only declared labels");
        // Outside the nonzero crop nothing is predicted: the crop is undone in place.
        let bbox = segk::plan::fingerprint::bounding_box(&segk::plan::fingerprint::nonzero_mask(&[&a.data], a.shape), a.shape);
        assert!(bbox.iter().zip(a.shape).any(|(b, n)| b[0] > 0 || b[1] < n), "{name}: the test needs a crop");
        let outside = (0..a.data.len()).filter(|&i| {
            let q = [i / (a.shape[1] * a.shape[2]), (i / a.shape[2]) % a.shape[1], i % a.shape[2]];
            (0..3).any(|d| q[d] < bbox[d][0] || q[d] >= bbox[d][1])
        });
        assert!(outside.clone().all(|i| b.data[i] == 0.0), "{name}: labels outside the crop");
        // nnU-Net's CASE.npz: softmax per voxel on the input's grid, argmax = the label map,
        // background 1 outside the crop.
        let (shape, p) = segk::predict::probs::read_npz(&pred.join(format!("{name}.npz"))).unwrap();
        let n = a.data.len();
        assert_eq!(shape, vec![3, a.shape[0], a.shape[1], a.shape[2]], "{name}: probabilities shape");
        for i in 0..n {
            let v = [p[i], p[n + i], p[2 * n + i]];
            assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-5 && v.iter().all(|x| (0.0..=1.0).contains(x)), "{name}: voxel {i} {v:?}");
            let best = (0..3).fold(0, |b, k| if v[k] > v[b] { k } else { b });
            assert_eq!(best as f32, b.data[i], "{name}: voxel {i}: argmax of {v:?} vs label {}", b.data[i]);
        }
        assert!(outside.clone().all(|i| p[i] == 1.0), "{name}: background 1 outside the crop");
    }
    let left: Vec<_> = std::fs::read_dir(&pred).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|f| f.to_string_lossy().contains("tmp")).collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
    // evaluate on the training images' predictions.
    let pred_tr = base.join("pred_tr");
    ok(segk().args(["predict", "-i"]).arg(root.join("imagesTr")).arg("-o").arg(&pred_tr).arg("-m").arg(&model).args(["--device", "cpu", "--no-tta", "--folds", "all"]));
    let text = ok(segk().arg("evaluate").arg(&pred_tr).arg(root.join("labelsTr")));
    assert!(text.contains("4 cases") && pred_tr.join("summary.json").is_file(), "{text}");
    // Refused up front: predicting into the input folder, a fold that was never trained.
    // `-chk NAME.pth` reads the nnU-Net checkpoint training wrote beside segk's, to the same labels.
    let err = |c: &mut std::process::Command| String::from_utf8_lossy(&c.output().unwrap().stderr).to_string();
    let e = err(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(&input).arg("-m").arg(&model).args(["--device", "cpu"]));
    assert!(e.contains("is the input folder"), "{e}");
    let e = err(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(base.join("p3")).arg("-m").arg(&model).args(["--device", "cpu", "--folds", "3"]));
    assert!(e.contains("fold 3 is not trained in") && e.contains("(it holds fold all)"), "{e}");
    let text = ok(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(base.join("p4")).arg("-m").arg(&model).args(["--device", "cpu", "--no-tta", "--checkpoint", "checkpoint_final.pth"]));
    assert!(text.contains("with fold_all (nnU-Net's checkpoint_final.pth, trainer nnUNetTrainer)"), "{text}");
    assert!(base.join("p4/dataset.json").is_file() && base.join("p4/plans.json").is_file(), "the model's JSONs go with the predictions, as nnU-Net's");
    let text = ok(segk().args(["predict", "-i"]).arg(&input).arg("-o").arg(base.join("p5")).arg("-m").arg(&model).args(["--device", "cpu", "--no-tta", "--checkpoint", "checkpoint_final"]));
    assert!(text.contains("with fold_all (checkpoint_final)"), "{text}");
    for f in std::fs::read_dir(base.join("p5")).unwrap().map(|e| e.unwrap().file_name()).filter(|f| f.to_string_lossy().ends_with(".nii.gz")) {
        let read = |d: &str| segk::imageio::read(&base.join(d).join(&f)).unwrap().data;
        assert_eq!(read("p4"), read("p5"), "{f:?}: the .pth and the .safetensors predict the same");
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn mirror_tta_of_a_mirror_symmetric_input_is_mirror_symmetric() {
    // Averaging f over the 8 mirrorings of a symmetric input symmetrises f's output: any slip
    // in flipping inputs or mapping logits back breaks the symmetry.
    let be = CpuBackend::<f32>::new();
    let topo = Topology::isotropic(1, 3, vec![4, 8]);
    let nets = [UNet::new(&be, topo.clone(), 9).unwrap()];
    let p = [8, 12, 16];
    let acts = Acts::new(&be, &topo, p, 1, Checkpointing::Level1, false).unwrap();
    let sym = |i: usize, n: usize| i.min(n - 1 - i) as f32;
    let mut image = Vec::new();
    for z in 0..p[0] {
        for y in 0..p[1] {
            for x in 0..p[2] {
                image.push((sym(z, p[0]) * 0.3 + sym(y, p[1]) * 0.2 - sym(x, p[2]) * 0.1).sin());
            }
        }
    }
    for tta in [true, false] {
        let mirror_axes: &[usize] = if tta { &[0, 1, 2] } else { &[] };
        let pr = Predictor { be: &be, nets: &nets, acts: &acts, patch: p, classes: 3, step: 0.5, mirror_axes };
        let mut sink = Collect(Vec::new());
        pr.run(&[image.clone()], p, &mut sink).unwrap();
        let at = |z: usize, y: usize, x: usize, k: usize| sink.0[z][k * p[1] * p[2] + y * p[2] + x];
        let mut worst = 0.0f32;
        for z in 0..p[0] {
            for y in 0..p[1] {
                for x in 0..p[2] {
                    for k in 0..3 {
                        let v = at(z, y, x, k);
                        for (a, b, c) in [(p[0] - 1 - z, y, x), (z, p[1] - 1 - y, x), (z, y, p[2] - 1 - x)] {
                            worst = worst.max((v - at(a, b, c, k)).abs());
                        }
                    }
                }
            }
        }
        if tta {
            assert!(worst < 1e-4, "TTA output not mirror-symmetric: {worst}");
        } else {
            assert!(worst > 1e-3, "without TTA a random net is not symmetric ({worst}): the test would prove nothing");
        }
    }
}

#[test]
fn many_labels_on_a_long_volume_stay_within_the_stated_bound() {
    use segk::plan::fingerprint::IntensityStats;
    use segk::plan::plans::Plan;
    // A random 33-class net and a 384x96x96 case: whole-volume f32 logits would be 467 MB.
    let base = std::env::temp_dir().join(format!("segk-predict-rss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = base.join("model");
    std::fs::create_dir_all(model.join("fold_0")).unwrap();
    let classes = 33;
    let topology = Topology::isotropic(1, classes, vec![4, 8]);
    let plan = Plan {
        spacing: [1.0; 3],
        transpose_forward: [0, 1, 2],
        transpose_backward: [0, 1, 2],
        median_shape: [384, 96, 96],
        patch_size: [16, 48, 48],
        batch_size: 2,
        topology: topology.clone(),
        normalization: vec!["NoNormalization".into()],
        use_mask_for_norm: vec![false],
        gpu_memory_budget_bytes: 0,
        gpu_memory_needed_bytes: 0,
        checkpointing: 1,
    };
    let stats = IntensityStats { mean: 0.0, median: 0.0, std: 1.0, min: 0.0, max: 1.0, percentile_99_5: 1.0, percentile_00_5: 0.0 };
    // segk's plans.json schema before nnU-Net's: model folders trained then still load.
    let plans = serde_json::json!({"dataset_name": "rss", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": plan}, "foreground_intensity_properties_per_channel": [stats]});
    std::fs::write(model.join("plans.json"), serde_json::to_string(&plans).unwrap()).unwrap();
    let labels: serde_json::Map<String, serde_json::Value> = (0..classes).map(|i| (if i == 0 { "background".to_string() } else { format!("l{i}") }, serde_json::json!(i))).collect();
    std::fs::write(model.join("dataset.json"), serde_json::json!({"channel_names": {"0": "noNorm"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}).to_string()).unwrap();
    let be = CpuBackend::<f32>::new();
    let net = UNet::new(&be, topology, 3).unwrap();
    let state = segk::checkpoint::TrainerState { epoch: 0, steps: 0, next_train_batch: 0, next_val_batch: 0, ema_dice: None, best_ema_dice: None, seed: 0, bad_in_a_row: 0, iter: 0, epoch_loss_sum: 0.0, epoch_steps: 0, epoch_skipped: 0, history: vec![], epochs: None };
    segk::checkpoint::save(&model.join("fold_0"), "checkpoint_final", &be, &net, &state).unwrap();
    let input = base.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let shape = [384, 96, 96];
    let n: usize = shape.iter().product();
    let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let v = Volume { shape, spacing: [1.0; 3], affine: [[0.0; 4]; 3], data: (0..n).map(|i| 1.0 + (i % 97) as f32 * 0.01).collect(), header: header_for(shape, [1.0; 3], eye, [0.0; 3]) };
    imageio::write(&input.join("long_0000.nii.gz"), &v, VoxelType::F32).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["predict", "-i"]).arg(&input).arg("-o").arg(base.join("out")).arg("-m").arg(&model).args(["--device", "cpu", "--no-tta"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let num = |key: &str| -> f64 { text.split(key).nth(1).and_then(|t| t.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key:?} in {text}")) };
    let (peak, bound) = (num("peak RSS "), num("(bound "));
    let whole = (classes * n * 4) as f64 / (1 << 20) as f64;
    eprintln!("peak {peak} MiB, bound {bound} MiB, whole-volume logits {whole:.0} MiB");
    assert!(peak <= bound, "peak RSS {peak} MiB above the stated bound {bound} MiB");
    assert!(bound < whole, "the bound ({bound} MiB) must stay below whole-volume logits ({whole:.0} MiB) to mean anything");
}

#[test]
fn a_case_with_its_coarse_axis_elsewhere_is_said() {
    use segk::predict::axis_order_warning as w;
    assert!(w([3.0, 0.8, 0.8], [0, 1, 2], [0.8, 0.8, 3.0]).is_some_and(|m| m.contains("3.00 mm")));
    assert!(w([3.0, 0.8, 0.8], [2, 0, 1], [0.8, 0.8, 3.0]).is_none(), "the plan's transpose is applied first");
    assert!(w([3.0, 0.8, 0.8], [0, 1, 2], [2.5, 0.7, 0.9]).is_none());
    assert!(w([1.0, 1.0, 1.0], [0, 1, 2], [0.8, 0.8, 3.0]).is_none(), "an isotropic plan has no coarse axis");
    assert!(w([3.0, 0.8, 0.8], [0, 1, 2], [1.0, 1.0, 1.1]).is_none(), "an isotropic case is not a different orientation");
}
