//! Every CPU op: forward against a naive reference or a hand-computed case, backward
//! against f64 central finite differences.

mod common;
use common::*;
use segk::backend::cpu::{bf16, conv, convt, loss, misc, norm, optim, pool, Operands};
const W: Operands = Operands::Working;
use segk::backend::{ConvGeom, ConvTGeom, DiceMode, SgdParams};
use segk::tensor::Dims;

/// Direct 7-loop convolution: the definition.
fn naive_conv(x: &[f64], xd: Dims, w: &[f64], b: &[f64], g: &ConvGeom) -> Vec<f64> {
    let yd = g.out_dims(xd);
    let p = g.pad();
    let mut y = vec![0.0; yd.len()];
    for n in 0..yd.n {
        for oz in 0..yd.d {
            for oy in 0..yd.h {
                for ox in 0..yd.w {
                    for co in 0..g.cout {
                        let mut s = b[co];
                        for kd in 0..g.kernel[0] {
                            for kh in 0..g.kernel[1] {
                                for kw in 0..g.kernel[2] {
                                    let iz = (oz * g.stride[0] + kd) as isize - p[0] as isize;
                                    let iy = (oy * g.stride[1] + kh) as isize - p[1] as isize;
                                    let ix = (ox * g.stride[2] + kw) as isize - p[2] as isize;
                                    if iz < 0 || iy < 0 || ix < 0 || iz >= xd.d as isize || iy >= xd.h as isize || ix >= xd.w as isize {
                                        continue;
                                    }
                                    let tap = (kd * g.kernel[1] + kh) * g.kernel[2] + kw;
                                    for ci in 0..g.cin {
                                        s += x[xd.ravel(n, iz as usize, iy as usize, ix as usize) * g.cin + ci] * w[(tap * g.cin + ci) * g.cout + co];
                                    }
                                }
                            }
                        }
                        y[yd.ravel(n, oz, oy, ox) * g.cout + co] = s;
                    }
                }
            }
        }
    }
    y
}

fn naive_convt(x: &[f64], xd: Dims, w: &[f64], b: &[f64], g: &ConvTGeom) -> Vec<f64> {
    let yd = g.out_dims(xd);
    let s = g.stride;
    let mut y = vec![f64::NAN; yd.len()];
    for n in 0..yd.n {
        for oz in 0..yd.d {
            for oy in 0..yd.h {
                for ox in 0..yd.w {
                    let (iz, iy, ix) = (oz / s[0], oy / s[1], ox / s[2]);
                    let t = ((oz % s[0]) * s[1] + oy % s[1]) * s[2] + ox % s[2];
                    for co in 0..g.cout {
                        let mut v = b[co];
                        for ci in 0..g.cin {
                            v += x[xd.ravel(n, iz, iy, ix) * g.cin + ci] * w[(ci * g.taps() + t) * g.cout + co];
                        }
                        y[yd.ravel(n, oz, oy, ox) * g.cout + co] = v;
                    }
                }
            }
        }
    }
    y
}

fn conv_variants() -> Vec<([usize; 3], [usize; 3])> {
    let ks = [[3, 3, 3], [1, 3, 3], [1, 1, 1], [3, 1, 3]];
    let ss = [[1, 1, 1], [2, 2, 2], [1, 2, 2], [2, 1, 1]];
    ks.iter().flat_map(|&k| ss.iter().map(move |&s| (k, s))).collect()
}

#[test]
fn conv_forward_matches_naive_loop() {
    let mut r = rng("conv_forward");
    for (k, s) in conv_variants() {
        let xd = Dims::new(2, [5, 6, 7], 3);
        let g = ConvGeom::new(3, 4, k, s);
        let (x, w, b) = (randn(&mut r, xd.len()), randn(&mut r, g.weight_len()), randn(&mut r, 4));
        let mut y = vec![f64::NAN; g.out_dims(xd).len()];
        conv::conv_fwd(&x, xd, &w, &b, &mut y, &g, W);
        let e = rel_err(&y, &naive_conv(&x, xd, &w, &b, &g));
        assert!(e < 1e-12, "k {k:?} s {s:?}: rel err {e}");
    }
}

#[test]
fn conv_backward_matches_finite_differences() {
    let mut r = rng("conv_backward");
    for (k, s) in conv_variants() {
        let xd = Dims::new(2, [5, 4, 7], 3);
        let g = ConvGeom::new(3, 5, k, s);
        let yd = g.out_dims(xd);
        let (mut x, mut w, mut b) = (randn(&mut r, xd.len()), randn(&mut r, g.weight_len()), randn(&mut r, 5));
        let dy = randn(&mut r, yd.len());
        // L = <dy, conv(x, w, b)>
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; yd.len()];
            conv::conv_fwd(x, xd, w, b, &mut y, &g, W);
            dot(&y, &dy)
        };
        // beta = 1 must add to what dx held.
        let prior = randn(&mut r, xd.len());
        let mut dx = prior.clone();
        conv::conv_dgrad(&dy, &w, &mut dx, xd, &g, 1.0, W);
        dx.iter_mut().zip(&prior).for_each(|(d, p)| *d -= p);
        let (mut dw, mut db) = (vec![f64::NAN; w.len()], vec![f64::NAN; 5]);
        conv::conv_wgrad(&x, xd, &dy, &mut dw, &mut db, &g, W);

        let ix = pick(&mut r, x.len(), 40);
        let (w0, b0) = (w.clone(), b.clone());
        let nx = numeric_grad(&mut x, &ix, &mut |x| loss(x, &w0, &b0));
        let ax: Vec<f64> = ix.iter().map(|&i| dx[i]).collect();
        assert!(rel_err(&ax, &nx) < 1e-7, "dgrad k {k:?} s {s:?}: {}", rel_err(&ax, &nx));

        let iw = pick(&mut r, w.len(), 40);
        let x0 = x.clone();
        let nw = numeric_grad(&mut w, &iw, &mut |w| loss(&x0, w, &b0));
        let aw: Vec<f64> = iw.iter().map(|&i| dw[i]).collect();
        assert!(rel_err(&aw, &nw) < 1e-7, "wgrad k {k:?} s {s:?}: {}", rel_err(&aw, &nw));

        let w1 = w.clone();
        let nb = numeric_grad(&mut b, &[0, 1, 2, 3, 4], &mut |b| loss(&x0, &w1, b));
        assert!(rel_err(&db, &nb) < 1e-7, "bias grad k {k:?} s {s:?}");
    }
}

