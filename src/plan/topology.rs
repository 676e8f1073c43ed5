//! nnU-Net v2's 3d_fullres network topology from spacing and patch size: which axes pool at
//! each stage, the kernel sizes, and the patch padded to a multiple of the total stride.

use crate::model::topology::{nnunet_features, Topology};

/// Initial patch: 1/spacing scaled to 256^3 voxels, clipped to the median shape.
pub fn initial_patch(spacing: [f64; 3], median_shape: [f64; 3]) -> [usize; 3] {
    let inv = spacing.map(|s| 1.0 / s);
    let scale = (256f64.powi(3) / inv.iter().product::<f64>()).powf(1.0 / 3.0);
    std::array::from_fn(|a| ((inv[a] * scale).round()).min(median_shape[a]).max(1.0) as usize)
}

/// Strides per stage (first [1,1,1]), kernels per stage, and the patch padded to a
/// multiple of 2^pools per axis (nnU-Net's get_pool_and_conv_props, feature maps >= 4).
pub fn pool_and_conv_props(spacing: [f64; 3], patch: [usize; 3]) -> (Vec<[usize; 3]>, Vec<[usize; 3]>, [usize; 3]) {
    let p = super::nnunet::pool_and_conv(&spacing, &patch.map(|v| v as f64));
    let triple = |v: &Vec<usize>| [v[0], v[1], v[2]];
    (p.strides.iter().map(triple).collect(), p.kernels.iter().map(triple).collect(), triple(&p.patch))
}

/// The PlainConvUNet nnU-Net would build for this spacing and patch.
pub fn plain_unet(spacing: [f64; 3], patch: [usize; 3], in_channels: usize, n_classes: usize) -> (Topology, [usize; 3]) {
    let (strides, kernels, padded) = pool_and_conv_props(spacing, patch);
    let mut t = Topology::isotropic(in_channels, n_classes, nnunet_features(strides.len(), 32, 320));
    t.strides = strides;
    t.kernels = kernels;
    (t, padded)
}
