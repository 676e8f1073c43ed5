//! Export at the original geometry, streamed: each finished slice of logits on the plan's
//! grid is resampled in-plane to the cropped original grid, the slices along the first axis
//! are resampled as they arrive (linear, or nearest along a coarse axis as nnU-Net does for
//! probabilities), the head turns each voxel's logits into a label value (argmax, or region
//! thresholds), and each output slice is untransposed and pasted into the original volume
//! (background outside the crop). Only the input slices an output still reads are kept (two
//! for linear).

use super::probs::ProbFile;
use super::window::SliceSink;
use crate::preprocess::geometry::Geometry;
use crate::preprocess::resample::{axis_kernels, resample_image, taps, Kernel, Taps};
use anyhow::Result;
use std::collections::VecDeque;

/// How a voxel's (resampled, fold- and mirror-averaged) logits become its label value and
/// probabilities, as nnU-Net's LabelManager does after the logits are averaged.
#[derive(Clone, Debug)]
pub enum Head {
    /// Softmax classes: the argmax class's label value (one per output, in class order).
    Softmax(Vec<i16>),
    /// Sigmoid regions: region k writes `regions_class_order[k]` (given here, one per output)
    /// where its sigmoid is above 0.5, later regions over earlier; background elsewhere.
    Regions(Vec<i16>),
}

impl Head {
    /// The head a dataset.json describes: its label values (the ignore label aside) in
    /// ascending order, or its regions_class_order for a region dataset.
    pub fn of(json: &crate::dataset::DatasetJson) -> anyhow::Result<Head> {
        use anyhow::Context;
        if json.has_regions() {
            let order = json.regions_class_order.as_ref().context("dataset.json: labels are regions but there is no regions_class_order")?;
            return Ok(Head::Regions(order.iter().map(|&v| v as i16).collect()));
        }
        let mut v: Vec<i16> = json.labels.iter().filter(|(name, _)| *name != "ignore").filter_map(|(_, l)| if let crate::dataset::LabelValue::One(x) = l { Some(*x as i16) } else { None }).collect();
        v.sort();
        Ok(Head::Softmax(v))
    }
    pub fn outputs(&self) -> usize {
        match self {
            Head::Softmax(v) | Head::Regions(v) => v.len(),
        }
    }

    /// Every label value the head can write (background included).
    pub fn values(&self) -> Vec<i16> {
        match self {
            Head::Softmax(v) => v.clone(),
            Head::Regions(v) => std::iter::once(0).chain(v.iter().copied()).collect(),
        }
    }

    /// The label value of one voxel's logits, read at `logit(k)` for output k.
    pub fn label(&self, logit: impl Fn(usize) -> f32) -> i16 {
        match self {
            Head::Softmax(v) => v[(1..v.len()).fold(0, |b, k| if logit(k) > logit(b) { k } else { b })],
            Head::Regions(order) => order.iter().enumerate().fold(0, |l, (k, &value)| if sigmoid(logit(k)) > 0.5 { value } else { l }),
        }
    }
}

/// In f32, as nnU-Net compares it: a logit just above 0 can round to 0.5 and not count.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

pub struct Exporter {
    g: Geometry,
    classes: usize,
    head: Head,
    /// Cropped original shape in stored axis order.
    shape_t: [usize; 3],
    kernels: [Kernel; 3],
    taps0: Vec<Taps>,
    /// Resampled-in-plane input slices still needed: (index, [classes][H'][W']).
    window: VecDeque<(usize, Vec<f32>)>,
    next_out: usize,
    /// The label map on the original grid, [z][y][x].
    pub labels: Vec<i16>,
    /// The probabilities on the original grid, when asked for.
    pub probs: Option<ProbFile>,
}

impl Exporter {
    pub fn new(g: &Geometry, head: Head, probs: Option<ProbFile>) -> Exporter {
        let c = g.crop_shape();
        let t = g.transpose_forward;
        let shape_t = t.map(|a| c[a]);
        let spacing_t = t.map(|a| g.original_spacing[a]);
        let kernels = axis_kernels(g.spacing, spacing_t, Kernel::Linear);
        let taps0 = if g.shape[0] == shape_t[0] { taps(g.shape[0], shape_t[0], Kernel::Nearest) } else { taps(g.shape[0], shape_t[0], kernels[0]) };
        Exporter {
            g: g.clone(),
            classes: head.outputs(),
            head,
            shape_t,
            kernels,
            taps0,
            window: VecDeque::new(),
            next_out: 0,
            labels: vec![0; g.original_shape.iter().product()],
            probs,
        }
    }

