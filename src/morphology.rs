//! Binary morphology on label volumes: 26-connected components (skimage's full connectivity,
//! which nnU-Net's postprocessing and cascade augmentation use), and dilation, erosion, opening
//! and closing by a ball of any radius through the exact squared Euclidean distance transform
//! (Felzenszwalb and Huttenlocher's lower envelope of parabolas), so a radius-8 ball costs what a
//! radius-1 ball costs: three linear passes.

/// The 26-connected components of the voxels where `inside` holds: an id per voxel (0 outside)
/// and each id's size (`sizes[0]` unused).
pub fn components(shape: [usize; 3], inside: impl Fn(usize) -> bool) -> (Vec<u32>, Vec<usize>) {
    let [nz, ny, nx] = shape;
    let mut comp = vec![0u32; nz * ny * nx];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for start in 0..comp.len() {
        if comp[start] != 0 || !inside(start) {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        comp[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[id as usize] += 1;
            let (z, y, x) = (i / (ny * nx), (i / nx) % ny, i % nx);
            for zz in z.saturating_sub(1)..(z + 2).min(nz) {
                for yy in y.saturating_sub(1)..(y + 2).min(ny) {
                    for xx in x.saturating_sub(1)..(x + 2).min(nx) {
                        let j = (zz * ny + yy) * nx + xx;
                        if comp[j] == 0 && inside(j) {
                            comp[j] = id;
                            stack.push(j);
                        }
                    }
                }
            }
        }
    }
    (comp, sizes)
}

/// One axis of the squared distance transform: f[i] becomes min_j f[j] + (i - j)^2 over the
/// line (infinite f: no source there).
fn edt_line(f: &mut [f64], v: &mut Vec<usize>, z: &mut Vec<f64>, out: &mut Vec<f64>) {
    let n = f.len();
    v.clear();
    z.clear();
    out.clear();
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        while let Some(&p) = v.last() {
            // Where the parabola from q overtakes the last one kept.
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64));
            if s <= *z.last().unwrap_or(&f64::NEG_INFINITY) {
                v.pop();
                z.pop();
            } else {
                z.push(s);
                v.push(q);
                break;
            }
        }
        if v.is_empty() {
            v.push(q);
            z.push(f64::NEG_INFINITY);
        }
    }
    if v.is_empty() {
        return;
    }
    let mut k = 0;
    for q in 0..n {
        while k + 1 < v.len() && z[k + 1] < q as f64 {
            k += 1;
        }
        let d = q as f64 - v[k] as f64;
        out.push(f[v[k]] + d * d);
    }
    f.copy_from_slice(out);
}

/// Squared Euclidean distance of every voxel to the nearest voxel where `source` holds
/// (infinite when there is none).
pub fn squared_distance(shape: [usize; 3], source: impl Fn(usize) -> bool) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut d: Vec<f64> = (0..n).map(|i| if source(i) { 0.0 } else { f64::INFINITY }).collect();
    let (mut v, mut z, mut out, mut line) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for axis in 0..3 {
        let stride: usize = shape[axis + 1..].iter().product();
        let len = shape[axis];
        for start in (0..n).filter(|&i| (i / stride).is_multiple_of(len)) {
            line.clear();
            line.extend((0..len).map(|k| d[start + k * stride]));
            edt_line(&mut line, &mut v, &mut z, &mut out);
            for (k, &x) in line.iter().enumerate() {
                d[start + k * stride] = x;
            }
        }
    }
    d
}

/// nnU-Net's four binary operators of its cascade augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Dilation,
    Erosion,
    Closing,
    Opening,
}

/// Dilation by the ball of `radius` (integer offsets within it): every voxel within the radius
/// of the mask. Outside the volume counts as background, as a zero-padded convolution has it.
pub fn dilate(mask: &[bool], shape: [usize; 3], radius: f64) -> Vec<bool> {
    let r2 = radius * radius;
    squared_distance(shape, |i| mask[i]).into_iter().map(|d| d <= r2).collect()
}

/// Erosion: the complement of the dilated complement (outside the volume counts as mask).
pub fn erode(mask: &[bool], shape: [usize; 3], radius: f64) -> Vec<bool> {
    let r2 = radius * radius;
    squared_distance(shape, |i| !mask[i]).into_iter().map(|d| d > r2).collect()
}

pub fn apply(op: BinaryOp, mask: &[bool], shape: [usize; 3], radius: f64) -> Vec<bool> {
    match op {
        BinaryOp::Dilation => dilate(mask, shape, radius),
        BinaryOp::Erosion => erode(mask, shape, radius),
        BinaryOp::Closing => erode(&dilate(mask, shape, radius), shape, radius),
        BinaryOp::Opening => dilate(&erode(mask, shape, radius), shape, radius),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definitions, voxel by voxel: min over sources of the squared distance; the ball.
    #[test]
    fn distance_and_ball_operators_match_their_definitions() {
        let mut rng = rand_pcg::Pcg64::seed_from_u64(7);
        let shape = [7, 9, 11];
        let n: usize = shape.iter().product();
        let at = |i: usize| [i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]];
        for density in [0.0, 0.02, 0.3, 0.9] {
            let mask: Vec<bool> = (0..n).map(|_| rng.random::<f64>() < density).collect();
            let d = squared_distance(shape, |i| mask[i]);
            for i in 0..n {
                let want = (0..n).filter(|&j| mask[j]).map(|j| (0..3).map(|a| (at(i)[a] as f64 - at(j)[a] as f64).powi(2)).sum::<f64>()).fold(f64::INFINITY, f64::min);
                assert_eq!(d[i], want, "voxel {i} at density {density}");
            }
            for r in [1.0, 1.5, 2.0, 3.7] {
                let dil = dilate(&mask, shape, r);
                let ero = erode(&mask, shape, r);
                for i in 0..n {
                    let near = |j: usize| (0..3).map(|a| (at(i)[a] as f64 - at(j)[a] as f64).powi(2)).sum::<f64>() <= r * r;
                    assert_eq!(dil[i], (0..n).any(|j| mask[j] && near(j)), "dilation r {r} voxel {i}");
                    assert_eq!(ero[i], (0..n).all(|j| mask[j] || !near(j)), "erosion r {r} voxel {i}");
                }
                let (open, close) = (apply(BinaryOp::Opening, &mask, shape, r), apply(BinaryOp::Closing, &mask, shape, r));
                assert!((0..n).all(|i| (!open[i] || mask[i]) && (!mask[i] || close[i])), "opening shrinks, closing grows");
            }
        }
    }

    #[test]
    fn components_are_26_connected() {
        let shape = [3, 4, 4];
        let mut mask = [false; 48];
        // Two voxels touching at a corner are one component; a third apart is another.
        mask[0] = true;
        mask[16 + 4 + 1] = true;
        mask[47] = true;
        let (comp, sizes) = components(shape, |i| mask[i]);
        assert_eq!(sizes[1..], [2, 1]);
        assert_eq!(comp[0], comp[21]);
        assert_ne!(comp[0], comp[47]);
        assert_eq!(comp[5], 0);
    }
}
