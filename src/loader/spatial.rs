//! Rotation and scaling in one resampling pass, straight from the memory-mapped store: output
//! voxel o reads stored position lo + A (o - (P-1)/2) + (S-1)/2, where A = Rz Ry Rx diag(s)
//! and S is the loaded (larger) box; outside the box or the volume the image is 0 and the
//! label -1 (nnU-Net's crop-and-pad then grid_sample, without the crop copy). Images are
//! trilinear, labels per-label trilinear (scores quantised as nnU-Net's float16 x1000, ties to
//! the nearest label when it is among the tied, else the lowest).

use half::f16;
use rand::Rng;

pub type Mat3 = [[f64; 3]; 3];

/// Which way a configuration's patches turn (nnU-Net's
/// configure_rotation_dummyDA_mirroring_and_inital_patch_size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// A 3d patch: about each of the three axes.
    Volume,
    /// nnU-Net's "dummy 2D" augmentation of an anisotropic 3d patch (largest side over 3x its
    /// first): turned and scaled in the plane of axes 1 and 2 only, every slice alike.
    InPlane,
    /// A 2d configuration's patch (one slice deep): turned and scaled in its plane.
    Slice,
}

/// nnU-Net's spatial parameters: rotation with p 0.2 (each turning axis U(-max, max)) and,
/// independently, scaling with p 0.2 (one factor U(0.7, 1.4) for all turning axes).
#[derive(Clone, Copy, Debug)]
pub struct SpatialParams {
    pub p_rotation: f64,
    pub max_angle: f64,
    pub p_scaling: f64,
    pub scaling: (f64, f64),
    pub rotation: Rotation,
}

impl Default for SpatialParams {
    /// A 3d patch: up to 30 degrees about each axis.
    fn default() -> Self {
        SpatialParams { p_rotation: 0.2, max_angle: std::f64::consts::PI / 6.0, p_scaling: 0.2, scaling: (0.7, 1.4), rotation: Rotation::Volume }
    }
}

/// nnU-Net's ANISO_THRESHOLD: a 3d patch whose largest side exceeds this many times its first
/// is augmented in-plane.
pub const ANISO_THRESHOLD: f64 = 3.0;

impl SpatialParams {
    /// nnU-Net's rotation for a patch: a 2d configuration's (`slices`) turns by up to 180
    /// degrees, or 15 when one side is over 1.5x the other; an anisotropic 3d patch by up to
    /// 180 degrees in-plane; other 3d patches by up to 30 degrees about each axis.
    pub fn for_patch(patch: [usize; 3], slices: bool) -> SpatialParams {
        let deg = std::f64::consts::PI / 180.0;
        let (rotation, max_angle) = if slices {
            let (lo, hi) = (patch[1].min(patch[2]) as f64, patch[1].max(patch[2]) as f64);
            (Rotation::Slice, if hi / lo > 1.5 { 15.0 * deg } else { 180.0 * deg })
        } else if *patch.iter().max().unwrap_or(&1) as f64 / patch[0] as f64 > ANISO_THRESHOLD {
            (Rotation::InPlane, 180.0 * deg)
        } else {
            (Rotation::Volume, 30.0 * deg)
        };
        SpatialParams { rotation, max_angle, ..SpatialParams::default() }
    }
}

fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

/// A = Rz(a2) Ry(a1) Rx(a0) diag(s); Rx turns the (axis 1, axis 2) plane, Ry (0, 2), Rz (0, 1).
pub fn affine(angles: [f64; 3], scales: [f64; 3]) -> Mat3 {
    let (c0, s0, c1, s1, c2, s2) = (angles[0].cos(), angles[0].sin(), angles[1].cos(), angles[1].sin(), angles[2].cos(), angles[2].sin());
    let rx = [[1.0, 0.0, 0.0], [0.0, c0, -s0], [0.0, s0, c0]];
    let ry = [[c1, 0.0, s1], [0.0, 1.0, 0.0], [-s1, 0.0, c1]];
    let rz = [[c2, -s2, 0.0], [s2, c2, 0.0], [0.0, 0.0, 1.0]];
    let d = [[scales[0], 0.0, 0.0], [0.0, scales[1], 0.0], [0.0, 0.0, scales[2]]];
    mul(&mul(&mul(&rz, &ry), &rx), &d)
}