#[test]
fn conv_dgrad_overwrites_with_beta_zero() {
    let mut r = rng("conv_dgrad_beta0");
    let xd = Dims::new(1, [4, 5, 3], 2);
    for (k, s) in conv_variants() {
        let g = ConvGeom::new(2, 3, k, s);
        let dy = randn(&mut r, g.out_dims(xd).len());
        let w = randn(&mut r, g.weight_len());
        let mut a = vec![f64::NAN; xd.len()];
        let mut b = vec![0.0; xd.len()];
        conv::conv_dgrad(&dy, &w, &mut a, xd, &g, 0.0, W);
        conv::conv_dgrad(&dy, &w, &mut b, xd, &g, 1.0, W);
        assert!(rel_err(&a, &b) < 1e-14, "k {k:?} s {s:?}");
    }
}

#[test]
fn convt_forward_and_backward() {
    let mut r = rng("convt");
    for s in [[2, 2, 2], [1, 2, 2], [2, 1, 2], [1, 1, 1]] {
        let xd = Dims::new(2, [3, 2, 5], 4);
        let g = ConvTGeom { cin: 4, cout: 3, stride: s };
        let yd = g.out_dims(xd);
        let (mut x, mut w, b) = (randn(&mut r, xd.len()), randn(&mut r, g.weight_len()), randn(&mut r, 3));
        let mut y = vec![f64::NAN; yd.len()];
        convt::convt_fwd(&x, xd, &w, &b, &mut y, &g, W);
        assert!(rel_err(&y, &naive_convt(&x, xd, &w, &b, &g)) < 1e-12, "fwd s {s:?}");

        let dy = randn(&mut r, yd.len());
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut y = vec![0.0; yd.len()];
            convt::convt_fwd(x, xd, w, b, &mut y, &g, W);
            dot(&y, &dy)
        };
        let mut dx = vec![f64::NAN; xd.len()];
        convt::convt_dgrad(&dy, &w, &mut dx, xd, &g, 0.0, W);
        let (mut dw, mut db) = (vec![f64::NAN; w.len()], vec![f64::NAN; 3]);
        convt::convt_wgrad(&x, xd, &dy, &mut dw, &mut db, &g, W);
        let ix = pick(&mut r, x.len(), 40);
        let (w0, b0) = (w.clone(), b.clone());
        let nx = numeric_grad(&mut x, &ix, &mut |x| loss(x, &w0, &b0));
        assert!(rel_err(&ix.iter().map(|&i| dx[i]).collect::<Vec<_>>(), &nx) < 1e-7, "dgrad s {s:?}");
        let iw = pick(&mut r, w.len(), 40);
        let x0 = x.clone();
        let nw = numeric_grad(&mut w, &iw, &mut |w| loss(&x0, w, &b0));
        assert!(rel_err(&iw.iter().map(|&i| dw[i]).collect::<Vec<_>>(), &nw) < 1e-7, "wgrad s {s:?}");
        let mut b1 = b.clone();
        let w1 = w.clone();
        let nb = numeric_grad(&mut b1, &[0, 1, 2], &mut |b| loss(&x0, &w1, b));
        assert!(rel_err(&db, &nb) < 1e-7, "bias s {s:?}");
    }
}

fn norm_forward(x: &[f64], xd: Dims, gamma: &[f64], beta: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut mean, mut rstd) = (vec![0.0; xd.n * xd.c], vec![0.0; xd.n * xd.c]);
    norm::norm_stats(x, xd, &mut mean, &mut rstd);
    let mut y = vec![f64::NAN; x.len()];
    norm::norm_fwd(x, xd, &mean, &rstd, gamma, beta, None, segk::backend::LEAKY_SLOPE, &mut y);
    (y, mean, rstd)
}

