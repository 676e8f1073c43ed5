//! nnU-Net v2's 3d_fullres target spacing and axis order.

/// Percentile of unsorted values (numpy's linear interpolation).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    super::fingerprint::percentile(&v, p)
}

/// Anisotropy threshold of nnU-Net's planner.
pub const ANISOTROPY: f64 = 3.0;

/// Median spacing per axis; but when the coarsest axis is more than 3x coarser than the
/// others and its median size times 3 is below the smallest other median size, that axis
/// takes its 10th-percentile spacing instead (kept above the other axes' spacing).
pub fn target_spacing(spacings: &[[f64; 3]], shapes: &[[usize; 3]]) -> [f64; 3] {
    let axis = |a: usize| spacings.iter().map(|s| s[a]).collect::<Vec<_>>();
    let mut target: [f64; 3] = std::array::from_fn(|a| percentile(&axis(a), 50.0));
    let size: [f64; 3] = std::array::from_fn(|a| percentile(&shapes.iter().map(|s| s[a] as f64).collect::<Vec<_>>(), 50.0));
    let worst = (0..3).max_by(|&a, &b| target[a].total_cmp(&target[b])).unwrap_or(0);
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let max_other_spacing = others.iter().map(|&a| target[a]).fold(f64::MIN, f64::max);
    let min_other_size = others.iter().map(|&a| size[a]).fold(f64::MAX, f64::min);
    if target[worst] > ANISOTROPY * max_other_spacing && size[worst] * ANISOTROPY < min_other_size {
        let mut t = percentile(&axis(worst), 10.0);
        if t < max_other_spacing {
            t = max_other_spacing.max(t) + 1e-5;
        }
        target[worst] = t;
    }
    target
}

/// nnU-Net's transpose_forward: the coarsest axis first, the others in order.
pub fn transpose_forward(spacing: [f64; 3]) -> [usize; 3] {
    let worst = (0..3).max_by(|&a, &b| spacing[a].total_cmp(&spacing[b]).then(b.cmp(&a))).unwrap_or(0);
    let rest: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    [worst, rest[0], rest[1]]
}