/// The matrix of one sample, or None for the plain centre crop (no rotation, no scaling).
pub fn draw(rng: &mut impl Rng, p: &SpatialParams) -> Option<Mat3> {
    let rotate = rng.random::<f64>() < p.p_rotation;
    let scale = rng.random::<f64>() < p.p_scaling;
    if !rotate && !scale {
        return None;
    }
    let mut angles = if rotate { [0; 3].map(|_| rng.random_range(-p.max_angle..=p.max_angle)) } else { [0.0; 3] };
    let s = if scale { rng.random_range(p.scaling.0..=p.scaling.1) } else { 1.0 };
    if p.rotation == Rotation::Volume {
        return Some(affine(angles, [s; 3]));
    }
    // In-plane: Rx alone turns the (1, 2) plane; the first axis keeps its scale.
    angles[1] = 0.0;
    angles[2] = 0.0;
    Some(affine(angles, [1.0, s, s]))
}

/// Stored image voxels, channels interleaved.
pub trait ImageSource: Sync {
    fn voxels(&self) -> usize;
    fn at(&self, i: usize) -> f32;
    /// # Safety
    /// `i` is below the source's length.
    unsafe fn at_unchecked(&self, i: usize) -> f32;
}
impl ImageSource for [f32] {
    fn voxels(&self) -> usize {
        self.len()
    }
    fn at(&self, i: usize) -> f32 {
        self[i]
    }
    unsafe fn at_unchecked(&self, i: usize) -> f32 {
        debug_assert!(i < self.len());
        unsafe { *self.get_unchecked(i) }
    }
}
impl ImageSource for [f16] {
    fn voxels(&self) -> usize {
        self.len()
    }
    fn at(&self, i: usize) -> f32 {
        self[i].to_f32()
    }
    unsafe fn at_unchecked(&self, i: usize) -> f32 {
        debug_assert!(i < self.len());
        unsafe { self.get_unchecked(i).to_f32() }
    }
}

/// Stored labels (-1 outside the nonzero mask).
pub trait LabelSource: Sync {
    fn voxels(&self) -> usize;
    fn label(&self, i: usize) -> i16;
    /// # Safety
    /// `i` is below the source's length.
    unsafe fn label_unchecked(&self, i: usize) -> i16;
}
impl LabelSource for [u8] {
    fn voxels(&self) -> usize {
        self.len()
    }
    fn label(&self, i: usize) -> i16 {
        crate::store::label_from_u8(self[i])
    }
    unsafe fn label_unchecked(&self, i: usize) -> i16 {
        debug_assert!(i < self.len());
        crate::store::label_from_u8(unsafe { *self.get_unchecked(i) })
    }
}
impl LabelSource for [i16] {
    fn voxels(&self) -> usize {
        self.len()
    }
    fn label(&self, i: usize) -> i16 {
        self[i]
    }
    unsafe fn label_unchecked(&self, i: usize) -> i16 {
        debug_assert!(i < self.len());
        unsafe { *self.get_unchecked(i) }
    }
}

/// Where a sample reads from: the stored volume and the loaded box within it.
pub struct Source<'a, I: ImageSource + ?Sized, L: LabelSource + ?Sized> {
    pub image: &'a I,
    pub labels: &'a L,
    pub channels: usize,
    pub shape: [usize; 3],
    /// The loaded box: lower corner (may be negative) and size S.
    pub lo: [i64; 3],
    pub size: [usize; 3],
}

impl<I: ImageSource + ?Sized, L: LabelSource + ?Sized> Source<'_, I, L> {
    /// The arrays hold the whole volume: the fast warp reads without bounds checks.
    fn check(&self) {
        let v = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let ok = v.and_then(|v| Some((v, v.checked_mul(self.channels)?))).is_some_and(|(v, vc)| self.image.voxels() >= vc && self.labels.voxels() >= v);
        assert!(ok, "source arrays shorter than the volume {:?} x {} channels", self.shape, self.channels);
    }

    /// Flat voxel index of stored position `p` if it lies in the box and in the volume.
    #[inline]
    fn index(&self, p: [i64; 3]) -> Option<usize> {
        for d in 0..3 {
            if p[d] < self.lo[d].max(0) || p[d] >= (self.lo[d] + self.size[d] as i64).min(self.shape[d] as i64) {
                return None;
            }
        }
        Some((p[0] as usize * self.shape[1] + p[1] as usize) * self.shape[2] + p[2] as usize)
    }
}

/// Cuts the patch of `patch` voxels into `image` ([C][P], channel-first) and `labels`.
pub fn sample<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, matrix: Option<&Mat3>, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
    let n: usize = patch.iter().product();
    assert!(image.len() == n * src.channels && labels.len() == n, "patch buffers");
    src.check();
    if let Some(a) = matrix {
        // Positions must stay far inside i64 (the fast path's bounds proof relies on it).
        assert!(a.iter().flatten().all(|v| v.is_finite() && v.abs() < 1e6), "warp matrix {a:?}");
    }
    match matrix {
        None => crop(src, patch, image, labels),
        Some(a) => warp_dispatch(src, a, patch, image, labels),
    }
}