    /// The lowest input slice an output slice reads.
    fn first_read(t: &Taps) -> usize {
        (0..4).filter(|&k| t.w[k] != 0.0).map(|k| t.idx[k]).min().unwrap_or(t.idx[0])
    }

    /// The highest input slice an output slice reads.
    fn needs(t: &Taps) -> usize {
        (0..4).filter(|&k| t.w[k] != 0.0).map(|k| t.idx[k]).max().unwrap_or(t.idx[0])
    }

    fn write_out(&mut self, o: usize) {
        let t = self.taps0[o];
        let (h, w) = (self.shape_t[1], self.shape_t[2]);
        let n = h * w;
        let mut mix = vec![0.0f32; self.classes * n];
        for k in 0..4 {
            if t.w[k] == 0.0 {
                continue;
            }
            let s = &self.window.iter().find(|(i, _)| *i == t.idx[k]).expect("an output's input slices are kept until it is written").1;
            mix.iter_mut().zip(s).for_each(|(m, &v)| *m += t.w[k] as f32 * v);
        }
        let back = crate::preprocess::geometry::inverse(self.g.transpose_forward);
        let full = self.g.original_shape;
        let mut voxel_logits = vec![0.0f32; self.classes];
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                // Stored axes (o, y, x) -> raw crop axes, then into the full volume.
                let q = [o, y, x];
                let raw: [usize; 3] = std::array::from_fn(|a| q[back[a]] + self.g.bbox[a][0]);
                let v = (raw[0] * full[1] + raw[1]) * full[2] + raw[2];
                self.labels[v] = self.head.label(|k| mix[k * n + i]);
                if let Some(p) = self.probs.as_mut() {
                    voxel_logits.iter_mut().enumerate().for_each(|(k, z)| *z = mix[k * n + i]);
                    p.set(v, &voxel_logits);
                }
            }
        }
        // When the plan's first axis is the input's first, this slice completed one plane of
        // every class array: let its pages go. (Other orders spread each slice over every plane.)
        if let (Some(p), 0) = (self.probs.as_ref(), back[0]) {
            let plane = full[1] * full[2];
            p.finished((o + self.g.bbox[0][0]) * plane, plane);
        }
    }
}

impl SliceSink for Exporter {
    fn slice(&mut self, k: usize, logits: &[f32]) -> Result<()> {
        let [_, h, w] = self.g.shape;
        // Downsampling along the first axis skips slices: keep only those an output reads.
        if let Some(t) = self.taps0.get(self.next_out) {
            if k < Self::first_read(t) {
                return Ok(());
            }
        }
        let (ho, wo) = (self.shape_t[1], self.shape_t[2]);
        let mut resampled = Vec::with_capacity(self.classes * ho * wo);
        for c in 0..self.classes {
            let plane = &logits[c * h * w..(c + 1) * h * w];
            resampled.extend(resample_image(plane, [1, h, w], [1, ho, wo], [Kernel::Nearest, self.kernels[1], self.kernels[2]]));
        }
        self.window.push_back((k, resampled));
        while self.next_out < self.taps0.len() && Self::needs(&self.taps0[self.next_out]) <= k {
            self.write_out(self.next_out);
            self.next_out += 1;
            if let Some(t) = self.taps0.get(self.next_out) {
                let first = Self::first_read(t);
                while self.window.front().is_some_and(|(i, _)| *i < first) {
                    self.window.pop_front();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Head;

    #[test]
    fn heads_turn_logits_into_label_values() {
        let softmax = Head::Softmax(vec![0, 1, 4]);
        assert_eq!(softmax.label(|k| [0.1, -2.0, 0.3][k]), 4, "argmax class's value");
        assert_eq!(softmax.label(|k| [0.5, 0.5, 0.5][k]), 0, "ties go to the first class");
        // BraTS's order: whole tumour (2), tumour core (1), enhancing (3), each over the last.
        let regions = Head::Regions(vec![2, 1, 3]);
        assert_eq!(regions.label(|k| [1.0, 1.0, -1.0][k]), 1);
        assert_eq!(regions.label(|k| [1.0, -1.0, 2.0][k]), 3, "a later region is written over an earlier one");
        assert_eq!(regions.label(|k| [-1.0, -1.0, -1.0][k]), 0, "background where no region is predicted");
        assert_eq!(regions.label(|_| 0.0), 0, "sigmoid 0.5 is not above the threshold");
        assert_eq!(regions.label(|_| 1e-9), 0, "nor is a logit whose f32 sigmoid rounds to 0.5");
        assert_eq!(regions.values(), vec![0, 2, 1, 3]);
    }
}
