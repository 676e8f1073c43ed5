//! Dataset fingerprint on generated cases with known answers.

use segk::imageio::{self, header_for, Volume, VoxelType};
use segk::dataset::Dataset;
use segk::plan::fingerprint::{bounding_box, fingerprint, intensity_stats, nonzero_mask, percentile};

const I3: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

#[test]
fn nonzero_mask_fills_enclosed_holes() {
    let shape = [7, 7, 7];
    let n = 343;
    // A hollow shell at 1..=5 with a zero interior: the interior is a hole, the outside not.
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let c = [i / 49, (i / 7) % 7, i % 7];
            let on_shell = c.iter().all(|&v| (1..=5).contains(&v)) && c.iter().any(|&v| v == 1 || v == 5);
            if on_shell { 1.0 } else { 0.0 }
        })
        .collect();
    let m = nonzero_mask(&[&data], shape);
    assert!(m[(3 * 7 + 3) * 7 + 3], "centre hole filled");
    assert!(!m[0], "outside stays background");
    assert_eq!(m.iter().filter(|&&v| v).count(), 125);
    assert_eq!(bounding_box(&m, shape), [[1, 6], [1, 6], [1, 6]]);
}

#[test]
fn percentiles_interpolate_like_numpy() {
    let v = [1.0f32, 2.0, 3.0, 4.0];
    assert_eq!(percentile(&v, 50.0), 2.5);
    assert_eq!(percentile(&v, 0.0), 1.0);
    assert_eq!(percentile(&v, 100.0), 4.0);
    assert!((percentile(&v, 99.5) - 3.985).abs() < 1e-12);
    let s = intensity_stats(vec![4.0, 1.0, 3.0, 2.0]);
    assert_eq!((s.mean, s.median, s.min, s.max), (2.5, 2.5, 1.0, 4.0));
    assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
}

#[test]
fn fingerprint_of_generated_dataset() {
    let root = std::env::temp_dir().join(format!("segk-fp-{}", std::process::id())).join("Dataset002_Fp");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 3, "file_ending": ".nii.gz"}"#).unwrap();
    let shape = [10, 12, 14];
    let spacings = [[3.0, 0.8, 0.8], [2.5, 0.7, 0.7], [3.0, 0.9, 0.9]];
    for (k, sp) in spacings.iter().enumerate() {
        // Nonzero body in z 2..8, y 1..11, x 3..10 (6 x 10 x 7); organ in z 4..6 with
        // intensities alternating 10 and 20.
        let data: Vec<f32> = (0..shape.iter().product())
            .map(|i| {
                let c = [i / 168, (i / 14) % 12, i % 14];
                let body = (2..8).contains(&c[0]) && (1..11).contains(&c[1]) && (3..10).contains(&c[2]);
                let organ = body && (4..6).contains(&c[0]);
                if organ { if i % 2 == 0 { 10.0 } else { 20.0 } } else if body { -5.0 } else { 0.0 }
            })
            .collect();
        let labels: Vec<f32> = data.iter().map(|&v| if v >= 10.0 { 1.0 } else { 0.0 }).collect();
        let h = header_for(shape, *sp, I3, [0.0; 3]);
        let img = Volume { shape, spacing: *sp, affine: [[0.0; 4]; 3], data, header: h.clone() };
        let lab = Volume { data: labels, ..img.clone() };
        imageio::write(&root.join(format!("imagesTr/c{k}_0000.nii.gz")), &img, VoxelType::F32).unwrap();
        imageio::write(&root.join(format!("labelsTr/c{k}.nii.gz")), &lab, VoxelType::U8).unwrap();
    }
    let ds = Dataset::open(&root).unwrap();
    let fp = fingerprint(&ds, 300_000).unwrap();
    assert_eq!(fp.spacings.len(), 3);
    for (got, want) in fp.spacings.iter().zip(&spacings) {
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
    }
    assert!(fp.shapes_after_crop.iter().all(|s| *s == [6, 10, 7]), "{:?}", fp.shapes_after_crop);
    let rel = (6 * 10 * 7) as f64 / (10 * 12 * 14) as f64;
    assert!(fp.relative_size_after_cropping.iter().all(|r| (r - rel).abs() < 1e-12));
    let s = &fp.foreground_intensity_properties_per_channel[0];
    assert_eq!((s.min, s.max), (10.0, 20.0));
    // Per organ row x = 3..10: four odd x (20) and three even x (10).
    let (mean, std) = (110.0 / 7.0, (12.0f64 / 49.0 * 100.0).sqrt());
    assert!((s.mean - mean).abs() < 0.1 && (s.std - std).abs() < 0.1 && s.median == 20.0, "{s:?}");
    assert_eq!((s.percentile_00_5, s.percentile_99_5), (10.0, 20.0));
}