#[test]
fn norm_statistics_match_two_pass_definition() {
    let mut r = rng("norm_stats");
    // Large offset: E[x^2]-E[x]^2 would lose the variance here.
    let xd = Dims::new(2, [17, 13, 11], 3);
    let x: Vec<f64> = randn(&mut r, xd.len()).iter().map(|v| 1e4 + v).collect();
    let (mut mean, mut rstd) = (vec![0.0; 6], vec![0.0; 6]);
    norm::norm_stats(&x, xd, &mut mean, &mut rstd);
    let (v, c) = (xd.voxels(), xd.c);
    for b in 0..2 {
        for ch in 0..c {
            let vals: Vec<f64> = (0..v).map(|i| x[(b * v + i) * c + ch]).collect();
            let m = vals.iter().sum::<f64>() / v as f64;
            let var = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v as f64;
            assert!((mean[b * c + ch] - m).abs() < 1e-9);
            assert!((rstd[b * c + ch] - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-9);
        }
    }
    let mut m32 = vec![0f32; 6];
    let mut r32 = vec![0f32; 6];
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    norm::norm_stats(&x32, xd, &mut m32, &mut r32);
    for i in 0..6 {
        assert!((r32[i] as f64 / rstd[i] - 1.0).abs() < 1e-3, "f32 rstd {} vs {}", r32[i], rstd[i]);
    }
}

#[test]
fn norm_act_backward_matches_finite_differences() {
    let mut r = rng("norm_act_backward");
    for xd in [Dims::new(2, [3, 4, 5], 3), Dims::new(1, [7, 1, 9], 2), Dims::new(3, [45, 10, 11], 2)] {
        // Away from the LeakyReLU kink (|gamma * xhat| > |beta| everywhere), so a finite
        // difference never steps across it.
        let away = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|v| v.signum() * (0.5 + v.abs())).collect() };
        let (mut x, mut gamma) = (away(randn(&mut r, xd.len())), away(randn(&mut r, xd.c)));
        let mut beta: Vec<f64> = randn(&mut r, xd.c).iter().map(|v| 0.1 * v).collect();
        let dy = randn(&mut r, xd.len());
        let loss = |x: &[f64], g: &[f64], b: &[f64]| dot(&norm_forward(x, xd, g, b).0, &dy);
        let (_, mean, rstd) = norm_forward(&x, xd, &gamma, &beta);
        let mut dx = dy.clone();
        let (mut dg, mut db) = (vec![f64::NAN; xd.c], vec![f64::NAN; xd.c]);
        norm::norm_bwd_inplace(&mut dx, &x, xd, (&mean, &rstd, &gamma, &beta), segk::backend::LEAKY_SLOPE, &mut dg, &mut db);
        let ix = pick(&mut r, x.len(), 40);
        let (g0, b0) = (gamma.clone(), beta.clone());
        let nx = numeric_grad(&mut x, &ix, &mut |x| loss(x, &g0, &b0));
        let e = rel_err(&ix.iter().map(|&i| dx[i]).collect::<Vec<_>>(), &nx);
        assert!(e < 1e-6, "dx {xd}: {e}");
        let x0 = x.clone();
        let idx: Vec<usize> = (0..xd.c).collect();
        let ng = numeric_grad(&mut gamma, &idx, &mut |g| loss(&x0, g, &b0));
        assert!(rel_err(&dg, &ng) < 1e-6, "dgamma {xd}");
        let g1 = gamma.clone();
        let nb = numeric_grad(&mut beta, &idx, &mut |b| loss(&x0, &g1, b));
        assert!(rel_err(&db, &nb) < 1e-6, "dbeta {xd}");
    }
}

#[test]
fn avg_pool_hand_computed() {
    // One channel, 3 x 2 x 2 pooled by [2, 2, 1]: the last slice is left out by the floor.
    let xd = Dims::new(1, [3, 2, 2], 1);
    let x: Vec<f64> = (0..12).map(f64::from).collect();
    let mut y = vec![f64::NAN; 2];
    pool::avg_pool(&x, xd, [2, 2, 1], &mut y);
    assert_eq!(y, vec![(0.0 + 2.0 + 4.0 + 6.0) / 4.0, (1.0 + 3.0 + 5.0 + 7.0) / 4.0]);
    let mut dx = vec![f64::NAN; 12];
    pool::avg_pool_bwd(&[4.0, 8.0], [2, 2, 1], &mut dx, xd, 0.0);
    assert_eq!(dx, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
    let mut acc = vec![1.0; 12];
    pool::avg_pool_bwd(&[4.0, 8.0], [2, 2, 1], &mut acc, xd, 1.0);
    assert_eq!(acc[..2], [2.0, 3.0]);
    assert_eq!(acc[8..], [1.0; 4]);
}

/// The end of a ResNet-D block with a pooled skip, out = leaky(norm(x2) + avg_pool(x)),
/// backward through leaky_bwd (from the output), norm_bwd without activation and
/// avg_pool_bwd, against f64 central finite differences in x2, x, gamma and beta.
#[test]
fn residual_block_end_matches_finite_differences() {
    let mut r = rng("residual_end");
    let (xd, k) = (Dims::new(2, [4, 6, 5], 3), [2, 2, 1]);
    let od = segk::backend::pooled_dims(xd, k);
    let forward = |x2: &[f64], x: &[f64], g: &[f64], b: &[f64]| -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut mean, mut rstd) = (vec![0.0; od.n * od.c], vec![0.0; od.n * od.c]);
        norm::norm_stats(x2, od, &mut mean, &mut rstd);
        let mut res = vec![f64::NAN; od.len()];
        pool::avg_pool(x, xd, k, &mut res);
        let mut y = vec![f64::NAN; od.len()];
        norm::norm_fwd(x2, od, &mean, &rstd, g, b, Some(&res), segk::backend::LEAKY_SLOPE, &mut y);
        let mut pre = vec![f64::NAN; od.len()];
        norm::norm_fwd(x2, od, &mean, &rstd, g, b, Some(&res), 1.0, &mut pre);
        (y, mean, rstd, pre)
    };
    // Inputs whose pre-activations sit away from the kink, so no finite difference crosses it.
    let (mut x2, mut x, mut gamma, mut beta) = loop {
        let (x2, x, g, b) = (randn(&mut r, od.len()), randn(&mut r, xd.len()), randn(&mut r, od.c), randn(&mut r, od.c));
        if forward(&x2, &x, &g, &b).3.iter().all(|p| p.abs() > 1e-3) {
            break (x2, x, g, b);
        }
    };
    let dy = randn(&mut r, od.len());
    let loss = |x2: &[f64], x: &[f64], g: &[f64], b: &[f64]| dot(&forward(x2, x, g, b).0, &dy);
    let (y, mean, rstd, _) = forward(&x2, &x, &gamma, &beta);
    let mut dpre = dy.clone();
    norm::leaky_bwd_inplace(&mut dpre, &y);
    let mut dx2 = dpre.clone();
    let (mut dg, mut db) = (vec![f64::NAN; od.c], vec![f64::NAN; od.c]);
    norm::norm_bwd_inplace(&mut dx2, &x2, od, (&mean, &rstd, &gamma, &beta), 1.0, &mut dg, &mut db);
    let mut dx = vec![f64::NAN; xd.len()];
    pool::avg_pool_bwd(&dpre, k, &mut dx, xd, 0.0);
    let (x0, x20, g0, b0) = (x.clone(), x2.clone(), gamma.clone(), beta.clone());
    let i2 = pick(&mut r, x2.len(), 40);
    let n2 = numeric_grad(&mut x2, &i2, &mut |v| loss(v, &x0, &g0, &b0));
    assert!(rel_err(&i2.iter().map(|&i| dx2[i]).collect::<Vec<_>>(), &n2) < 1e-6, "dx2");
    let i1 = pick(&mut r, x.len(), 40);
    let n1 = numeric_grad(&mut x, &i1, &mut |v| loss(&x20, v, &g0, &b0));
    assert!(rel_err(&i1.iter().map(|&i| dx[i]).collect::<Vec<_>>(), &n1) < 1e-6, "dx through the pooled skip");
    let ic: Vec<usize> = (0..od.c).collect();
    let ng = numeric_grad(&mut gamma, &ic, &mut |g| loss(&x20, &x0, g, &b0));
    assert!(rel_err(&dg, &ng) < 1e-6, "dgamma");
    let nb = numeric_grad(&mut beta, &ic, &mut |b| loss(&x20, &x0, &g0, b));
    assert!(rel_err(&db, &nb) < 1e-6, "dbeta");
}

