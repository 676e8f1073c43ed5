//! The cascade's extra inputs: the previous stage's labels as one one-hot channel per
//! foreground label after the image channels (nnU-Net's MoveSegAsOneHotToDataTransform), and
//! nnU-Net's two augmentations of them, so the full-resolution net learns not to trust them
//! blindly: a random binary operator per label (ApplyRandomBinaryOperatorTransform) and the
//! removal of a random small connected component per label
//! (RemoveRandomConnectedComponentFromOneHotEncodingTransform).

use crate::morphology::{self, BinaryOp};
use rand::seq::SliceRandom;
use rand::Rng;

/// nnU-Net's cascade augmentation settings (nnUNetTrainer.get_training_transforms).
#[derive(Clone, Copy, Debug)]
pub struct CascadeAugment {
    /// Probability per sample of the binary operators, then per label channel.
    pub p_operator: f64,
    pub p_operator_label: f64,
    /// Ball radius range.
    pub radius: (f64, f64),
    /// Probability per sample of removing components, then per label channel.
    pub p_remove: f64,
    pub p_remove_label: f64,
    /// Components covering this share of the patch or more are never removed.
    pub max_share: f64,
}

impl Default for CascadeAugment {
    fn default() -> Self {
        CascadeAugment { p_operator: 0.4, p_operator_label: 0.5, radius: (1.0, 8.0), p_remove: 0.2, p_remove_label: 0.5, max_share: 0.15 }
    }
}

impl CascadeAugment {
    pub fn none() -> CascadeAugment {
        CascadeAugment { p_operator: 0.0, p_remove: 0.0, ..CascadeAugment::default() }
    }
}

/// The lattice radius of nnU-Net's element for a drawn radius r: skimage's ball(r) samples
/// int(2r + 1) points per axis across [-r, r], which is the ball of radius (int(2r + 1) - 1) / 2
/// on the voxel grid. An even-sized element (half-integer radius) nnU-Net's FFT convolution
/// shifts by half a voxel; segk keeps it centred.
pub fn element_radius(r: f64) -> f64 {
    ((2.0 * r + 1.0).floor() - 1.0) / 2.0
}

/// One channel per foreground label (in `labels` order), 1 where `prev` holds it, into
/// `out[k * n ..]`; padding (-1) and background are 0 in every channel.
pub fn one_hot(prev: &[i16], labels: &[i64], out: &mut [f32]) {
    let n = prev.len();
    for (k, &l) in labels.iter().enumerate() {
        for (o, &p) in out[k * n..(k + 1) * n].iter_mut().zip(prev) {
            *o = f32::from(u8::from(p as i64 == l));
        }
    }
}

/// The label channels in a random order, each kept with probability `p`.
fn chosen(rng: &mut impl Rng, channels: usize, p: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..channels).collect();
    order.shuffle(rng);
    order.into_iter().filter(|_| rng.random::<f64>() < p).collect()
}

