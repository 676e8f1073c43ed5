//! Sliding-window inference, streamed along the first axis: tiles at nnU-Net's steps
//! (overlap 1 - step of the patch), each tile's logits (averaged over folds and mirror TTA)
//! weighted by a gaussian (sigma = patch/8) and accumulated into a window of slices only as
//! deep as the patch plus one step; a slice leaves (divided by its weights) as soon as no
//! later tile can touch it. Memory: classes x (patch depth + step) x H x W floats.

use crate::backend::Backend;
use crate::model::unet::Acts;
use crate::model::UNet;
use anyhow::Result;
use std::collections::VecDeque;

/// nnU-Net's tile starts along an axis of `size` (>= patch) for a step fraction (rounded
/// half to even, as numpy); a 2d patch's slice axis (patch 1) takes every slice once.
pub fn steps(size: usize, patch: usize, step: f64) -> Vec<usize> {
    assert!(size >= patch && patch > 0);
    if patch == 1 {
        return (0..size).collect();
    }
    let n = ((size - patch) as f64 / (patch as f64 * step)).ceil() as usize + 1;
    if n == 1 {
        return vec![0];
    }
    let actual = (size - patch) as f64 / (n - 1) as f64;
    (0..n).map(|i| (actual * i as f64).round_ties_even() as usize).collect()
}

/// The gaussian importance map of a patch: exp(-d^2 / 2 sigma^2) around patch/2 with
/// sigma = patch/8 per axis, scaled to a maximum of 1, never 0.
pub fn gaussian(patch: [usize; 3]) -> Vec<f32> {
    let axis = |n: usize| -> Vec<f64> {
        let (c, s) = ((n / 2) as f64, n as f64 / 8.0);
        (0..n).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * s * s)).exp()).collect()
    };
    let (gz, gy, gx) = (axis(patch[0]), axis(patch[1]), axis(patch[2]));
    let mut g = Vec::with_capacity(patch.iter().product());
    for z in &gz {
        for y in &gy {
            for x in &gx {
                g.push((z * y * x) as f32);
            }
        }
    }
    let min_pos = g.iter().cloned().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
    g.iter_mut().filter(|v| **v <= 0.0).for_each(|v| *v = min_pos);
    g
}

/// Receives finished slices in order: slice `k` of the volume, logits [classes][H][W].
pub trait SliceSink {
    fn slice(&mut self, k: usize, logits: &[f32]) -> Result<()>;
}

/// What a tile needs: the nets (folds), the device buffers, the settings.
pub struct Predictor<'a, B: Backend> {
    pub be: &'a B,
    pub nets: &'a [UNet<B>],
    /// Forward-only activations for one patch, batch 1.
    pub acts: &'a Acts<B>,
    pub patch: [usize; 3],
    pub classes: usize,
    pub step: f64,
    /// Mirror test-time augmentation over every combination of these axes (none: off).
    pub mirror_axes: &'a [usize],
}

fn flip_index(p: [usize; 3], patch: [usize; 3], flip: [bool; 3]) -> usize {
    let q: [usize; 3] = std::array::from_fn(|a| if flip[a] { patch[a] - 1 - p[a] } else { p[a] });
    (q[0] * patch[1] + q[1]) * patch[2] + q[2]
}