#[test]
fn loss_hand_computed_case() {
    // One sample, two voxels, two classes, logits 0: p = 0.5 everywhere, labels [1, 0].
    let ld = Dims::new(1, [1, 1, 2], 2);
    let mut z = vec![0.0f64; 4];
    let [ce, dice, max_label] = loss::softmax_dice_ce(&mut z, ld, &[1, 0], DiceMode::Batch, false, 1.0).unwrap();
    assert!((ce - 2f64.ln()).abs() < 1e-12);
    // class 1: I = 0.5, P = 1, G = 1 -> dc = (1 + s) / (2 + s)
    let dc = (1.0 + 1e-5) / (2.0 + 1e-5);
    assert!((dice + dc).abs() < 1e-12, "dice {dice}");
    assert_eq!(max_label, 1.0);
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let mut r = rng("loss_backward");
    // With an ignore label (value c) on every third voxel too: those get no gradient.
    for ignore in [false, true] {
        for mode in [DiceMode::Batch, DiceMode::PerSample] {
            for (ld, w) in [(Dims::new(2, [3, 4, 5], 3), 1.0), (Dims::new(3, [2, 2, 3], 4), 0.25)] {
                let mut z: Vec<f64> = randn(&mut r, ld.len()).iter().map(|v| 3.0 * v).collect();
                let labels: Vec<u8> = (0..ld.rows()).map(|i| if ignore && i % 3 == 1 { ld.c as u8 } else { ((i * 7 + (z[i] > 0.0) as usize) % ld.c) as u8 }).collect();
                let mut g = z.clone();
                loss::softmax_dice_ce(&mut g, ld, &labels, mode, ignore, w).unwrap();
                let idx = pick(&mut r, z.len(), 60);
                let n = numeric_grad(&mut z, &idx, &mut |z| {
                    let mut t = z.to_vec();
                    let [ce, dice, _] = loss::softmax_dice_ce(&mut t, ld, &labels, mode, ignore, 1.0).unwrap();
                    w * (ce + dice)
                });
                let e = rel_err(&idx.iter().map(|&i| g[i]).collect::<Vec<_>>(), &n);
                assert!(e < 1e-6, "{mode:?} ignore {ignore} {ld}: {e}");
                if ignore {
                    assert!(g.chunks(ld.c).zip(&labels).all(|(gr, &l)| l as usize != ld.c || gr.iter().all(|&v| v == 0.0)), "ignored voxels get no gradient");
                }
            }
        }
    }
}

#[test]
fn loss_with_ignore_label_hand_computed() {
    // The hand-computed case plus two ignored voxels (label 2 = the class count): the same
    // loss, as nnU-Net's masked Dice and CE with ignore_index give; an all-ignored batch: CE 0,
    // every Dice 1 (smooth / smooth), no gradient.
    let ld = Dims::new(1, [1, 1, 4], 2);
    let mut z = vec![0.0, 0.0, 3.0, -1.0, 0.0, 0.0, -2.0, 5.0];
    let [ce, dice, max_label] = loss::softmax_dice_ce(&mut z, ld, &[1, 2, 0, 2], DiceMode::Batch, true, 1.0).unwrap();
    assert!((ce - 2f64.ln()).abs() < 1e-12, "ce {ce}");
    assert!((dice + (1.0 + 1e-5) / (2.0 + 1e-5)).abs() < 1e-12, "dice {dice}");
    assert_eq!(max_label, 2.0);
    assert!(z[2..4].iter().chain(&z[6..8]).all(|&v| v == 0.0), "{z:?}");
    // Without an ignore label, 2 is a label the net has no output for.
    let [ce, ..] = loss::softmax_dice_ce(&mut vec![0.0; 8], ld, &[1, 2, 0, 2], DiceMode::Batch, false, 1.0).unwrap();
    assert!(ce.is_nan());
    let mut z = vec![0.5f64; 8];
    let [ce, dice, _] = loss::softmax_dice_ce(&mut z, ld, &[2; 4], DiceMode::PerSample, true, 1.0).unwrap();
    assert_eq!((ce, dice), (0.0, -1.0));
    assert_eq!(z, vec![0.0; 8]);
    // A label above the ignore label is still refused.
    let [_, dice, max_label] = loss::softmax_dice_ce(&mut vec![0.0; 8], ld, &[1, 3, 0, 2], DiceMode::Batch, true, 1.0).unwrap();
    assert!(dice.is_nan() && max_label == 3.0);
}

