//! Where each training sample is cut, as nnU-Net's data loader decides it: a case drawn
//! uniformly, the last B - round(0.67 B) samples of a batch centred on a stored voxel of a
//! class present in the case, otherwise a uniform position; boxes of the larger initial
//! patch size that may reach past the volume (padded later: image 0, labels -1).

use crate::store::CaseHeader;
use rand::Rng;

/// nnU-Net's share of foreground-forced samples per batch.
pub const OVERSAMPLE_FOREGROUND: f64 = 0.33;

/// Whether sample `j` of a batch of `b` must contain foreground.
pub fn forced_foreground(j: usize, b: usize) -> bool {
    // Python's round is half to even, as f64::round_ties_even.
    (j as i64) >= (b as f64 * (1.0 - OVERSAMPLE_FOREGROUND)).round_ties_even() as i64
}

/// The patch loaded before rotation and scaling (nnU-Net's get_patch_size with rotations
/// of up to 30 degrees about each axis, one axis at a time, and a 0.85 zoom).
pub fn initial_patch(patch: [usize; 3]) -> [usize; 3] {
    let t = std::f64::consts::PI / 6.0;
    let (c, s) = (t.cos(), t.sin());
    let [a, b, d] = patch.map(|v| v as f64);
    let rx = [a, b * c + d * s, -b * s + d * c];
    let ry = [a * c - d * s, b, a * s + d * c];
    let rz = [a * c + b * s, -a * s + b * c, d];
    std::array::from_fn(|i| {
        let m = [patch[i] as f64, rx[i].abs(), ry[i].abs(), rz[i].abs()].into_iter().fold(0.0, f64::max);
        (m / 0.85) as usize
    })
}

/// nnU-Net's get_bbox for a case of stored `shape`, a box of `size` (the initial patch)
/// and the net's `patch`. `class_voxel` is a stored foreground voxel to centre on (forced
/// samples), else the box is uniform over the allowed range.
pub fn pick_box(rng: &mut impl Rng, shape: [usize; 3], size: [usize; 3], patch: [usize; 3], class_voxel: Option<[u32; 3]>) -> [i64; 3] {
    std::array::from_fn(|d| {
        let (s, n, p) = (size[d] as i64, shape[d] as i64, patch[d] as i64);
        // Padding allowed: the extra of the initial patch, or up to it for small volumes;
        // the margin is ceil(pad/2) on both sides, as nnU-Net has it.
        let need = if n >= p { s - p } else { s - n };
        let half_up = (need + 1) / 2;
        let (lb, ub) = (-half_up, n + half_up - s);
        match class_voxel {
            // Only a lower clamp, as nnU-Net: the box may run past the padded volume.
            Some(v) => lb.max(v[d] as i64 - s / 2),
            None => rng.random_range(lb..=ub.max(lb)),
        }
    })
}

/// The class a forced sample centres on: uniform over the classes with stored voxels, the
/// "any annotated voxel" class (ignore-label datasets) only when it is the only one.
pub fn pick_class(rng: &mut impl Rng, h: &CaseHeader, annotated: Option<usize>) -> Option<usize> {
    let mut eligible: Vec<usize> = (0..h.classes.len()).filter(|&k| h.classes[k].count > 0).collect();
    if eligible.len() > 1 {
        eligible.retain(|&k| Some(k) != annotated);
    }
    (!eligible.is_empty()).then(|| eligible[rng.random_range(0..eligible.len())])
}