/// The plain path: the patch at floor(S/2) - P/2 in the box, no interpolation; row by row,
/// the readable run of each row copied, the rest padded.
fn crop<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
    let n: usize = patch.iter().product();
    let ch = src.channels;
    let start: [i64; 3] = std::array::from_fn(|d| src.lo[d] + (src.size[d] / 2) as i64 - (patch[d] / 2) as i64);
    let lo: [i64; 3] = std::array::from_fn(|d| src.lo[d].max(0));
    let hi: [i64; 3] = std::array::from_fn(|d| (src.lo[d] + src.size[d] as i64).min(src.shape[d] as i64));
    // The run of x inside [lo, hi): patch columns x0..x1.
    let x0 = (lo[2] - start[2]).clamp(0, patch[2] as i64) as usize;
    let x1 = (hi[2] - start[2]).clamp(x0 as i64, patch[2] as i64) as usize;
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            let o = (z * patch[1] + y) * patch[2];
            let (pz, py) = (start[0] + z as i64, start[1] + y as i64);
            let row_ok = pz >= lo[0] && pz < hi[0] && py >= lo[1] && py < hi[1];
            let (a, b) = if row_ok { (x0, x1) } else { (0, 0) };
            for c in 0..ch {
                let out = &mut image[c * n + o..c * n + o + patch[2]];
                out[..a].iter_mut().for_each(|v| *v = 0.0);
                out[b.max(a)..].iter_mut().for_each(|v| *v = 0.0);
            }
            labels[o..o + a].iter_mut().for_each(|l| *l = -1);
            labels[o + b.max(a)..o + patch[2]].iter_mut().for_each(|l| *l = -1);
            if a < b {
                let base = (pz as usize * src.shape[1] + py as usize) * src.shape[2] + (start[2] + a as i64) as usize;
                for x in a..b {
                    let i = base + (x - a);
                    for c in 0..ch {
                        image[c * n + o + x] = src.image.at(i * ch + c);
                    }
                    labels[o + x] = src.labels.label(i);
                }
            }
        }
    }
}

/// Stored position of output column x of a row starting at q0 and advancing by d.
#[inline]
fn along(q0: [f64; 3], d: [f64; 3], x: usize) -> [f64; 3] {
    std::array::from_fn(|k| q0[k] + x as f64 * d[k])
}

/// floor without the libm call (the default x86-64 target has no SSE4.1 round).
#[inline]
fn floor_i64(v: f64) -> i64 {
    let t = v as i64;
    t - i64::from((t as f64) > v)
}

/// Geometry shared by both warp paths: output centre, loaded-box centre, readable bounds.
struct Frame {
    cin: [f64; 3],
    cout: [f64; 3],
    lo: [i64; 3],
    hi: [i64; 3],
}

impl Frame {
    fn new<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, patch: [usize; 3]) -> Frame {
        Frame {
            cin: std::array::from_fn(|d| (src.size[d] as f64 - 1.0) / 2.0 + src.lo[d] as f64),
            cout: patch.map(|p| (p as f64 - 1.0) / 2.0),
            lo: std::array::from_fn(|d| src.lo[d].max(0)),
            hi: std::array::from_fn(|d| (src.lo[d] + src.size[d] as i64).min(src.shape[d] as i64)),
        }
    }

    /// Stored position of output row (z, y) at x = 0; the row advances by column 2 of `a`.
    fn row_start(&self, a: &Mat3, z: usize, y: usize) -> [f64; 3] {
        let rel = [z as f64 - self.cout[0], y as f64 - self.cout[1], -self.cout[2]];
        std::array::from_fn(|i| a[i][0] * rel[0] + a[i][1] * rel[1] + a[i][2] * rel[2] + self.cin[i])
    }

    /// All eight corners of position q readable.
    fn inside(&self, q: [f64; 3]) -> bool {
        (0..3).all(|d| {
            let i = floor_i64(q[d]);
            // `i < hi - 1`, not `i + 1 < hi`: floor saturates at i64::MAX, which must not wrap.
            i >= self.lo[d] && i < self.hi[d] - 1
        })
    }

    /// The run of x in [0, len) whose positions q0 + x d have every corner readable. q's
    /// coordinates are monotone in x (one product, one sum, both rounded monotonically), so
    /// the run is one interval: bound it analytically, then trim with the exact test.
    fn interior_run(&self, q0: [f64; 3], d: [f64; 3], len: usize) -> (usize, usize) {
        let (mut xa, mut xb) = (0f64, len as f64);
        for k in 0..3 {
            // lo <= q0 + x d < hi - 1
            let (a, b) = (self.lo[k] as f64 - q0[k], (self.hi[k] - 1) as f64 - q0[k]);
            if d[k] == 0.0 {
                if a > 0.0 || b <= 0.0 {
                    return (0, 0);
                }
            } else {
                let (u, v) = if d[k] > 0.0 { (a / d[k], b / d[k]) } else { (b / d[k], a / d[k]) };
                xa = xa.max(u.floor() - 1.0);
                xb = xb.min(v.ceil() + 1.0);
            }
        }
        let mut xa = xa.clamp(0.0, len as f64) as usize;
        let mut xb = (xb.clamp(0.0, len as f64) as usize).max(xa);
        while xa < xb && !self.inside(along(q0, d, xa)) {
            xa += 1;
        }
        while xb > xa && !self.inside(along(q0, d, xb - 1)) {
            xb -= 1;
        }
        (xa, xb)
    }
}

