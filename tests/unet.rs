//! The whole PlainConvUNet: gradients against f64 finite differences on a few parameters of
//! every layer, checkpoint levels give the same gradients with less memory, training learns.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use segk::backend::cpu::CpuBackend;
use segk::backend::{Backend, DiceMode};
use segk::model::plan::{activation_bytes, ActPlan};
use segk::model::unet::Acts;
use segk::model::{Checkpointing, Topology, UNet};

fn small_topology(dice: DiceMode) -> Topology {
    let mut t = Topology::isotropic(2, 3, vec![3, 4, 5]);
    t.kernels[2] = [1, 3, 3];
    t.strides[2] = [1, 2, 2];
    t.dice = dice;
    t
}

/// A region net's topology: regions [1, 2] and [2] over label values 0..3.
fn region_topology(dice: DiceMode) -> Topology {
    let mut t = small_topology(dice);
    t.n_classes = 2;
    t.regions = vec![vec![1, 2], vec![2]];
    t
}

/// A small residual-encoder net (ResEnc): an identity skip (stage 0), a pooled and projected
/// one (stage 1, 3 -> 4 channels), a pooled one (stage 2, 4 -> 4), two blocks where a stage
/// has more than one.
fn residual_topology(dice: DiceMode) -> Topology {
    let mut t = Topology::isotropic(2, 3, vec![3, 4, 4]).residual(vec![1, 2, 2]);
    t.kernels[2] = [1, 3, 3];
    t.strides[2] = [1, 2, 2];
    t.dice = dice;
    t
}

/// Norm scales away from their init (a residual block's second starts at 0, which would zero
/// every gradient upstream of it in the block): random in +-[0.5, 1.5].
fn scatter_norm_scales<T: Copy + From<f32>>(r: &mut rand_pcg::Pcg64, layout: &segk::model::params::ParamLayout, params: &mut [T]) {
    for t in layout.tensors.iter().filter(|t| t.name.ends_with("norm.weight")) {
        for v in &mut params[t.offset..t.offset + t.len()] {
            let x: f32 = r.random_range(0.5..1.5);
            *v = T::from(if r.random::<bool>() { x } else { -x });
        }
    }
}

fn batch(r: &mut rand_pcg::Pcg64, t: &Topology, patch: [usize; 3], n: usize) -> (Vec<f32>, Vec<u8>) {
    let vox = n * patch.iter().product::<usize>();
    let image = (0..vox * t.in_channels).map(|_| r.random_range(-1.0..1.0)).collect();
    let labels = (0..vox).map(|_| r.random_range(0..t.label_limit() as u8)).collect();
    (image, labels)
}

