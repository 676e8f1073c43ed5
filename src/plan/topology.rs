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
    const MIN_FMAP: f64 = 4.0;
    let mut sp = spacing;
    let mut size = patch.map(|v| v as f64);
    let mut strides = vec![[1, 1, 1]];
    let mut kernels = Vec::new();
    let mut pools = [0u32; 3];
    let mut kernel = [1usize; 3];
    loop {
        let mut valid: Vec<usize> = (0..3).filter(|&a| size[a] >= 2.0 * MIN_FMAP).collect();
        if valid.is_empty() {
            break;
        }
        let min_valid = valid.iter().map(|&a| sp[a]).fold(f64::MAX, f64::min);
        valid.retain(|&a| sp[a] / min_valid < 2.0);
        if valid.len() == 1 && size[valid[0]] < 3.0 * MIN_FMAP {
            break;
        }
        if valid.is_empty() {
            break;
        }
        let min_all = sp.iter().copied().fold(f64::MAX, f64::min);
        for a in 0..3 {
            if kernel[a] != 3 && sp[a] / min_all < 2.0 {
                kernel[a] = 3;
            }
        }
        let mut stride = [1; 3];
        for &a in &valid {
            stride[a] = 2;
            pools[a] += 1;
            sp[a] *= 2.0;
            size[a] = (size[a] / 2.0).ceil();
        }
        strides.push(stride);
        kernels.push(kernel);
    }
    kernels.push([3, 3, 3]);
    let padded = std::array::from_fn(|a| patch[a].div_ceil(1 << pools[a]) * (1 << pools[a]));
    (strides, kernels, padded)
}

/// The PlainConvUNet nnU-Net would build for this spacing and patch.
pub fn plain_unet(spacing: [f64; 3], patch: [usize; 3], in_channels: usize, n_classes: usize) -> (Topology, [usize; 3]) {
    let (strides, kernels, padded) = pool_and_conv_props(spacing, patch);
    let mut t = Topology::isotropic(in_channels, n_classes, nnunet_features(strides.len(), 32, 320));
    t.strides = strides;
    t.kernels = kernels;
    (t, padded)
}
