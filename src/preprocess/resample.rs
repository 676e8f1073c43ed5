//! Resampling to a new grid the way nnU-Net does it (skimage `resize` geometry: voxel centres
//! aligned, `in = (out + 0.5) * n_in / n_out - 0.5`, edge mode): cubic B-spline for images,
//! per-label linear for label maps (the label with the largest interpolated indicator wins),
//! and nearest along the low-resolution axis when the spacing is anisotropic ("separate z").
//!
//! Images are resampled one axis at a time (a tensor-product spline is separable, so three
//! 1D passes equal one 3D pass at a fraction of the work); label maps in one gather pass over
//! at most 8 neighbours per voxel, whatever the number of labels.

/// Interpolation along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Nearest,
    Linear,
    /// Cubic B-spline with its interpolating prefilter (scipy's order 3).
    Cubic,
}

/// nnU-Net's anisotropy threshold for resampling the coarse axis on its own.
pub const SEPARATE_Z_ANISOTROPY: f64 = 3.0;

/// The shape `shape` at `old` spacing takes at `new` spacing (nnU-Net's compute_new_shape).
pub fn new_shape(shape: [usize; 3], old: [f64; 3], new: [f64; 3]) -> [usize; 3] {
    std::array::from_fn(|a| ((old[a] / new[a] * shape[a] as f64).round() as usize).max(1))
}

/// The single low-resolution axis of an anisotropic spacing, if there is one.
fn lowres_axis(sp: [f64; 3]) -> Option<usize> {
    let max = sp.iter().cloned().fold(f64::MIN, f64::max);
    let min = sp.iter().cloned().fold(f64::MAX, f64::min);
    if max / min <= SEPARATE_Z_ANISOTROPY {
        return None;
    }
    let coarse: Vec<usize> = (0..3).filter(|&a| sp[a] == max).collect();
    (coarse.len() == 1).then(|| coarse[0])
}

/// Per-axis kernels for a resampling from spacing `old` to `new`: `kernel` on every axis,
/// except nearest along the low-resolution axis when either spacing is anisotropic
/// (nnU-Net's separate z with order_z = 0).
pub fn axis_kernels(old: [f64; 3], new: [f64; 3], kernel: Kernel) -> [Kernel; 3] {
    let mut k = [kernel; 3];
    let anisotropic = |s: [f64; 3]| s.iter().cloned().fold(f64::MIN, f64::max) / s.iter().cloned().fold(f64::MAX, f64::min) > SEPARATE_Z_ANISOTROPY;
    let axis = if anisotropic(old) { lowres_axis(old) } else if anisotropic(new) { lowres_axis(new) } else { None };
    if let Some(a) = axis {
        k[a] = Kernel::Nearest;
    }
    k
}