impl<B: Backend> Predictor<'_, B> {
    /// Adds one tile's logits, averaged over folds and mirrorings and weighted by the
    /// gaussian, into the live slices `live[z0 - base ..]` at (y0, x0). Logits come off the
    /// device one patch slice at a time, so no patch-sized logit buffer is kept on the host.
    fn add_tile(&self, input: &[f32], channels: usize, flipped: &mut [f32], slice: &mut [f32], g: &[f32], live: &mut [(Vec<f32>, Vec<f32>)], at: [usize; 3], padded_w: usize) -> Result<()> {
        let p = self.patch;
        let c = self.classes;
        let plane = live.first().map_or(0, |l| l.1.len());
        let allowed: [bool; 3] = std::array::from_fn(|a| self.mirror_axes.contains(&a));
        let flips: Vec<[bool; 3]> = (0..8).map(|m| [m & 4 != 0, m & 2 != 0, m & 1 != 0]).filter(|f| (0..3).all(|a| allowed[a] || !f[a])).collect();
        let scale = 1.0 / (self.nets.len() * flips.len()) as f32;
        let row = p[1] * p[2];
        for net in self.nets {
            for &f in &flips {
                for z in 0..p[0] {
                    for y in 0..p[1] {
                        for x in 0..p[2] {
                            let (o, s) = ((z * p[1] + y) * p[2] + x, flip_index([z, y, x], p, f));
                            flipped[o * channels..(o + 1) * channels].copy_from_slice(&input[s * channels..(s + 1) * channels]);
                        }
                    }
                }
                let lg = net.forward_logits(self.be, self.acts, flipped)?;
                for z in 0..p[0] {
                    let sz = if f[0] { p[0] - 1 - z } else { z };
                    self.be.download(self.be.view(&self.acts.arena, lg.offset + sz * row * c, row * c), slice)?;
                    let (acc, _) = &mut live[at[0] + z];
                    for y in 0..p[1] {
                        let sy = if f[1] { p[1] - 1 - y } else { y };
                        for x in 0..p[2] {
                            let sx = if f[2] { p[2] - 1 - x } else { x };
                            let wgt = g[(z * p[1] + y) * p[2] + x] * scale;
                            let src = &slice[(sy * p[2] + sx) * c..][..c];
                            let dst = (y + at[1]) * padded_w + x + at[2];
                            for k in 0..c {
                                acc[k * plane + dst] += wgt * src[k];
                            }
                        }
                    }
                }
            }
        }
        for z in 0..p[0] {
            let (_, w) = &mut live[at[0] + z];
            for y in 0..p[1] {
                for x in 0..p[2] {
                    w[(y + at[1]) * padded_w + x + at[2]] += g[(z * p[1] + y) * p[2] + x];
                }
            }
        }
        Ok(())
    }

    /// Runs the window over channels [C][D][H][W] of `shape` (padded with zeros up to the
    /// patch where smaller) and hands every slice of the unpadded volume to `sink`, in order.
    pub fn run(&self, channels: &[Vec<f32>], shape: [usize; 3], sink: &mut dyn SliceSink) -> Result<()> {
        let (p, c, nch) = (self.patch, self.classes, channels.len());
        let padded: [usize; 3] = std::array::from_fn(|a| shape[a].max(p[a]));
        let pad_lo: [usize; 3] = std::array::from_fn(|a| (padded[a] - shape[a]) / 2);
        let st: [Vec<usize>; 3] = std::array::from_fn(|a| steps(padded[a], p[a], self.step));
        let g = gaussian(p);
        let n: usize = p.iter().product();
        let plane = padded[1] * padded[2];
        let (mut input, mut flipped) = (vec![0.0f32; n * nch], vec![0.0f32; n * nch]);
        let mut slice = vec![0.0f32; p[1] * p[2] * c];
        // Live slices from `base`: logits [c][H][W] and weights [H][W].
        let mut live: VecDeque<(Vec<f32>, Vec<f32>)> = VecDeque::new();
        let mut base = 0usize;
        let mut emit = |upto: usize, live: &mut VecDeque<(Vec<f32>, Vec<f32>)>, base: &mut usize| -> Result<()> {
            while *base < upto {
                let (mut acc, w) = live.pop_front().unwrap_or_else(|| (vec![0.0; c * plane], vec![1.0; plane]));
                let z = *base;
                *base += 1;
                if z < pad_lo[0] || z >= pad_lo[0] + shape[0] {
                    continue;
                }
                for k in 0..c {
                    acc[k * plane..(k + 1) * plane].iter_mut().zip(&w).for_each(|(a, &wt)| *a /= wt);
                }
                // Crop the padding in-plane.
                let out: Vec<f32> = if padded[1] == shape[1] && padded[2] == shape[2] {
                    acc
                } else {
                    let mut o = Vec::with_capacity(c * shape[1] * shape[2]);
                    for k in 0..c {
                        for y in 0..shape[1] {
                            let row = k * plane + (y + pad_lo[1]) * padded[2] + pad_lo[2];
                            o.extend_from_slice(&acc[row..row + shape[2]]);
                        }
                    }
                    o
                };
                sink.slice(z - pad_lo[0], &out)?;
            }
            Ok(())
        };
        for &z0 in &st[0] {
            emit(z0, &mut live, &mut base)?;
            while live.len() < z0 + p[0] - base {
                live.push_back((vec![0.0; c * plane], vec![0.0; plane]));
            }
            for &y0 in &st[1] {
                for &x0 in &st[2] {
                    // Gather the tile (zeros in the padding), NDHWC.
                    for z in 0..p[0] {
                        for y in 0..p[1] {
                            for x in 0..p[2] {
                                let o = (z * p[1] + y) * p[2] + x;
                                let q = [z + z0, y + y0, x + x0];
                                let inside = (0..3).all(|a| q[a] >= pad_lo[a] && q[a] < pad_lo[a] + shape[a]);
                                for ch in 0..nch {
                                    input[o * nch + ch] = if inside { channels[ch][((q[0] - pad_lo[0]) * shape[1] + q[1] - pad_lo[1]) * shape[2] + q[2] - pad_lo[2]] } else { 0.0 };
                                }
                            }
                        }
                    }
                    let live = live.make_contiguous();
                    self.add_tile(&input, nch, &mut flipped, &mut slice, &g, live, [z0 - base, y0, x0], padded[2])?;
                }
            }
        }
        emit(padded[0], &mut live, &mut base)
    }
}