/// Region nets: sigmoid + soft Dice over every region + BCE, against a hand-computed case and
/// f64 finite differences (nested regions, a region absent from the batch).
#[test]
fn region_loss_hand_computed_and_finite_differences() {
    use segk::backend::RegionMasks;
    // Two voxels, one region {1}: logits 0 -> p = 0.5; labels [1, 0].
    let one = RegionMasks::new(&[vec![1]]).unwrap();
    let ld = Dims::new(1, [1, 1, 2], 1);
    let mut z = vec![0.0f64; 2];
    let [bce, dice, max_label] = loss::sigmoid_dice_bce(&mut z, ld, &[1, 0], &one, DiceMode::Batch, false, 1.0).unwrap();
    assert!((bce - 2f64.ln()).abs() < 1e-12, "bce {bce}");
    // I = 0.5, P = 1, G = 1
    assert!((dice + (1.0 + 1e-5) / (2.0 + 1e-5)).abs() < 1e-12, "dice {dice}");
    assert_eq!(max_label, 1.0);
    let [_, dice, _] = loss::sigmoid_dice_bce(&mut vec![0.0; 2], ld, &[1, 40], &one, DiceMode::Batch, false, 1.0).unwrap();
    assert!(dice.is_nan(), "a label value beyond 31 is refused");
    // With an ignore label (2, above region {1}): voxel 2 takes no part; the BCE is summed over
    // the labelled voxels' regions and divided by their count (nnU-Net's masked mean).
    let ld3 = Dims::new(1, [1, 1, 3], 1);
    let mut z = vec![0.0f64, 0.0, 5.0];
    let [bce, dice, _] = loss::sigmoid_dice_bce(&mut z, ld3, &[1, 0, 2], &one, DiceMode::Batch, true, 1.0).unwrap();
    assert!((bce - 2f64.ln()).abs() < 1e-12 && (dice + (1.0 + 1e-5) / (2.0 + 1e-5)).abs() < 1e-12, "bce {bce} dice {dice}");
    assert_eq!(z[2], 0.0, "no gradient at an ignored voxel");
    let mut z = vec![0.7f64; 3];
    let [bce, dice, _] = loss::sigmoid_dice_bce(&mut z, ld3, &[2, 2, 2], &one, DiceMode::PerSample, true, 1.0).unwrap();
    assert_eq!((bce, dice, z), (0.0, -1.0, vec![0.0; 3]), "an all-ignored batch: BCE 0, Dice 1 (smoothing alone), no gradient");
    let nested = RegionMasks::new(&[vec![1, 2, 3], vec![2, 3], vec![3]]).unwrap();
    assert_eq!(nested.ignore_value(), 4);
    let mut r = rng("region_loss");
    for mode in [DiceMode::Batch, DiceMode::PerSample] {
        // Labels up to 3 (every region present), and only 0 and 1 (regions 2 and 3 absent);
        // then with ignore label 4 on about a third of the voxels.
        for (ld, top, w, ignore) in [(Dims::new(2, [3, 4, 5], 3), 4, 1.0, false), (Dims::new(3, [2, 2, 3], 3), 2, 0.25, false), (Dims::new(2, [3, 4, 5], 3), 5, 0.5, true)] {
            let mut z: Vec<f64> = randn(&mut r, ld.len()).iter().map(|v| 3.0 * v).collect();
            let labels: Vec<u8> = (0..ld.rows()).map(|i| ((i * 7 + (z[i] > 0.0) as usize) % top) as u8).collect();
            let mut g = z.clone();
            loss::sigmoid_dice_bce(&mut g, ld, &labels, &nested, mode, ignore, w).unwrap();
            let idx = pick(&mut r, z.len(), 60);
            let n = numeric_grad(&mut z, &idx, &mut |z| {
                let [bce, dice, _] = loss::sigmoid_dice_bce(&mut z.to_vec(), ld, &labels, &nested, mode, ignore, 1.0).unwrap();
                w * (bce + dice)
            });
            let e = rel_err(&idx.iter().map(|&i| g[i]).collect::<Vec<_>>(), &n);
            assert!(e < 1e-6, "{mode:?} {ld} labels < {top} ignore {ignore}: {e}");
        }
    }
}

#[test]
fn region_bits_threshold_each_region_at_zero() {
    use segk::backend::cpu::misc;
    let mut out = vec![255u8; 2];
    misc::region_bits(&[0.5f64, -0.1, 2.0, 0.0, 3.0, -4.0], Dims::new(1, [1, 1, 2], 3), &mut out);
    assert_eq!(out, vec![0b101, 0b010]);
}

#[test]
fn loss_marks_labels_beyond_classes() {
    // NaN parts (the update is skipped), the label reported, the logits left alone.
    let mut z = vec![0.25f64; 4];
    let [ce, dice, max_label] = loss::softmax_dice_ce(&mut z, Dims::new(1, [1, 1, 2], 2), &[0, 5], DiceMode::Batch, false, 1.0).unwrap();
    assert!(ce.is_nan() && dice.is_nan() && max_label == 5.0);
    assert_eq!(z, vec![0.25; 4]);
}