#[test]
fn unet_gradients_match_finite_differences() {
    // A fixed seed: with fresh ones, about one run in thirty puts some activation within the
    // finite-difference step of the LeakyReLU kink, and every parameter upstream of it then
    // shows a ~1e-4 deviation (seen with seed 1795480450724991542). The op-level checks in
    // tests/ops.rs keep fresh seeds, with inputs held off the kink.
    let mut r = rng_seeded("unet_gradcheck", 7);
    // The softmax net both Dice ways, and a region net (sigmoid + Dice + BCE).
    for (dice, t) in [(DiceMode::Batch, small_topology(DiceMode::Batch)), (DiceMode::PerSample, small_topology(DiceMode::PerSample)), (DiceMode::Batch, region_topology(DiceMode::Batch)), (DiceMode::Batch, residual_topology(DiceMode::Batch))] {
        let patch = [4, 4, 8];
        let be = CpuBackend::<f64>::new();
        let mut net = UNet::new(&be, t.clone(), r.random()).unwrap();
        let n = net.n_params();
        scatter_norm_scales(&mut r, &net.layout.clone(), &mut net.arena[..n]);
        let acts = Acts::new(&be, &t, patch, 2, Checkpointing::None, true).unwrap();
        let (image, labels) = batch(&mut r, &t, patch, 2);
        net.compute_gradients(&be, &acts, &image, &labels).unwrap();
        let n = net.n_params();
        let grads: Vec<f64> = net.arena[n..2 * n].to_vec();
        // A few entries of every tensor (weights, biases, norm scales and shifts).
        let mut idx = Vec::new();
        for tensor in &net.layout.tensors {
            for k in pick(&mut r, tensor.len(), 3) {
                idx.push(tensor.offset + k);
            }
        }
        let mut params: Vec<f64> = net.arena[..n].to_vec();
        let mut net = net;
        let numeric = numeric_grad(&mut params, &idx, &mut |p| {
            net.arena[..n].copy_from_slice(p);
            net.compute_gradients(&be, &acts, &image, &labels).unwrap().total
        });
        let analytic: Vec<f64> = idx.iter().map(|&i| grads[i]).collect();
        let e = rel_err(&analytic, &numeric);
        if e >= 1e-5 {
            let mut d: Vec<(f64, usize)> = (0..idx.len()).map(|k| ((analytic[k] - numeric[k]).abs(), k)).collect();
            d.sort_by(|a, b| b.0.total_cmp(&a.0));
            for &(_, k) in d.iter().take(3) {
                let name = net.layout.tensors.iter().find(|t| idx[k] >= t.offset && idx[k] < t.offset + t.len()).map(|t| t.name.clone()).unwrap_or_default();
                eprintln!("largest deviation: {name} [{}]: analytic {} numeric {}", idx[k] - net.layout.tensors.iter().find(|t| t.name == name).map_or(0, |t| t.offset), analytic[k], numeric[k]);
            }
        }
        assert!(e < 1e-5, "{dice:?} regions {:?} blocks {:?}: whole-net gradient rel err {e}", t.regions, t.blocks_per_stage);
        // Per tensor too, so a wrong small layer cannot hide behind a big one.
        for tensor in &net.layout.tensors {
            let sel: Vec<usize> = (0..idx.len()).filter(|&k| idx[k] >= tensor.offset && idx[k] < tensor.offset + tensor.len()).collect();
            let a: Vec<f64> = sel.iter().map(|&k| analytic[k]).collect();
            let b: Vec<f64> = sel.iter().map(|&k| numeric[k]).collect();
            let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
            // Central differences at eps 1e-6 on a loss near 1 carry ~1e-10 of rounding, so
            // tiny gradients get that absolute slack (seen: -6.4710e-7 vs -6.4732e-7).
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            if scale > 1e-7 {
                assert!(rel_err(&a, &b) < 1e-4 || worst < 1e-9, "{dice:?} {}: {a:?} vs {b:?}", tensor.name);
            }
        }
    }
}

#[test]
fn checkpoint_levels_give_same_gradients_with_less_memory() {
    let plain = Topology::isotropic(1, 3, vec![4, 8, 8, 16]);
    for t in [plain.clone(), plain.clone().residual(vec![1, 2, 3, 1]), plain.residual(vec![2, 2, 3, 1])] {
        checkpoint_levels_agree(&t);
    }
}

