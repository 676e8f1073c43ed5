//! NIfTI (.nii, .nii.gz) volumes through the nifti crate: every integer and float voxel type,
//! scl_slope/scl_inter applied, qform/sform geometry kept. Arrays are in nnU-Net's order:
//! [z][y][x] with x fastest (what SimpleITK hands nnU-Net), spacing as [z, y, x].

use anyhow::{bail, Context, Result};
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, ReaderOptions};
use std::path::Path;

/// One single-channel 3D volume.
#[derive(Clone, Debug)]
pub struct Volume {
    /// [z, y, x]
    pub shape: [usize; 3],
    /// [z, y, x], in the file's units (mm for medical images).
    pub spacing: [f64; 3],
    /// Voxel (i=x, j=y, k=z) to world, rows of a 3x4 matrix (sform when set, else qform).
    pub affine: [[f64; 4]; 3],
    pub data: Vec<f32>,
    /// The file's header, for writing results with the same geometry.
    pub header: NiftiHeader,
}

impl Volume {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
    /// Unit direction cosines of the voxel axes (x, y, z), for orientation checks.
    pub fn directions(&self) -> [[f64; 3]; 3] {
        std::array::from_fn(|c| {
            let v = [self.affine[0][c], self.affine[1][c], self.affine[2][c]];
            let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
            v.map(|a| a / n)
        })
    }
}

/// The voxel-to-world matrix: sform if its code is set, else qform (quaternion), else the
/// scaled identity, as the NIfTI standard orders them.
fn affine_of(h: &NiftiHeader) -> [[f64; 4]; 3] {
    if h.sform_code > 0 {
        return [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(|v| v as f64));
    }
    let px = [h.pixdim[1], h.pixdim[2], h.pixdim[3]].map(|v| if v > 0.0 { v as f64 } else { 1.0 });
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let r = [
            [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
            [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
            [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - b * b - c * c],
        ];
        let s = [px[0], px[1], px[2] * qfac];
        let o = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        return std::array::from_fn(|i| [r[i][0] * s[0], r[i][1] * s[1], r[i][2] * s[2], o[i]]);
    }
    [[px[0], 0.0, 0.0, 0.0], [0.0, px[1], 0.0, 0.0], [0.0, 0.0, px[2], 0.0]]
}

/// Reads a 3D NIfTI volume (a 4th dimension of size 1 is accepted).
pub fn read(path: &Path) -> Result<Volume> {
    let obj = ReaderOptions::new().read_file(path).map_err(plain).with_context(|| format!("{}: not a readable NIfTI file", path.display()))?;
    let header = obj.header().clone();
    let dim = header.dim;
    let rank = dim[0] as usize;
    if !(3..=4).contains(&rank) || (rank == 4 && dim[4] != 1) {
        bail!("{}: expected a 3D volume, found {}D with dims {:?}", path.display(), rank, &dim[1..=rank.min(7)]);
    }
    let [nx, ny, nz] = [dim[1], dim[2], dim[3]].map(|v| v as usize);
    let arr = obj.into_volume().into_ndarray::<f32>().map_err(plain).with_context(|| format!("{}: voxel data unreadable (truncated?)", path.display()))?;
    if arr.len() != nx * ny * nz {
        bail!("{}: header says {}x{}x{} voxels, data holds {}", path.display(), nx, ny, nz, arr.len());
    }
    // Logical axes are (x, y, z[, t]); reversing them walks memory z-major, x fastest. The
    // crate hands back Fortran order, so that walk is the buffer itself: take it as it is.
    let data: Vec<f32> = if arr.t().is_standard_layout() { arr.into_raw_vec_and_offset().0 } else { arr.t().iter().copied().collect() };
    let px = [header.pixdim[3], header.pixdim[2], header.pixdim[1]].map(|v| v.abs() as f64);
    Ok(Volume { shape: [nz, ny, nx], spacing: px, affine: affine_of(&header), data, header })
}

/// Voxel types a volume can be written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoxelType {
    U8,
    I16,
    U16,
    I32,
    F32,
    F64,
}

/// Writes `v` as NIfTI (.nii or .nii.gz by extension) with the given voxel type, keeping the
/// header's geometry. Values are rounded for integer types.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let [nz, ny, nx] = v.shape;
    let shape = ndarray::IxDyn(&[nx, ny, nz]);
    let w = nifti::writer::WriterOptions::new(path).reference_header(&v.header);
    // Build (x, y, z) arrays in Fortran order, so memory stays x fastest.
    macro_rules! put {
        ($t:ty) => {{
            let a = ndarray::ArrayD::<$t>::from_shape_vec(ndarray::ShapeBuilder::f(shape), v.data.iter().map(|&x| x.round() as $t).collect())?;
            w.write_nifti(&a)
        }};
    }
    let r = match ty {
        VoxelType::U8 => put!(u8),
        VoxelType::I16 => put!(i16),
        VoxelType::U16 => put!(u16),
        VoxelType::I32 => put!(i32),
        VoxelType::F32 => {
            let a = ndarray::ArrayD::<f32>::from_shape_vec(ndarray::ShapeBuilder::f(shape), v.data.clone())?;
            w.write_nifti(&a)
        }
        VoxelType::F64 => {
            let a = ndarray::ArrayD::<f64>::from_shape_vec(ndarray::ShapeBuilder::f(shape), v.data.iter().map(|&x| x as f64).collect())?;
            w.write_nifti(&a)
        }
    };
    r.map_err(plain).with_context(|| format!("writing {}", path.display()))
}

/// The nifti crate's error, with an I/O cause said in its own words (its Display shows the
/// cause's Debug form: `Io(Os { code: 30, .. })`).
fn plain(e: nifti::NiftiError) -> anyhow::Error {
    match e {
        nifti::NiftiError::Io(io) => anyhow::Error::new(io),
        other => anyhow::Error::new(other),
    }
}

/// A header for a volume of `shape` ([z, y, x]) and `spacing` ([z, y, x]) with an sform
/// of the given direction cosines (columns x, y, z) and origin.
pub fn header_for(shape: [usize; 3], spacing: [f64; 3], dirs: [[f64; 3]; 3], origin: [f64; 3]) -> NiftiHeader {
    let sp = [spacing[2], spacing[1], spacing[0]];
    let row = |i: usize| [(dirs[0][i] * sp[0]) as f32, (dirs[1][i] * sp[1]) as f32, (dirs[2][i] * sp[2]) as f32, origin[i] as f32];
    NiftiHeader {
        dim: [3, shape[2] as u16, shape[1] as u16, shape[0] as u16, 1, 1, 1, 1],
        pixdim: [1.0, spacing[2] as f32, spacing[1] as f32, spacing[0] as f32, 0.0, 0.0, 0.0, 0.0],
        sform_code: 1,
        qform_code: 0,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        ..NiftiHeader::default()
    }
}
