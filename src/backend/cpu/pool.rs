//! Average pooling with the window equal to the stride (PyTorch's AvgPool3d(k, k): floor, no
//! padding), the downsampling in a ResNet-D block's skip (dynamic_network_architectures'
//! BasicBlockD), and its backward.

use super::{axpby, Float};
use crate::backend::pooled_dims as pooled;
use crate::tensor::Dims;
use rayon::prelude::*;

/// y = the mean of each k0 x k1 x k2 window of x, per channel.
pub fn avg_pool<T: Float>(x: &[T], xd: Dims, k: [usize; 3], y: &mut [T]) {
    let yd = pooled(xd, k);
    assert!(x.len() == xd.len() && y.len() == yd.len(), "avg_pool shapes");
    let (c, inv) = (xd.c, T::from_f64(1.0 / (k[0] * k[1] * k[2]) as f64));
    y.par_chunks_mut(c).enumerate().for_each(|(row, out)| {
        let [b, z, yy, xx] = yd.unravel(row);
        out.fill(T::ZERO);
        for dz in 0..k[0] {
            for dy in 0..k[1] {
                for dx in 0..k[2] {
                    let src = xd.ravel(b, z * k[0] + dz, yy * k[1] + dy, xx * k[2] + dx) * c;
                    out.iter_mut().zip(&x[src..src + c]).for_each(|(o, &v)| *o += v);
                }
            }
        }
        out.iter_mut().for_each(|o| *o *= inv);
    });
}

/// dx (+)= the gradient of avg_pool: each input voxel of a window gets dy / (k0 k1 k2); the
/// voxels a floor left out of every window get 0. `beta` 1 adds to dx.
pub fn avg_pool_bwd<T: Float>(dy: &[T], k: [usize; 3], dx: &mut [T], xd: Dims, beta: T) {
    let yd = pooled(xd, k);
    assert!(dx.len() == xd.len() && dy.len() == yd.len(), "avg_pool_bwd shapes");
    let (c, inv) = (xd.c, T::from_f64(1.0 / (k[0] * k[1] * k[2]) as f64));
    dx.par_chunks_mut(c).enumerate().for_each(|(row, d)| {
        let [b, z, y, x] = xd.unravel(row);
        let q = [z / k[0], y / k[1], x / k[2]];
        if q[0] < yd.d && q[1] < yd.h && q[2] < yd.w {
            let src = yd.ravel(b, q[0], q[1], q[2]) * c;
            d.iter_mut().zip(&dy[src..src + c]).for_each(|(d, &g)| axpby(d, beta, g * inv));
        } else {
            d.iter_mut().for_each(|d| axpby(d, beta, T::ZERO));
        }
    });
}