fn checkpoint_levels_agree(t: &Topology) {
    let mut r = rng("checkpointing");
    let patch = [8, 16, 8];
    let be = CpuBackend::<f32>::new();
    let seed = r.random();
    let (image, labels) = batch(&mut r, t, patch, 2);
    let scales_seed: u64 = r.random();
    let mut results = Vec::new();
    for policy in [Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2] {
        let mut net = UNet::new(&be, t.clone(), seed).unwrap();
        let n = net.n_params();
        scatter_norm_scales(&mut rand_pcg::Pcg64::seed_from_u64(scales_seed), &net.layout.clone(), &mut net.arena[..n]);
        let acts = Acts::new(&be, &t, patch, 2, policy, true).unwrap();
        // Stale data must not matter: poison the activations first.
        be.fill(be.view(&acts.arena, 0, acts.plan.len), f32::NAN).unwrap();
        let loss = net.compute_gradients(&be, &acts, &image, &labels).unwrap();
        let n = net.n_params();
        let bytes = acts.bytes(&be);
        assert_eq!(bytes, activation_bytes(t, patch, 2, policy, 4, 4).unwrap(), "{policy:?}: arena matches the report");
        assert_eq!((acts.arena.len() + acts.stats.len()) * 4 + acts.labels.len(), bytes, "{policy:?}: allocation matches the report");
        results.push((policy, loss.total, net.arena[n..2 * n].to_vec(), bytes));
    }
    let (_, l0, g0, b0) = &results[0];
    for (policy, l, g, b) in &results[1..] {
        assert_eq!(l, l0, "{policy:?} loss");
        let max_rel = g.iter().zip(g0).map(|(a, b)| (a - b).abs() / b.abs().max(1e-3)).fold(0.0f32, f32::max);
        assert!(max_rel <= 1e-5, "{policy:?}: max relative gradient difference {max_rel}");
        assert!(g.iter().all(|v| v.is_finite()));
        assert!(b < b0, "{policy:?} uses {b} bytes, no less than level 0's {b0}");
    }
    assert!(results[2].3 < results[1].3, "level 2 must use less than level 1");
    eprintln!("activation bytes (blocks {:?}): L0 {} L1 {} L2 {}", t.blocks_per_stage, results[0].3, results[1].3, results[2].3);
}

/// The residual backward's buffer roles: within a block, d(output), d(input) and the two
/// scratch buffers are four different buffers; each block's d(output) is where the block
/// after it put its d(input); a stage's first block adds into the previous stage's skip
/// gradient, and the last block of every stage but the bottleneck starts from its own.
#[test]
fn residual_backward_buffer_roles_never_collide() {
    use segk::model::plan::{res_bwd_roles, GradBuf};
    for blocks in [vec![1, 3, 4, 6, 6, 6], vec![2, 2, 3, 1], vec![1, 1], vec![3, 1, 2]] {
        let roles = res_bwd_roles(&blocks);
        let ns = blocks.len();
        for (s, stage) in roles.iter().enumerate() {
            assert_eq!(stage.len(), blocks[s]);
            for (j, r) in stage.iter().enumerate() {
                let all = [r.g, r.dst, GradBuf::Rot(r.h), GradBuf::Rot(r.q)];
                for a in 0..4 {
                    for b in a + 1..4 {
                        assert_ne!(all[a], all[b], "blocks {blocks:?}, stage {s} block {j}: {r:?}");
                    }
                }
                if j + 1 < stage.len() {
                    assert_eq!(r.g, stage[j + 1].dst, "blocks {blocks:?}, stage {s} block {j}");
                }
                assert_eq!(r.dst == GradBuf::Skip(s.wrapping_sub(1)), s > 0 && j == 0);
            }
            let last = stage.last().unwrap().g;
            assert_eq!(last, if s + 1 == ns { GradBuf::Rot(1) } else { GradBuf::Skip(s) }, "blocks {blocks:?}, stage {s}");
        }
    }
}

#[test]
fn plan_rejects_indivisible_patch() {
    let t = Topology::isotropic(1, 2, vec![4, 8, 16]);
    let err = ActPlan::new(&t, [8, 8, 6], 1, Checkpointing::None, true).unwrap_err();
    assert!(err.to_string().contains("not divisible"), "{err}");
}

#[test]
fn deep_supervision_weights_follow_nnunet() {
    let t = Topology::isotropic(1, 2, vec![4, 8, 16, 32, 64]);
    let w = t.ds_weights();
    // 1, 1/2, 1/4, 0 normalised
    let s = 1.75;
    assert_eq!(w, vec![1.0 / s, 0.5 / s, 0.25 / s, 0.0]);
    let mut t2 = t.clone();
    t2.deep_supervision = false;
    assert_eq!(t2.ds_weights(), vec![1.0, 0.0, 0.0, 0.0]);
}