#[test]
fn sgd_nesterov_hand_computed() {
    let (mut p, g, mut m) = (vec![1.0f64], vec![0.5f64], vec![0.0f64]);
    let sp = SgdParams { lr: 0.1, momentum: 0.9, weight_decay: 0.1, max_grad_norm: 12.0 };
    // Guard: squared norm 0.25 (no clipping), a finite loss part.
    optim::sgd_update(&mut p, &g, &mut m, &sp, &[0.25, 1.0]);
    // g' = 0.6, buf = 0.6 (from zero), p = 1 - 0.1 * (0.6 + 0.54)
    assert!((p[0] - 0.886).abs() < 1e-12 && (m[0] - 0.6).abs() < 1e-12, "{p:?} {m:?}");
    optim::sgd_update(&mut p, &g, &mut m, &sp, &[0.25, 1.0]);
    // g' = 0.5 + 0.0886, buf = 0.54 + g', p -= 0.1 * (g' + 0.9 buf)
    assert!((m[0] - 1.1286).abs() < 1e-12 && (p[0] - 0.725566).abs() < 1e-12, "{p:?} {m:?}");
    // A non-finite guard value skips the step.
    for bad in [[f64::NAN, 1.0], [0.25, f64::INFINITY]] {
        optim::sgd_update(&mut p, &g, &mut m, &sp, &bad);
        assert!((m[0] - 1.1286).abs() < 1e-12 && (p[0] - 0.725566).abs() < 1e-12, "{p:?} {m:?}");
    }
}

#[test]
fn sgd_clips_to_the_gradient_norm() {
    // Squared norm 576: the gradient is scaled by 12 / (24 + 1e-6) before the step.
    let (mut p, g, mut m) = (vec![0.0f64], vec![2.0f64], vec![0.0f64]);
    let sp = SgdParams { lr: 1.0, momentum: 0.0, weight_decay: 0.0, max_grad_norm: 12.0 };
    optim::sgd_update(&mut p, &g, &mut m, &sp, &[576.0]);
    let f = 12.0 / (24.0 + 1e-6);
    assert!((m[0] - 2.0 * f).abs() < 1e-12 && (p[0] + 2.0 * f).abs() < 1e-12, "{p:?} {m:?}");
}

#[test]
fn clip_and_poly_schedule() {
    assert_eq!(segk::backend::clip_factor(6.0, 12.0), 1.0);
    assert!((segk::backend::clip_factor(24.0, 12.0) - 12.0 / (24.0 + 1e-6)).abs() < 1e-15);
    assert_eq!(segk::backend::poly_lr(0.01, 0, 1000), 0.01);
    assert!((segk::backend::poly_lr(0.01, 500, 1000) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
    assert_eq!(segk::backend::poly_lr(0.01, 1000, 1000), 0.0);
    let g = vec![3.0f64, 4.0];
    assert_eq!(optim::sum_squares(&g), 25.0);
}

#[test]
fn concat_and_split() {
    let a: Vec<f64> = (0..6).map(|v| v as f64).collect();
    let b: Vec<f64> = (10..13).map(|v| v as f64).collect();
    let mut out = vec![0.0; 9];
    misc::concat(&a, 2, &b, 1, 3, &mut out);
    assert_eq!(out, vec![0., 1., 10., 2., 3., 11., 4., 5., 12.]);
    let (mut da, mut db) = (vec![0.0; 6], vec![1.0; 3]);
    misc::concat_bwd(&out, 2, 1, 3, &mut da, &mut db, 1.0);
    assert_eq!(da, a);
    assert_eq!(db, vec![11., 12., 13.]);
}

#[test]
fn nearest_downsampling_picks_centres() {
    let sd = Dims::new(1, [4, 4, 2], 1);
    let src: Vec<u8> = (0..32).map(|v| v as u8).collect();
    let dd = Dims::new(1, [2, 2, 1], 1);
    let mut dst = vec![0u8; 4];
    misc::downsample_labels(&src, sd, &mut dst, dd);
    // nearest-exact: index 2i+1 per halved axis, index 1 of 2 along w -> (1,1,1),(1,3,1),(3,1,1),(3,3,1)
    assert_eq!(dst, vec![sd.ravel(0, 1, 1, 1) as u8, sd.ravel(0, 1, 3, 1) as u8, sd.ravel(0, 3, 1, 1) as u8, sd.ravel(0, 3, 3, 1) as u8]);
    let mut arg = vec![9u8; 2];
    misc::argmax(&[0.1f32, 0.9, 0.3, 2.0, -1.0, 0.0], Dims::new(1, [1, 1, 2], 3), &mut arg);
    assert_eq!(arg, vec![1, 0]);
}

/// The bf16-storage twin (the reference for the GPU's default precision) rounds what ops store
/// into activation memory to the nearest bf16, ties to even, and leaves working memory alone.
#[test]
fn bf16_storage_twin_rounds_activation_memory_only() {
    use segk::backend::cpu::CpuBackend;
    use segk::backend::Backend;
    let be = CpuBackend::<f64>::with_bf16_storage();
    // 1 + 2^-9 is a tie (to 1), 1 + 3*2^-9 a tie (to 1 + 2^-7), 0x408E8006 just above a tie.
    let just_above = f32::from_bits(0x408E_8006);
    let v = [1.0 + 2f32.powi(-9), 1.0 + 3.0 * 2f32.powi(-9), just_above, -2.5];
    let want = [1.0, 1.0 + 2f32.powi(-7), f32::from_bits(0x408F_0000), -2.5];
    let (act, work) = (be.alloc_act(4).unwrap(), be.alloc(4).unwrap());
    let (a, w) = (be.view(&act, 0, 4), be.view(&work, 0, 4));
    be.upload(a, &v).unwrap();
    be.upload(w, &v).unwrap();
    let (mut ga, mut gw) = ([0f32; 4], [0f32; 4]);
    be.download(a, &mut ga).unwrap();
    be.download(w, &mut gw).unwrap();
    assert_eq!(ga, want, "activation memory holds bf16 values");
    assert_eq!(gw, v, "working memory is not rounded");
    // An op's output into activation memory is rounded too: concat of the working values.
    let out = be.alloc_act(8).unwrap();
    be.concat(w, 1, w, 1, 4, be.view(&out, 0, 8)).unwrap();
    let mut got = [0f32; 8];
    be.download(be.view(&out, 0, 8), &mut got).unwrap();
    assert_eq!(got.iter().step_by(2).copied().collect::<Vec<_>>(), want, "op outputs are stored rounded");
}

/// `v` rounded to the nearest bf16 (ties to even), in f64.
fn bf16_round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&v| half::bf16::from_f32(v as f32).to_f64()).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&v| v as f32).collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&v| v as f64).collect()
}

