//! Where each training sample is cut, as nnU-Net's data loader decides it: a case drawn
//! uniformly, the last B - round(0.67 B) samples of a batch centred on a stored voxel of a
//! class present in the case, otherwise a uniform position; boxes of the larger initial
//! patch size that may reach past the volume (padded later: image 0, labels -1).

use super::spatial::{Rotation, SpatialParams};
use crate::store::CaseHeader;
use rand::Rng;

/// nnU-Net's share of foreground-forced samples per batch.
pub const OVERSAMPLE_FOREGROUND: f64 = 0.33;

/// Whether sample `j` of a batch of `b` must contain foreground.
pub fn forced_foreground(j: usize, b: usize) -> bool {
    // Python's round is half to even, as f64::round_ties_even.
    (j as i64) >= (b as f64 * (1.0 - OVERSAMPLE_FOREGROUND)).round_ties_even() as i64
}

/// The patch loaded before rotation and scaling: nnU-Net's get_patch_size, which turns the
/// patch's corner by the largest angle (capped at 90 degrees) about one axis at a time -- in
/// 2d about its one axis -- and zooms by 0.85. In-plane rotation keeps the first axis.
pub fn initial_patch_for(patch: [usize; 3], spatial: &SpatialParams) -> [usize; 3] {
    let t = spatial.max_angle.abs().min(std::f64::consts::FRAC_PI_2);
    let (c, s) = (t.cos(), t.sin());
    let [a, b, d] = patch.map(|v| v as f64);
    // Row vector times each rotation matrix, as batchgenerators' rotate_coords_* do.
    let turned: Vec<[f64; 3]> = match spatial.rotation {
        Rotation::Slice => vec![[a, b * c + d * s, -b * s + d * c]],
        Rotation::Volume | Rotation::InPlane => vec![[a, b * c + d * s, -b * s + d * c], [a * c - d * s, b, a * s + d * c], [a * c + b * s, -a * s + b * c, d]],
    };
    std::array::from_fn(|i| {
        if i == 0 && spatial.rotation != Rotation::Volume {
            return patch[0];
        }
        let m = turned.iter().map(|r| r[i].abs()).fold(patch[i] as f64, f64::max);
        (m / 0.85) as usize
    })
}

/// [`initial_patch_for`] a 3d patch turning by up to 30 degrees about each axis.
pub fn initial_patch(patch: [usize; 3]) -> [usize; 3] {
    initial_patch_for(patch, &SpatialParams::default())
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