#[test]
fn fingerprint_command_writes_json() {
    let root = std::env::temp_dir().join(format!("segk-fpcli-{}", std::process::id())).join("Dataset003_Cli");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}, "numTraining": 1, "file_ending": ".nii"}"#).unwrap();
    let shape = [4, 4, 4];
    let img = Volume { shape, spacing: [1.0; 3], affine: [[0.0; 4]; 3], data: (0..64).map(|i| 1.0 + i as f32).collect(), header: header_for(shape, [1.0; 3], I3, [0.0; 3]) };
    let lab = Volume { data: (0..64).map(|i| (i % 2) as f32).collect(), ..img.clone() };
    imageio::write(&root.join("imagesTr/a_0000.nii"), &img, VoxelType::F32).unwrap();
    imageio::write(&root.join("labelsTr/a.nii"), &lab, VoxelType::U8).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("fingerprint").arg(&root).env_remove("nnUNet_preprocessed").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!root.join("segk_fingerprint.json").exists(), "the raw dataset folder is not written to");
    let fp = root.parent().unwrap().join("segk_preprocessed/Dataset003_Cli/segk_fingerprint.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fp).unwrap()).unwrap();
    assert_eq!(v["shapes_after_crop"], serde_json::json!([[4, 4, 4]]));
    assert_eq!(v["foreground_intensity_properties_per_channel"][0]["max"], 64.0);
}

mod spacing {
    use segk::plan::spacing::{percentile, target_spacing, transpose_forward};

    #[test]
    fn isotropic_dataset_takes_the_median() {
        let sp = [[1.0, 0.8, 0.8], [1.2, 0.7, 0.7], [0.9, 0.9, 0.9]];
        let sh = [[100, 200, 200]; 3];
        assert_eq!(target_spacing(&sp, &sh), [1.0, 0.8, 0.8]);
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 10.0), 1.3);
    }

    #[test]
    fn anisotropic_axis_takes_its_tenth_percentile() {
        // z 5 mm (one case 3 mm), in-plane 0.7 mm, few slices: the rule applies.
        let sp = [[5.0, 0.7, 0.7], [5.0, 0.7, 0.7], [3.0, 0.7, 0.7], [5.0, 0.7, 0.7], [5.0, 0.7, 0.7]];
        let sh = [[20, 512, 512]; 5];
        let t = target_spacing(&sp, &sh);
        // 10th percentile of [3, 5, 5, 5, 5] = 3 + 0.4 * 2 = 3.8
        assert!((t[0] - 3.8).abs() < 1e-12 && t[1] == 0.7 && t[2] == 0.7, "{t:?}");
        // Many slices: no longer "anisotropic voxels", the median stays.
        assert_eq!(target_spacing(&sp, &[[200, 512, 512]; 5])[0], 5.0);
        // A 10th percentile finer than the other axes is lifted just above them.
        let fine = [[5.0, 0.7, 0.7], [5.0, 0.7, 0.7], [0.5, 0.7, 0.7], [0.5, 0.7, 0.7], [5.0, 0.7, 0.7]];
        let t = target_spacing(&fine, &sh);
        assert!((t[0] - (0.7 + 1e-5)).abs() < 1e-12, "{t:?}");
    }

    #[test]
    fn coarsest_axis_goes_first() {
        assert_eq!(transpose_forward([1.0, 1.0, 1.0]), [0, 1, 2]);
        assert_eq!(transpose_forward([0.7, 0.7, 5.0]), [2, 0, 1]);
        assert_eq!(transpose_forward([0.7, 3.0, 0.7]), [1, 0, 2]);
    }
}