/// The bf16 kernels need AVX512-BF16; elsewhere the test says why it did not run.
fn bf16_cpu(test: &str) -> bool {
    if !bf16::available() {
        println!("SKIPPED {test}: this CPU has no AVX512-BF16");
    }
    bf16::available()
}

#[test]
fn bf16_gemm_matches_f64_products_of_rounded_operands() {
    if !bf16_cpu("bf16_gemm") {
        return;
    }
    let mut r = rng("bf16_gemm");
    // Tails of every blocking: rows past 12 (micro-kernel) and 128 (packed A), columns past
    // 32 and 16, pairs past 256 (packed B), odd k.
    for (m, k, n) in [(1, 1, 1), (5, 3, 7), (12, 64, 32), (13, 65, 33), (37, 513, 70), (130, 600, 40), (25, 1, 17), (3, 1100, 5)] {
        for (ta, tb, beta) in [(false, false, 0.0), (true, false, 1.0), (false, true, 1.0), (true, true, 0.0), (false, false, 0.5)] {
            let (a, b, c0) = (to_f32(&randn(&mut r, m * k)), to_f32(&randn(&mut r, k * n)), to_f32(&randn(&mut r, m * n)));
            let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
            let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
            let mut c = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
            // SAFETY: a is m x k, b k x n at the strides given, c m x n row-major.
            unsafe { bf16::gemm(m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize) };
            let (ar, br) = (bf16_round(&to_f64(&a)), bf16_round(&to_f64(&b)));
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut scale) = (beta as f64 * c0[i * n + j] as f64, (beta as f64 * c0[i * n + j] as f64).abs());
                    for p in 0..k {
                        let t = ar[i * rsa as usize + p * csa as usize] * br[p * rsb as usize + j * csb as usize];
                        exact += t;
                        scale += t.abs();
                    }
                    // f32 sums of k terms: at most k rounding errors of 2^-24 of the running sum.
                    let err = (c[i * n + j] as f64 - exact).abs();
                    assert!(err <= (k + 1) as f64 * 2f64.powi(-23) * scale, "m {m} k {k} n {n} ta {ta} tb {tb} beta {beta} at ({i}, {j}): {} vs {exact}", c[i * n + j]);
                }
            }
        }
    }
}