/// Where output voxel `o` of `n_out` samples the input of `n_in` (within half a voxel
/// beyond either end).
fn source_position(o: usize, n_in: usize, n_out: usize) -> f64 {
    (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5
}

/// Whole-sample mirror of an index into 0..n (the B-spline prefilter's boundary).
fn mirror(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Input indices and weights of one output sample (unused taps have weight 0).
#[derive(Clone, Copy, Debug)]
pub struct Taps {
    pub idx: [usize; 4],
    pub w: [f64; 4],
}

/// Edge samples scipy pads each side with before a cubic prefilter in 'nearest' mode (what
/// skimage's mode='edge' becomes); padding, then mirror boundaries, reproduces it exactly.
pub const CUBIC_PAD: usize = 12;

/// The taps of every output position along an axis of `n_in` resampled to `n_out`. Cubic
/// taps index the padded coefficient line (`n_in + 2 * CUBIC_PAD` long).
pub fn taps(n_in: usize, n_out: usize, kernel: Kernel) -> Vec<Taps> {
    (0..n_out)
        .map(|o| {
            let x = source_position(o, n_in, n_out);
            let clamped = x.clamp(0.0, (n_in - 1) as f64);
            let i = clamped.floor() as usize;
            let t = clamped - i as f64;
            match kernel {
                Kernel::Nearest => Taps { idx: [((clamped + 0.5).floor() as usize).min(n_in - 1); 4], w: [1.0, 0.0, 0.0, 0.0] },
                Kernel::Linear => {
                    let i1 = (i + 1).min(n_in - 1);
                    Taps { idx: [i, i1, i1, i1], w: [1.0 - t, t, 0.0, 0.0] }
                }
                Kernel::Cubic => {
                    let xp = x + CUBIC_PAD as f64;
                    let i = xp.floor() as usize;
                    let t = xp - i as f64;
                    let w = [(1.0 - t).powi(3) / 6.0, (4.0 - 6.0 * t * t + 3.0 * t.powi(3)) / 6.0, (1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t.powi(3)) / 6.0, t.powi(3) / 6.0];
                    Taps { idx: std::array::from_fn(|k| (i + k).saturating_sub(1).min(n_in + 2 * CUBIC_PAD - 1)), w }
                }
            }
        })
        .collect()
}

/// The cubic B-spline pole.
const POLE: f32 = -0.267_949_2; // sqrt(3) - 2

/// Turns samples into cubic B-spline coefficients along one axis of a volume viewed as
/// [..][n][inner], in place (Unser's recursive filter, mirror boundary). Whole rows of
/// `inner` elements are filtered at once so the loops stay contiguous.
fn prefilter(v: &mut [f32], n: usize, inner: usize) {
    if n < 2 {
        return;
    }
    let z = POLE;
    let gain = (1.0 - z) * (1.0 - 1.0 / z);
    // Terms of the causal initial sum beyond this are below f32 precision.
    let horizon = (2 * n - 2).min(24);
    let exact = horizon == 2 * n - 2;
    let zn = z.powi(2 * n as i32 - 2);
    let mut init = vec![0.0f32; inner];
    for block in v.chunks_mut(n * inner) {
        debug_assert_eq!(block.len(), n * inner);
        block.iter_mut().for_each(|x| *x *= gain);
        // Causal initial value: sum_k z^k s(mirror k), divided by 1 - z^(2n-2) when exact.
        init.iter_mut().for_each(|x| *x = 0.0);
        let mut zk = 1.0f32;
        for k in 0..horizon {
            let row = &block[mirror(k as isize, n) * inner..][..inner];
            init.iter_mut().zip(row).for_each(|(a, &s)| *a += zk * s);
            zk *= z;
        }
        if exact {
            init.iter_mut().for_each(|a| *a /= 1.0 - zn);
        }
        block[..inner].copy_from_slice(&init);
        for k in 1..n {
            let (done, rest) = block.split_at_mut(k * inner);
            let prev = &done[(k - 1) * inner..];
            rest[..inner].iter_mut().zip(prev).for_each(|(c, &p)| *c += z * p);
        }
        // Anticausal pass.
        let (head, last) = block.split_at_mut((n - 1) * inner);
        let before = &head[(n - 2) * inner..];
        last.iter_mut().zip(before).for_each(|(c, &b)| *c = (z / (z * z - 1.0)) * (*c + z * b));
        for k in (0..n - 1).rev() {
            let (lo, hi) = block.split_at_mut((k + 1) * inner);
            let next = &hi[..inner];
            lo[k * inner..].iter_mut().zip(next).for_each(|(c, &nx)| *c = z * (nx - *c));
        }
    }
}

/// A copy of [..][n][inner] with CUBIC_PAD edge rows added on both ends of the middle axis.
fn padded(src: &[f32], n: usize, inner: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(src.len() / n * (n + 2 * CUBIC_PAD));
    for block in src.chunks(n * inner) {
        let (first, last) = (&block[..inner], &block[(n - 1) * inner..]);
        (0..CUBIC_PAD).for_each(|_| v.extend_from_slice(first));
        v.extend_from_slice(block);
        (0..CUBIC_PAD).for_each(|_| v.extend_from_slice(last));
    }
    v
}

/// Resamples a volume viewed as [outer][n_in][inner] along its middle axis to n_out.
fn resample_axis(src: &[f32], outer: usize, n_in: usize, inner: usize, n_out: usize, kernel: Kernel) -> Vec<f32> {
    let mut coeffs;
    let (c, n_c) = if kernel == Kernel::Cubic {
        coeffs = padded(src, n_in, inner);
        prefilter(&mut coeffs, n_in + 2 * CUBIC_PAD, inner);
        (&coeffs[..], n_in + 2 * CUBIC_PAD)
    } else {
        (src, n_in)
    };
    let taps = taps(n_in, n_out, kernel);
    let mut out = vec![0.0f32; outer * n_out * inner];
    for (ob, ib) in out.chunks_mut(n_out * inner).zip(c.chunks(n_c * inner)) {
        if inner == 1 {
            for (o, t) in ob.iter_mut().zip(&taps) {
                *o = (0..4).map(|k| t.w[k] as f32 * ib[t.idx[k]]).sum();
            }
            continue;
        }
        for (orow, t) in ob.chunks_mut(inner).zip(&taps) {
            for k in 0..4 {
                if t.w[k] != 0.0 {
                    let w = t.w[k] as f32;
                    let irow = &ib[t.idx[k] * inner..][..inner];
                    orow.iter_mut().zip(irow).for_each(|(o, &x)| *o += w * x);
                }
            }
        }
    }
    out
}

/// Resamples an image [z][y][x] of `shape` to `out` with a kernel per axis. Axes whose size
/// does not change are left alone (every kernel is the identity there).
pub fn resample_image(data: &[f32], shape: [usize; 3], out: [usize; 3], kernels: [Kernel; 3]) -> Vec<f32> {
    assert_eq!(data.len(), shape.iter().product::<usize>());
    let mut cur = shape;
    let mut v: Option<Vec<f32>> = None;
    // x first: it is contiguous and usually the largest, so later passes see smaller rows.
    for axis in [2, 1, 0] {
        if cur[axis] == out[axis] {
            continue;
        }
        let outer: usize = cur[..axis].iter().product();
        let inner: usize = cur[axis + 1..].iter().product();
        let src = v.as_deref().unwrap_or(data);
        let next = resample_axis(src, outer, cur[axis], inner, out[axis], kernels[axis]);
        cur[axis] = out[axis];
        v = Some(next);
    }
    match v {
        Some(mut v) => {
            clip_to_input(&mut v, out, data, shape, kernels);
            v
        }
        None => data.to_vec(),
    }
}

/// skimage's clip=True: the output stays within the input's range. With a nearest axis
/// (separate z) nnU-Net resizes each slice on its own, so each output slice stays within
/// the range of the input slice it came from.
fn clip_to_input(v: &mut [f32], out: [usize; 3], data: &[f32], shape: [usize; 3], kernels: [Kernel; 3]) {
    let range = |s: &[f32]| s.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let Some(a) = (0..3).find(|&a| kernels[a] == Kernel::Nearest && kernels.iter().any(|k| *k != Kernel::Nearest)) else {
        let (lo, hi) = range(data);
        v.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
        return;
    };
    let inner_in: usize = shape[a + 1..].iter().product();
    let mut slice_range = vec![(f32::INFINITY, f32::NEG_INFINITY); shape[a]];
    for block in data.chunks(shape[a] * inner_in) {
        for (s, row) in block.chunks(inner_in).enumerate() {
            let (lo, hi) = range(row);
            slice_range[s] = (slice_range[s].0.min(lo), slice_range[s].1.max(hi));
        }
    }
    let src = taps(shape[a], out[a], Kernel::Nearest);
    let inner_out: usize = out[a + 1..].iter().product();
    for block in v.chunks_mut(out[a] * inner_out) {
        for (o, row) in block.chunks_mut(inner_out).enumerate() {
            let (lo, hi) = slice_range[src[o].idx[0]];
            row.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
        }
    }
}

/// Resamples a label map [z][y][x]: per output voxel, the label whose interpolated indicator
/// is largest over the (up to 8) neighbours (weights in f64, as skimage has them); an exact
/// tie goes to the nearest neighbour's label when it is among the tied, else to the smallest
/// tied label (batchgenerators' seg_tiebreak='nearest').
/// `kernels` may only hold Nearest and Linear.
pub fn resample_labels(seg: &[i16], shape: [usize; 3], out: [usize; 3], kernels: [Kernel; 3]) -> Vec<i16> {
    assert_eq!(seg.len(), shape.iter().product::<usize>());
    assert!(kernels.iter().all(|k| *k != Kernel::Cubic), "labels resample with nearest or linear");
    if shape == out {
        return seg.to_vec();
    }
    let t: [Vec<Taps>; 3] = std::array::from_fn(|a| taps(shape[a], out[a], if shape[a] == out[a] { Kernel::Nearest } else { kernels[a] }));
    let (h, w) = (shape[1], shape[2]);
    let mut res = Vec::with_capacity(out.iter().product());
    let mut cand: Vec<(i16, f64)> = Vec::with_capacity(8);
    for tz in &t[0] {
        for ty in &t[1] {
            for tx in &t[2] {
                // Most voxels sit inside one label: skip the vote when every tap agrees.
                let l0 = seg[(tz.idx[0] * h + ty.idx[0]) * w + tx.idx[0]];
                let mut uniform = true;
                'scan: for a in 0..2 {
                    for b in 0..2 {
                        for c in 0..2 {
                            if tz.w[a] * ty.w[b] * tx.w[c] != 0.0 && seg[(tz.idx[a] * h + ty.idx[b]) * w + tx.idx[c]] != l0 {
                                uniform = false;
                                break 'scan;
                            }
                        }
                    }
                }
                if uniform {
                    res.push(l0);
                    continue;
                }
                cand.clear();
                for a in 0..2 {
                    for b in 0..2 {
                        for c in 0..2 {
                            let wgt = tz.w[a] * ty.w[b] * tx.w[c];
                            if wgt == 0.0 {
                                continue;
                            }
                            let l = seg[(tz.idx[a] * h + ty.idx[b]) * w + tx.idx[c]];
                            match cand.iter_mut().find(|(k, _)| *k == l) {
                                Some(e) => e.1 += wgt,
                                None => cand.push((l, wgt)),
                            }
                        }
                    }
                }
                let best = cand.iter().map(|e| e.1).fold(f64::MIN, f64::max);
                let mut tied = cand.iter().filter(|e| e.1 == best).map(|e| e.0);
                let first = tied.next().unwrap_or(0);
                let label = match tied.min() {
                    None => first,
                    Some(other) => {
                        let near = |tp: &Taps| if tp.w[1] >= 0.5 { tp.idx[1] } else { tp.idx[0] };
                        let n = seg[(near(tz) * h + near(ty)) * w + near(tx)];
                        if cand.iter().any(|e| e.0 == n && e.1 == best) { n } else { first.min(other) }
                    }
                };
                res.push(label);
            }
        }
    }
    res
}
