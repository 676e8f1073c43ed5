//! Axis permutation, cropping and pasting of [z][y][x] volumes, and undoing the
//! preprocessing geometry (resample back, transpose back, paste into the original grid).

use super::resample::{axis_kernels, resample_image, resample_labels, Kernel};
use serde::{Deserialize, Serialize};

/// Permutes axes: output axis i is input axis `order[i]`. Returns the data and its shape.
pub fn transpose<T: Copy>(data: &[T], shape: [usize; 3], order: [usize; 3]) -> (Vec<T>, [usize; 3]) {
    let out_shape = order.map(|a| shape[a]);
    if order == [0, 1, 2] {
        return (data.to_vec(), shape);
    }
    let stride_in = [shape[1] * shape[2], shape[2], 1];
    let s = order.map(|a| stride_in[a]);
    let mut out = Vec::with_capacity(data.len());
    for i in 0..out_shape[0] {
        for j in 0..out_shape[1] {
            let base = i * s[0] + j * s[1];
            out.extend((0..out_shape[2]).map(|k| data[base + k * s[2]]));
        }
    }
    (out, out_shape)
}

/// The inverse permutation of `order`.
pub fn inverse(order: [usize; 3]) -> [usize; 3] {
    let mut back = [0; 3];
    for (i, &a) in order.iter().enumerate() {
        back[a] = i;
    }
    back
}

/// The box `bbox` ([lo, hi) per axis) cut out of a volume of `shape`.
pub fn crop<T: Copy>(data: &[T], shape: [usize; 3], bbox: [[usize; 2]; 3]) -> Vec<T> {
    let [_, h, w] = shape;
    let mut out = Vec::with_capacity((0..3).map(|a| bbox[a][1] - bbox[a][0]).product());
    for z in bbox[0][0]..bbox[0][1] {
        for y in bbox[1][0]..bbox[1][1] {
            let row = (z * h + y) * w;
            out.extend_from_slice(&data[row + bbox[2][0]..row + bbox[2][1]]);
        }
    }
    out
}

/// A volume of `shape` filled with `fill`, with `src` (the size of `bbox`) pasted at `bbox`.
pub fn paste<T: Copy>(src: &[T], shape: [usize; 3], bbox: [[usize; 2]; 3], fill: T) -> Vec<T> {
    let [_, h, w] = shape;
    let mut out = vec![fill; shape.iter().product()];
    let row_len = bbox[2][1] - bbox[2][0];
    let mut rows = src.chunks(row_len.max(1));
    for z in bbox[0][0]..bbox[0][1] {
        for y in bbox[1][0]..bbox[1][1] {
            let at = (z * h + y) * w + bbox[2][0];
            if let Some(r) = rows.next() {
                out[at..at + row_len].copy_from_slice(r);
            }
        }
    }
    out
}

/// What it takes to map a stored case back onto its raw image grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Geometry {
    /// Raw image shape and spacing, [z, y, x] as read.
    pub original_shape: [usize; 3],
    pub original_spacing: [f64; 3],
    /// The nonzero crop in raw axis order, [lo, hi) per axis.
    pub bbox: [[usize; 2]; 3],
    /// Raw axis of each stored axis.
    pub transpose_forward: [usize; 3],
    /// Spacing of the stored grid (stored axis order).
    pub spacing: [f64; 3],
    /// Shape of the stored grid.
    pub shape: [usize; 3],
    /// The raw image's voxel-to-world matrix.
    pub affine: [[f64; 4]; 3],
}

impl Geometry {
    pub fn crop_shape(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.bbox[a][1] - self.bbox[a][0])
    }
    /// The cropped shape and the raw spacing in stored axis order.
    fn cropped_transposed(&self) -> ([usize; 3], [f64; 3]) {
        let (c, t) = (self.crop_shape(), self.transpose_forward);
        (t.map(|a| c[a]), t.map(|a| self.original_spacing[a]))
    }
    /// A stored image channel back on the raw grid (zero outside the crop).
    pub fn undo_image(&self, stored: &[f32]) -> Vec<f32> {
        let (shape_t, spacing_t) = self.cropped_transposed();
        let v = resample_image(stored, self.shape, shape_t, axis_kernels(self.spacing, spacing_t, Kernel::Cubic));
        let (v, _) = transpose(&v, shape_t, inverse(self.transpose_forward));
        paste(&v, self.original_shape, self.bbox, 0.0)
    }
    /// A label map on the raw grid (another model's prediction of this case) brought onto the
    /// stored grid as the case's own labels were: cropped, transposed, resampled.
    pub fn labels_onto_grid(&self, raw: &[i16]) -> Vec<i16> {
        let (shape_t, spacing_t) = self.cropped_transposed();
        let (v, _) = transpose(&crop(raw, self.original_shape, self.bbox), self.crop_shape(), self.transpose_forward);
        resample_labels(&v, shape_t, self.shape, axis_kernels(spacing_t, self.spacing, Kernel::Linear))
    }
    /// A stored label map back on the raw grid (negative labels, outside the nonzero mask,
    /// become background, as they are in the raw label map).
    pub fn undo_labels(&self, stored: &[i16]) -> Vec<i16> {
        let (shape_t, spacing_t) = self.cropped_transposed();
        let v = resample_labels(stored, self.shape, shape_t, axis_kernels(self.spacing, spacing_t, Kernel::Linear));
        let (mut v, _) = transpose(&v, shape_t, inverse(self.transpose_forward));
        v.iter_mut().filter(|l| **l < 0).for_each(|l| *l = 0);
        paste(&v, self.original_shape, self.bbox, 0)
    }
}