/// nnU-Net's two augmentations of the one-hot channels `onehot` ([k][n] of `shape`).
pub fn augment(onehot: &mut [f32], shape: [usize; 3], a: &CascadeAugment, rng: &mut impl Rng) {
    let n: usize = shape.iter().product();
    let k = onehot.len() / n.max(1);
    if a.p_operator > 0.0 && rng.random::<f64>() < a.p_operator {
        for c in chosen(rng, k, a.p_operator_label) {
            let op = [BinaryOp::Dilation, BinaryOp::Erosion, BinaryOp::Closing, BinaryOp::Opening][rng.random_range(0..4)];
            let radius = element_radius(rng.random_range(a.radius.0..a.radius.1));
            let mask: Vec<bool> = onehot[c * n..(c + 1) * n].iter().map(|&v| v != 0.0).collect();
            let result = morphology::apply(op, &mask, shape, radius);
            // What the operator added belongs to this label only.
            for i in (0..n).filter(|&i| result[i] && !mask[i]) {
                (0..k).filter(|&o| o != c).for_each(|o| onehot[o * n + i] = 0.0);
            }
            onehot[c * n..(c + 1) * n].iter_mut().zip(&result).for_each(|(v, &r)| *v = f32::from(u8::from(r)));
        }
    }
    if a.p_remove > 0.0 && rng.random::<f64>() < a.p_remove {
        for c in chosen(rng, k, a.p_remove_label) {
            let ch = &mut onehot[c * n..(c + 1) * n];
            let (comp, sizes) = morphology::components(shape, |i| ch[i] != 0.0);
            let small: Vec<u32> = (1..sizes.len()).filter(|&id| (sizes[id] as f64) < n as f64 * a.max_share).map(|id| id as u32).collect();
            if small.is_empty() {
                continue;
            }
            let gone = small[rng.random_range(0..small.len())];
            ch.iter_mut().zip(&comp).filter(|(_, &id)| id == gone).for_each(|(v, _)| *v = 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Spans as skimage's ball(r) has them: int(2r + 1) voxels per axis.
    #[test]
    fn elements_span_what_skimages_ball_spans() {
        for (r, radius) in [(1.0, 1.0), (1.45, 1.0), (1.6, 1.5), (2.5, 2.5), (3.7, 3.5), (7.9, 7.5)] {
            assert_eq!(element_radius(r), radius, "r {r}");
        }
    }

    #[test]
    fn one_hot_channels_are_the_previous_stages_labels() {
        let prev = [0i16, 1, 2, -1, 2, 3];
        let mut out = vec![9.0f32; 3 * prev.len()];
        one_hot(&prev, &[1, 2, 3], &mut out);
        assert_eq!(out, [0., 1., 0., 0., 0., 0., 0., 0., 1., 0., 1., 0., 0., 0., 0., 0., 0., 1.]);
    }

    /// Channels stay one-hot (at most one label per voxel); removal takes one small component
    /// and never one covering 15 % of the patch; with both off nothing changes.
    #[test]
    fn augmented_channels_stay_one_hot_and_lose_only_small_components() {
        let shape = [12, 16, 16];
        let n: usize = shape.iter().product();
        let mut prev = vec![0i16; n];
        for (i, p) in prev.iter_mut().enumerate() {
            let (z, y, x) = (i / 256, (i / 16) % 16, i % 16);
            if (2..10).contains(&z) && (2..14).contains(&y) && (2..10).contains(&x) {
                *p = 1; // big: 768 voxels, over 15 % of 3072
            } else if z == 1 && y < 2 && x > 12 {
                *p = 2; // small
            }
        }
        let mut base = vec![0.0f32; 2 * n];
        one_hot(&prev, &[1, 2], &mut base);
        let mut rng = rand_pcg::Pcg64::seed_from_u64(3);
        let mut same = base.clone();
        augment(&mut same, shape, &CascadeAugment::none(), &mut rng);
        assert_eq!(same, base);
        let always = CascadeAugment { p_operator: 1.0, p_operator_label: 1.0, p_remove: 0.0, ..CascadeAugment::default() };
        let mut changed = 0;
        for _ in 0..20 {
            let mut x = base.clone();
            augment(&mut x, shape, &always, &mut rng);
            assert!((0..n).all(|i| x[i] + x[n + i] <= 1.0), "one label per voxel");
            changed += usize::from(x != base);
        }
        assert!(changed >= 15, "operators change the channels ({changed} of 20)");
        let remove = CascadeAugment { p_operator: 0.0, p_remove: 1.0, p_remove_label: 1.0, ..CascadeAugment::default() };
        let mut x = base.clone();
        augment(&mut x, shape, &remove, &mut rng);
        assert_eq!(x[..n], base[..n], "the big component stays");
        assert!(x[n..].iter().all(|&v| v == 0.0), "the small one goes");
    }
}