/// The warp compiled for AVX2 where the CPU has it (gathers and 8-wide lerps; no FMA, so the
/// results are the same bits on every machine), else for the portable baseline.
fn warp_dispatch<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, a: &Mat3, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn warp_avx2<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, a: &Mat3, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
            warp(src, a, patch, image, labels)
        }
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { warp_avx2(src, a, patch, image, labels) };
    }
    warp(src, a, patch, image, labels)
}

/// The fast path: per output row, the interior run (every corner readable) takes fixed
/// corner offsets, truncation as floor (positions there are >= 0) and unchecked reads; the
/// rest of the row, and label boundaries, go through `warp_voxel`.
#[inline(always)]
fn warp<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, a: &Mat3, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
    let n: usize = patch.iter().product();
    let f = Frame::new(src, patch);
    let d = [a[0][2], a[1][2], a[2][2]];
    let (plane, row) = (src.shape[1] * src.shape[2], src.shape[2]);
    let corner_off: [usize; 8] = std::array::from_fn(|k| ((k >> 2) & 1) * plane + ((k >> 1) & 1) * row + (k & 1));
    let ch = src.channels;
    let mut cand: Vec<(i16, f32)> = Vec::with_capacity(8);
    let lerp = |a: f32, b: f32, t: f32| a + t * (b - a);
    let (mut base, mut t0, mut t1, mut t2) = (vec![0usize; patch[2]], vec![0f32; patch[2]], vec![0f32; patch[2]], vec![0f32; patch[2]]);
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            let q0 = f.row_start(a, z, y);
            let o0 = (z * patch[1] + y) * patch[2];
            let (xa, xb) = f.interior_run(q0, d, patch[2]);
            let at = |x: usize| along(q0, d, x);
            for x in (0..xa).chain(xb..patch[2]) {
                warp_voxel(src, at(x), o0 + x, n, image, labels, &mut cand);
            }
            // Pass 1: corner index and fractions of each voxel of the run (truncation is floor
            // there: positions are >= lo >= 0). Passes 2 and 3 read them per channel and for labels.
            let run = xb - xa;
            for j in 0..run {
                let q = at(xa + j);
                let i0 = q.map(|v| v as usize);
                base[j] = (i0[0] * src.shape[1] + i0[1]) * src.shape[2] + i0[2];
                t0[j] = (q[0] - i0[0] as f64) as f32;
                t1[j] = (q[1] - i0[1] as f64) as f32;
                t2[j] = (q[2] - i0[2] as f64) as f32;
            }
            // SAFETY (both passes): every voxel of the run has lo <= i0 and i0 + 1 < hi <= shape
            // on every axis, so base + corner_off[7] indexes the volume, whose arrays hold shape
            // voxels (times ch for the image), as Source::check asserted.
            for c in 0..ch {
                let out = &mut image[c * n + o0 + xa..c * n + o0 + xb];
                for j in 0..run {
                    let v: [f32; 8] = std::array::from_fn(|k| unsafe { src.image.at_unchecked((base[j] + corner_off[k]) * ch + c) });
                    let (c00, c01) = (lerp(v[0], v[1], t2[j]), lerp(v[2], v[3], t2[j]));
                    let (c10, c11) = (lerp(v[4], v[5], t2[j]), lerp(v[6], v[7], t2[j]));
                    out[j] = lerp(lerp(c00, c01, t1[j]), lerp(c10, c11, t1[j]), t0[j]);
                }
            }
            for j in 0..run {
                let l: [i16; 8] = std::array::from_fn(|k| unsafe { src.labels.label_unchecked(base[j] + corner_off[k]) });
                labels[o0 + xa + j] = if l.iter().all(|&v| v == l[0]) { l[0] } else { vote_corners(src, at(xa + j), [t0[j], t1[j], t2[j]], |k| l[k], &mut cand) };
            }
        }
    }
}