/// The Topology of a ResidualEncoderUNet's constructor arguments (the fixtures' "net").
fn resenc_topology(net: &serde_json::Value) -> Topology {
    let list = |k: &str| -> Vec<usize> { net[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect() };
    let triples = |k: &str| -> Vec<[usize; 3]> { net[k].as_array().unwrap().iter().map(|v| std::array::from_fn(|a| v[a].as_u64().unwrap() as usize)).collect() };
    let mut t = Topology::isotropic(net["input_channels"].as_u64().unwrap() as usize, net["num_classes"].as_u64().unwrap() as usize, list("features_per_stage")).residual(list("n_blocks_per_stage"));
    (t.kernels, t.strides) = (triples("kernel_sizes"), triples("strides"));
    assert!(list("n_conv_per_stage_decoder").iter().all(|&c| c == t.convs_per_stage));
    t
}

/// segk's ResidualEncoderUNet parameters carry dynamic_network_architectures' names and, in
/// PyTorch's layouts, its shapes: every key of the module's state dict but its aliases
/// (tests/fixtures/resenc/make.py).
#[test]
fn residual_encoder_parameters_are_named_and_shaped_as_pytorchs() {
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resenc/state_dict.json")).unwrap()).unwrap();
    let t = resenc_topology(&fixture["net"]);
    t.validate().unwrap();
    let layout = segk::model::params::ParamLayout::new(&t);
    let ours: std::collections::BTreeMap<String, Vec<usize>> = layout.tensors.iter().map(|p| (p.name.clone(), segk::checkpoint::torch_shape(p))).collect();
    let theirs: std::collections::BTreeMap<String, Vec<usize>> = fixture["keys"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect())).collect();
    let missing: Vec<&String> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<&String> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    for (k, shape) in &theirs {
        assert_eq!(&ours[k], shape, "{k}");
    }
    // Each block starts as its skip alone (init_last_bn_before_add_to_0); other norms at 1.
    let init = layout.init(1);
    for p in &layout.tensors {
        if p.name.ends_with("norm.weight") {
            let want = if p.name.contains(".conv2.") { 0.0 } else { 1.0 };
            assert!(init[p.offset..p.offset + p.len()].iter().all(|&v| v == want), "{}", p.name);
        }
    }
}

/// segk's residual-encoder net with the weights of a PyTorch ResidualEncoderUNet gives its
/// full-resolution output (tests/fixtures/resenc/make.py), within f32 rounding.
#[test]
fn residual_encoder_forward_equals_pytorchs() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/resenc"));
    let bytes = std::fs::read(dir.join("forward.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let t = resenc_topology(&serde_json::from_str(&meta.metadata().as_ref().unwrap()["net"]).unwrap());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensor = |name: &str| -> (Vec<usize>, Vec<f32>) {
        let v = st.tensor(name).unwrap();
        (v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    // NCDHW -> NDHWC.
    let channels_last = |shape: &[usize], v: &[f32]| -> Vec<f32> {
        let (n, c, vox) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
        (0..n * vox * c).map(|i| v[((i / (vox * c)) * c + i % c) * vox + (i / c) % vox]).collect()
    };
    let ((xs, x), (ys, y)) = (tensor("input"), tensor("output"));
    let be = CpuBackend::<f32>::new();
    let mut net = UNet::for_inference(&be, t.clone()).unwrap();
    segk::checkpoint::load_weights(dir, &segk::checkpoint::WeightsFile::Segk("forward".into()), &be, &mut net).unwrap();
    let patch = [xs[2], xs[3], xs[4]];
    let acts = Acts::new(&be, &t, patch, xs[0], Checkpointing::Level1, false).unwrap();
    let lg = net.forward_logits(&be, &acts, &channels_last(&xs, &x)).unwrap();
    let mut ours = vec![0f32; lg.len()];
    be.download(be.view(&acts.arena, lg.offset, lg.len()), &mut ours).unwrap();
    let theirs = channels_last(&ys, &y);
    let e = rel_err(&ours.iter().map(|&v| v as f64).collect::<Vec<_>>(), &theirs.iter().map(|&v| v as f64).collect::<Vec<_>>());
    eprintln!("output rel err {e} against PyTorch's");
    assert!(e < 1e-5, "output rel err {e} against PyTorch's");
}