mod topology {
    use segk::plan::nnunet::{initial_patch, pool_and_conv};

    #[test]
    fn isotropic_patch_pools_every_axis_down_to_4() {
        let t = pool_and_conv(&[1.0; 3], &[128.0; 3]);
        assert_eq!(t.strides.len(), 6);
        assert!(t.strides[1..].iter().all(|s| *s == [2, 2, 2]));
        assert!(t.kernels.iter().all(|k| *k == [3, 3, 3]) && t.kernels.len() == 6);
        assert_eq!(t.patch, [128, 128, 128]);
        assert_eq!(initial_patch(&[1.0; 3], &[300.0, 200.0, 180.0]), [256.0, 200.0, 180.0]);
    }

    #[test]
    fn anisotropic_spacing_pools_in_plane_first() {
        // Worked by hand from nnU-Net's get_pool_and_conv_props.
        let t = pool_and_conv(&[5.0, 0.7, 0.7], &[20.0, 256.0, 256.0]);
        assert_eq!(t.strides, vec![vec![1, 1, 1], vec![1, 2, 2], vec![1, 2, 2], vec![2, 2, 2], vec![2, 2, 2], vec![1, 2, 2], vec![1, 2, 2]]);
        assert_eq!(t.kernels, vec![vec![1, 3, 3], vec![1, 3, 3], vec![3, 3, 3], vec![3, 3, 3], vec![3, 3, 3], vec![3, 3, 3], vec![3, 3, 3]]);
        assert_eq!(t.patch, [20, 256, 256]);
        assert_eq!(pool_and_conv(&[5.0, 0.7, 0.7], &[18.0, 250.0, 256.0]).patch, [20, 256, 256], "padded to multiples of 4 and 64");
    }
}

mod plans {
    use segk::dataset::DatasetJson;
    use segk::plan::fingerprint::{Fingerprint, IntensityStats};
    use segk::plan::plans::{from_nnunet, gpu_bytes, nnunet_default, segk_sized, Plan, GIB};