/// The definition, one voxel at a time with every corner checked: the reference the fast
/// path is tested against, and the path for rows' edges.
#[doc(hidden)]
pub fn warp_reference<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, a: &Mat3, patch: [usize; 3], image: &mut [f32], labels: &mut [i16]) {
    let n: usize = patch.iter().product();
    assert!(image.len() == n * src.channels && labels.len() == n, "patch buffers");
    src.check();
    let f = Frame::new(src, patch);
    let mut cand = Vec::with_capacity(8);
    for z in 0..patch[0] {
        for y in 0..patch[1] {
            let q0 = f.row_start(a, z, y);
            for x in 0..patch[2] {
                let q = along(q0, [a[0][2], a[1][2], a[2][2]], x);
                warp_voxel(src, q, (z * patch[1] + y) * patch[2] + x, n, image, labels, &mut cand);
            }
        }
    }
}

/// Trilinear weights of the eight corners, corner k = (bit 2: axis 0, bit 1: axis 1, bit 0: axis 2).
fn corner_weights(t: [f32; 3]) -> [f32; 8] {
    std::array::from_fn(|k| {
        let f = |d: usize, bit: usize| if bit == 1 { t[d] } else { 1.0 - t[d] };
        f(0, (k >> 2) & 1) * f(1, (k >> 1) & 1) * f(2, k & 1)
    })
}

fn warp_voxel<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, q: [f64; 3], o: usize, n: usize, image: &mut [f32], labels: &mut [i16], cand: &mut Vec<(i16, f32)>) {
    let i0 = q.map(floor_i64);
    let ch = src.channels;
    (0..ch).for_each(|c| image[c * n + o] = 0.0);
    if (0..3).any(|d| i0[d] < src.lo[d].max(0) - 1 || i0[d] >= (src.lo[d] + src.size[d] as i64).min(src.shape[d] as i64)) {
        // No corner readable: every vote is "outside".
        labels[o] = -1;
        return;
    }
    let t: [f32; 3] = std::array::from_fn(|d| (q[d] - i0[d] as f64) as f32);
    let w = corner_weights(t);
    let corner = |k: usize| [i0[0] + ((k >> 2) & 1) as i64, i0[1] + ((k >> 1) & 1) as i64, i0[2] + (k & 1) as i64];
    let mut l = [-1i16; 8];
    for k in 0..8 {
        if let Some(i) = src.index(corner(k)) {
            for c in 0..ch {
                image[c * n + o] += w[k] * src.image.at(i * ch + c);
            }
            l[k] = src.labels.label(i);
        }
    }
    labels[o] = vote_corners(src, q, t, |k| l[k], cand);
}

/// Per-label trilinear scores of the eight corners, then nnU-Net's tie rule.
fn vote_corners<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(src: &Source<I, L>, q: [f64; 3], t: [f32; 3], label: impl Fn(usize) -> i16, cand: &mut Vec<(i16, f32)>) -> i16 {
    cand.clear();
    let w = corner_weights(t);
    for k in 0..8 {
        vote(cand, label(k), w[k]);
    }
    if cand.len() == 1 { cand[0].0 } else { decide(cand, src, q) }
}

fn vote(cand: &mut Vec<(i16, f32)>, l: i16, w: f32) {
    if w == 0.0 {
        return;
    }
    match cand.iter_mut().find(|e| e.0 == l) {
        Some(e) => e.1 += w,
        None => cand.push((l, w)),
    }
}

/// nnU-Net compares float16(1000 x score): near-ties become ties, which go to the nearest
/// label when it is among the tied, else to the lowest tied label.
fn decide<I: ImageSource + ?Sized, L: LabelSource + ?Sized>(cand: &mut [(i16, f32)], src: &Source<I, L>, q: [f64; 3]) -> i16 {
    cand.iter_mut().for_each(|e| e.1 = f16::from_f32(1000.0 * e.1).to_f32());
    let best = cand.iter().map(|e| e.1).fold(f32::MIN, f32::max);
    let lowest = cand.iter().filter(|e| e.1 == best).map(|e| e.0).min().unwrap_or(-1);
    let near = src.index(q.map(|v| v.round_ties_even() as i64)).map_or(-1, |i| src.labels.label(i));
    if cand.iter().any(|e| e.0 == near && e.1 == best) { near } else { lowest }
}