/// The bf16 convolutions against the f64 ones on operands rounded to bf16 first: equal to
/// f32 summation error; and visibly different from unrounded f64 (so bf16 really ran).
#[test]
fn bf16_convolutions_match_f64_on_rounded_operands() {
    if !bf16_cpu("bf16_convolutions") {
        return;
    }
    let bf = Operands::Bf16;
    let mut r = rng("bf16_conv");
    let close = |got: &[f32], exact: &[f64], unrounded: &[f64], what: &str| {
        let (e, u) = (rel_err(&to_f64(got), exact), rel_err(&to_f64(got), unrounded));
        assert!(e < 2e-6, "{what}: {e} from f64 on bf16 operands");
        assert!(u > 1e-4, "{what}: {u} from unrounded f64: operands were not rounded");
    };
    // Odd cin (odd k: im2col), even cin on lines of 13 (stride 1: the direct kernels, 12
    // voxels and a tail per line) and of 7 (im2col again); cout past one 16-lane half.
    for ((k, s), (cin, width)) in conv_variants().into_iter().flat_map(|v| [(9, 7), (10, 13), (10, 7)].map(|c| (v, c))) {
        let xd = Dims::new(2, [5, 6, width], cin);
        let g = ConvGeom::new(cin, 20, k, s);
        let yd = g.out_dims(xd);
        let (x, w, b, dy, prior) = (randn(&mut r, xd.len()), randn(&mut r, g.weight_len()), randn(&mut r, 20), randn(&mut r, yd.len()), randn(&mut r, xd.len()));
        let (xr, wr, dyr) = (bf16_round(&x), bf16_round(&w), bf16_round(&dy));
        let tag = format!("k {k:?} s {s:?} cin {cin} width {width}");

        let (mut y, mut ye, mut yu) = (vec![f32::NAN; yd.len()], vec![0.0; yd.len()], vec![0.0; yd.len()]);
        conv::conv_fwd(&to_f32(&x), xd, &to_f32(&w), &to_f32(&b), &mut y, &g, bf);
        conv::conv_fwd(&xr, xd, &wr, &b, &mut ye, &g, W);
        conv::conv_fwd(&x, xd, &w, &b, &mut yu, &g, W);
        close(&y, &ye, &yu, &format!("fwd {tag}"));

        let (mut dx, mut dxe, mut dxu) = (to_f32(&prior), prior.clone(), prior.clone());
        conv::conv_dgrad(&to_f32(&dy), &to_f32(&w), &mut dx, xd, &g, 1.0, bf);
        conv::conv_dgrad(&dyr, &wr, &mut dxe, xd, &g, 1.0, W);
        conv::conv_dgrad(&dy, &w, &mut dxu, xd, &g, 1.0, W);
        // beta 1: compare what was added.
        let added = |v: &[f64]| v.iter().zip(&prior).map(|(a, p)| a - p).collect::<Vec<_>>();
        let dx_added: Vec<f32> = dx.iter().zip(&prior).map(|(&a, &p)| (a as f64 - p) as f32).collect();
        let e = rel_err(&to_f64(&dx_added), &added(&dxe));
        assert!(e < 1e-5, "dgrad+= {tag}: {e}");
        let mut dx0 = vec![f32::NAN; xd.len()];
        conv::conv_dgrad(&to_f32(&dy), &to_f32(&w), &mut dx0, xd, &g, 0.0, bf);
        conv::conv_dgrad(&dyr, &wr, &mut dxe, xd, &g, 0.0, W);
        conv::conv_dgrad(&dy, &w, &mut dxu, xd, &g, 0.0, W);
        close(&dx0, &dxe, &dxu, &format!("dgrad {tag}"));

        let (mut dw, mut db, mut dwe, mut dbe, mut dwu) = (vec![f32::NAN; w.len()], vec![f32::NAN; 20], vec![0.0; w.len()], vec![0.0; 20], vec![0.0; w.len()]);
        conv::conv_wgrad(&to_f32(&x), xd, &to_f32(&dy), &mut dw, &mut db, &g, bf);
        conv::conv_wgrad(&xr, xd, &dyr, &mut dwe, &mut dbe, &g, W);
        conv::conv_wgrad(&x, xd, &dy, &mut dwu, &mut dbe, &g, W);
        close(&dw, &dwe, &dwu, &format!("wgrad {tag}"));
    }
    for st in [[2, 2, 2], [1, 2, 2]] {
        let xd = Dims::new(2, [3, 4, 5], 9);
        let g = ConvTGeom { cin: 9, cout: 18, stride: st };
        let yd = g.out_dims(xd);
        let (x, w, b, dy) = (randn(&mut r, xd.len()), randn(&mut r, g.weight_len()), randn(&mut r, 18), randn(&mut r, yd.len()));
        let (xr, wr, dyr) = (bf16_round(&x), bf16_round(&w), bf16_round(&dy));
        let (mut y, mut ye, mut yu) = (vec![f32::NAN; yd.len()], vec![0.0; yd.len()], vec![0.0; yd.len()]);
        convt::convt_fwd(&to_f32(&x), xd, &to_f32(&w), &to_f32(&b), &mut y, &g, bf);
        convt::convt_fwd(&xr, xd, &wr, &b, &mut ye, &g, W);
        convt::convt_fwd(&x, xd, &w, &b, &mut yu, &g, W);
        close(&y, &ye, &yu, &format!("convT fwd {st:?}"));
        let (mut dx, mut dxe, mut dxu) = (vec![f32::NAN; xd.len()], vec![0.0; xd.len()], vec![0.0; xd.len()]);
        convt::convt_dgrad(&to_f32(&dy), &to_f32(&w), &mut dx, xd, &g, 0.0, bf);
        convt::convt_dgrad(&dyr, &wr, &mut dxe, xd, &g, 0.0, W);
        convt::convt_dgrad(&dy, &w, &mut dxu, xd, &g, 0.0, W);
        close(&dx, &dxe, &dxu, &format!("convT dgrad {st:?}"));
        let (mut dw, mut db, mut dwe, mut dbe, mut dwu) = (vec![f32::NAN; w.len()], vec![f32::NAN; 18], vec![0.0; w.len()], vec![0.0; 18], vec![0.0; w.len()]);
        convt::convt_wgrad(&to_f32(&x), xd, &to_f32(&dy), &mut dw, &mut db, &g, bf);
        convt::convt_wgrad(&xr, xd, &dyr, &mut dwe, &mut dbe, &g, W);
        convt::convt_wgrad(&x, xd, &dy, &mut dwu, &mut dbe, &g, W);
        close(&dw, &dwe, &dwu, &format!("convT wgrad {st:?}"));
    }
}

/// Input convolutions (cin < 8) and heads (cout < 16) stay f32 under bf16: bit-equal to f32.
#[test]
fn bf16_leaves_input_convolutions_and_heads_in_f32() {
    let mut r = rng("bf16_edges");
    for (cin, cout) in [(1, 32), (4, 32), (32, 3), (32, 15)] {
        let xd = Dims::new(1, [4, 5, 6], cin);
        let g = ConvGeom::new(cin, cout, [3, 3, 3], [1, 1, 1]);
        let yd = g.out_dims(xd);
        let (x, w, b) = (to_f32(&randn(&mut r, xd.len())), to_f32(&randn(&mut r, g.weight_len())), to_f32(&randn(&mut r, cout)));
        let (mut y16, mut y32) = (vec![f32::NAN; yd.len()], vec![f32::NAN; yd.len()]);
        conv::conv_fwd(&x, xd, &w, &b, &mut y16, &g, Operands::Bf16);
        conv::conv_fwd(&x, xd, &w, &b, &mut y32, &g, W);
        assert_eq!(y16, y32, "{cin} -> {cout}");
    }
}