    fn json(channel: &str) -> DatasetJson {
        serde_json::from_str(&format!(r#"{{"channel_names": {{"0": "{channel}"}}, "labels": {{"background": 0, "a": 1, "b": 2}}, "numTraining": 10, "file_ending": ".nii.gz"}}"#)).unwrap()
    }

    fn fp(spacing: [f64; 3], shape: [usize; 3], n: usize) -> Fingerprint {
        let s = IntensityStats { mean: 0.0, median: 0.0, std: 1.0, min: -1.0, max: 1.0, percentile_99_5: 1.0, percentile_00_5: -1.0 };
        Fingerprint { spacings: vec![spacing; n], shapes_after_crop: vec![shape; n], relative_size_after_cropping: vec![1.0; n], foreground_intensity_properties_per_channel: vec![s] }
    }

    /// segkPlans' 3d_fullres for a fingerprint and a budget in bytes.
    fn sized(channel: &str, f: &Fingerprint, budget: usize) -> anyhow::Result<Plan> {
        let j = json(channel);
        let doc = segk_sized(&nnunet_default("t", &j, f)?, &j, budget)?;
        assert_eq!(doc.plans_name, "segkPlans");
        assert_eq!(doc.configurations.keys().collect::<Vec<_>>(), ["3d_fullres"]);
        from_nnunet(&doc, "3d_fullres", &j)
    }

    #[test]
    fn plan_fits_the_budget_and_grows_with_it() {
        let budget = (8.0 * GIB) as usize;
        let f = fp([1.0; 3], [320, 320, 320], 400);
        let p = sized("CT", &f, budget).unwrap();
        eprintln!("8 GiB: patch {:?} batch {} needs {:.2} GiB", p.patch_size, p.batch_size, p.gpu_memory_needed_bytes as f64 / GIB);
        assert!(p.gpu_memory_needed_bytes <= budget, "{} > {budget}", p.gpu_memory_needed_bytes);
        assert_eq!(p.gpu_memory_budget_bytes, budget, "the budget is kept in the plans file");
        assert_eq!(p.gpu_memory_needed_bytes, gpu_bytes(&p.topology, p.patch_size, p.batch_size).unwrap());
        assert!(p.batch_size >= 2);
        assert!(p.topology.stage_spatial(p.patch_size).is_ok());
        assert!(p.patch_size.iter().all(|&v| v <= 320), "{:?}", p.patch_size);
        assert_eq!(p.normalization, vec!["CTNormalization"]);
        assert_eq!(p.topology.n_classes, 3);
        let big = sized("CT", &f, 4 * budget).unwrap();
        eprintln!("32 GiB: patch {:?} batch {}", big.patch_size, big.batch_size);
        let vox = |p: &Plan| p.batch_size * p.patch_size.iter().product::<usize>();
        assert!(vox(&big) > vox(&p), "more memory buys a bigger patch or batch");
        // The spacing, axis order and normalisation stay nnU-Net's.
        let theirs = from_nnunet(&nnunet_default("t", &json("CT"), &f).unwrap(), "3d_fullres", &json("CT")).unwrap();
        assert_eq!((p.spacing, p.transpose_forward, &p.normalization, &p.use_mask_for_norm), (theirs.spacing, theirs.transpose_forward, &theirs.normalization, &theirs.use_mask_for_norm));
    }

    #[test]
    fn plan_refuses_an_impossible_budget() {
        let e = sized("MR", &fp([1.0; 3], [160, 160, 160], 10), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("budget"), "{e}");
    }

    #[test]
    fn anisotropic_plan_keeps_the_coarse_axis_first_and_unpooled_early() {
        let p = sized("T2", &fp([0.7, 0.7, 5.0], [512, 512, 40], 10), (8.0 * GIB) as usize).unwrap();
        assert_eq!(p.transpose_forward, [2, 0, 1]);
        assert_eq!(p.transpose_backward, [1, 2, 0]);
        assert_eq!(p.spacing, [5.0, 0.7, 0.7]);
        assert_eq!(p.topology.kernels[0], [1, 3, 3]);
        assert_eq!(p.topology.strides[1], [1, 2, 2]);
        assert_eq!(p.normalization, vec!["ZScoreNormalization"]);
    }
}

#[test]
fn plan_command_writes_nnunet_plans() {
    let base = std::env::temp_dir().join(format!("segk-plancli-{}", std::process::id()));
    let root = base.join("Dataset004_Plan");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    std::fs::write(root.join("dataset.json"), r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 2, "file_ending": ".nii"}"#).unwrap();
    let shape = [16, 24, 24];
    for k in 0..2 {
        let img = Volume { shape, spacing: [2.0, 1.0, 1.0], affine: [[0.0; 4]; 3], data: (0..16 * 24 * 24).map(|i| 1.0 + (i % 7) as f32).collect(), header: header_for(shape, [2.0, 1.0, 1.0], I3, [0.0; 3]) };
        let lab = Volume { data: (0..16 * 24 * 24).map(|i| ((i / 24) % 2) as f32).collect(), ..img.clone() };
        imageio::write(&root.join(format!("imagesTr/p{k}_0000.nii")), &img, VoxelType::F32).unwrap();
        imageio::write(&root.join(format!("labelsTr/p{k}.nii")), &lab, VoxelType::U8).unwrap();
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("plan").arg(&root).env_remove("nnUNet_preprocessed").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = base.join("segk_preprocessed/Dataset004_Plan");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("nnUNetPlans.json")).unwrap()).unwrap();
    let c = &v["configurations"]["3d_fullres"];
    assert_eq!(c["spacing"], serde_json::json!([2.0, 1.0, 1.0]));
    assert_eq!(c["median_image_size_in_voxels"], serde_json::json!([16.0, 24.0, 24.0]));
    assert_eq!(c["normalization_schemes"], serde_json::json!(["CTNormalization"]));
    assert!(c["batch_size"].as_u64().unwrap() >= 2);
    assert!(dir.join("segk_fingerprint.json").is_file());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("segk on a GPU needs") && text.contains("at checkpoint levels 0 / 1 / 2"), "{text}");
}
