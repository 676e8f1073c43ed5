//! NIfTI (.nii, .nii.gz) volumes through the nifti crate: every integer and float voxel type,
//! scl_slope/scl_inter applied, qform/sform geometry kept. A 2D file is one slice deep with
//! nnU-Net's slice spacing (999 × its largest), as SimpleITKIO reads it.

use super::{Header, Volume, VoxelType};
use anyhow::{bail, Context, Result};
use nifti::{NiftiHeader, NiftiObject, ReaderOptions};
use std::path::Path;

/// The voxel-to-world matrix as ITK (so SimpleITK, so nnU-Net) takes it: the sform when its
/// code is 1 (scanner) or there is no qform, else the qform (quaternion), else the scaled
/// identity.
fn affine_of(h: &NiftiHeader) -> [[f64; 4]; 3] {
    if h.sform_code == 1 || (h.sform_code > 0 && h.qform_code <= 0) {
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

/// segk's voxel type of a NIfTI datatype code.
fn voxel_type(code: i16) -> Option<VoxelType> {
    Some(match code {
        2 => VoxelType::U8,
        4 => VoxelType::I16,
        8 => VoxelType::I32,
        16 => VoxelType::F32,
        64 => VoxelType::F64,
        256 => VoxelType::I8,
        512 => VoxelType::U16,
        768 => VoxelType::U32,
        1024 => VoxelType::I64,
        1280 => VoxelType::U64,
        _ => return None,
    })
}

/// The voxel count the header claims, checked before the crate allocates for it: within
/// segk's limit, and for an uncompressed file within the file's length.
fn check_claim(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(348);
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let gz = path.to_string_lossy().to_ascii_lowercase().ends_with(".gz");
    let _ = match gz {
        true => flate2::read::GzDecoder::new(file).take(348).read_to_end(&mut head),
        false => file.take(348).read_to_end(&mut head),
    };
    if head.len() < 348 {
        return Ok(()); // the crate says what is wrong with a short header
    }
    let le = i32::from_le_bytes([head[0], head[1], head[2], head[3]]) == 348;
    let short = |at: usize| if le { i16::from_le_bytes([head[at], head[at + 1]]) } else { i16::from_be_bytes([head[at], head[at + 1]]) };
    let rank = short(40).clamp(0, 7) as usize;
    let dims: Vec<usize> = (1..=rank).map(|i| short(40 + 2 * i).max(0) as usize).collect();
    let voxels = super::claimed_voxels(path, &dims)?;
    let bits = short(72).max(8) as u64;
    if !gz {
        let need = voxels as u64 * bits / 8;
        anyhow::ensure!(need <= len, "{}: the header claims {need} bytes of voxel data, the file holds {len}", path.display());
    } else {
        let need = voxels as u64 * bits / 8;
        anyhow::ensure!(need <= len.saturating_mul(super::MAX_INFLATE_RATIO as u64).saturating_add(1 << 16), "{}: the header claims {need} bytes of voxel data, more than {len} compressed bytes can hold", path.display());
    }
    Ok(())
}

/// Reads a 3D NIfTI volume (a 4th dimension of size 1 is accepted) or a 2D image.
pub fn read(path: &Path) -> Result<Volume> {
    check_claim(path)?;
    let obj = ReaderOptions::new().read_file(path).map_err(plain).with_context(|| format!("{}: not a readable NIfTI file", path.display()))?;
    let header = obj.header().clone();
    let dim = header.dim;
    let rank = dim[0] as usize;
    if !(2..=4).contains(&rank) || (rank == 4 && dim[4] != 1) {
        bail!("{}: expected a 2D or 3D image, found {}D with dims {:?}", path.display(), rank, &dim[1..=rank.min(7)]);
    }
    let [nx, ny, nz] = [dim[1], dim[2], if rank == 2 { 1 } else { dim[3] }].map(|v| v as usize);
    // The voxels are decoded here, not by the crate: its conversion panics on a header whose
    // bitpix disagrees with its datatype.
    let ty = voxel_type(header.datatype).with_context(|| format!("{}: NIfTI datatype {} is not supported (integers and real numbers are)", path.display(), header.datatype))?;
    let raw = obj.into_volume().into_raw_data();
    if raw.len() != nx * ny * nz * ty.bytes() {
        bail!("{}: header says {}x{}x{} voxels of {} bytes, data holds {} bytes", path.display(), nx, ny, nz, ty.bytes(), raw.len());
    }
    // NIfTI stores x fastest, as segk's [z][y][x] arrays: the data is already in order.
    let mut data = ty.decode(&raw, header.endianness == nifti::Endianness::Big);
    let (slope, inter) = (header.scl_slope, header.scl_inter);
    if slope != 0.0 && slope.is_finite() && inter.is_finite() && (slope, inter) != (1.0, 0.0) {
        data.iter_mut().for_each(|v| *v = *v * slope + inter);
    }
    let mut px = [header.pixdim[3], header.pixdim[2], header.pixdim[1]].map(|v| v.abs() as f64);
    let mut affine = affine_of(&header);
    // ITK's spacing is pixdim's even where the sform's scales differ; its directions the sform's.
    for c in 0..3 {
        let n = (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt();
        let want = [px[2], px[1], px[0]][c];
        if n > 0.0 && want > 0.0 {
            (0..3).for_each(|r| affine[r][c] *= want / n);
        }
    }
    if rank == 2 {
        px[0] = 999.0 * px[1].max(px[2]);
        affine[2] = [0.0, 0.0, px[0], affine[2][3]];
        (affine[0][2], affine[1][2]) = (0.0, 0.0);
    }
    Ok(Volume { shape: [nz, ny, nx], spacing: px, affine, data, header: Header::Nifti(Box::new(header)) })
}

/// Writes `v` as NIfTI (.nii or .nii.gz by extension) with the given voxel type, keeping the
/// header's geometry. Values are rounded for integer types.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let [nz, ny, nx] = v.shape;
    let two_d = v.is_2d();
    let shape = if two_d { ndarray::IxDyn(&[nx, ny]) } else { ndarray::IxDyn(&[nx, ny, nz]) };
    let header = match &v.header {
        Header::Nifti(h) => (**h).clone(),
        _ if two_d => header_2d(v),
        _ => header_from_affine(v),
    };
    let w = nifti::writer::WriterOptions::new(path).reference_header(&header);
    // Build (x, y, z) arrays in Fortran order, so memory stays x fastest.
    macro_rules! put {
        ($t:ty) => {{
            let a = ndarray::ArrayD::<$t>::from_shape_vec(ndarray::ShapeBuilder::f(shape), v.data.iter().map(|&x| x.round() as $t).collect())?;
            w.write_nifti(&a)
        }};
    }
    let r = match ty {
        VoxelType::U8 => put!(u8),
        VoxelType::I8 => put!(i8),
        VoxelType::I16 => put!(i16),
        VoxelType::U16 => put!(u16),
        VoxelType::I32 => put!(i32),
        VoxelType::U32 => put!(u32),
        VoxelType::I64 => put!(i64),
        VoxelType::U64 => put!(u64),
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

/// A NIfTI header with `v`'s affine as its sform (an image from another format).
fn header_from_affine(v: &Volume) -> NiftiHeader {
    let mut h = nifti_header(v.shape, v.spacing, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.0; 3]);
    (h.srow_x, h.srow_y, h.srow_z) = (v.affine[0].map(|x| x as f32), v.affine[1].map(|x| x as f32), v.affine[2].map(|x| x as f32));
    h
}

/// A 2D image's header as SimpleITK writes one: two dimensions, the slice axis a unit step
/// along z (not nnU-Net's made-up slice spacing).
fn header_2d(v: &Volume) -> NiftiHeader {
    let mut flat = Volume { spacing: [1.0, v.spacing[1], v.spacing[2]], affine: v.affine, shape: v.shape, data: Vec::new(), header: Header::Natural };
    for r in 0..3 {
        flat.affine[r][2] = (r == 2) as u8 as f64;
    }
    let mut h = header_from_affine(&flat);
    h.dim[0] = 2;
    h
}

/// The header of a NIfTI volume of `shape` ([z, y, x]) and `spacing` ([z, y, x]) with an
/// sform of the given direction cosines (columns x, y, z) and origin.
pub fn header_for(shape: [usize; 3], spacing: [f64; 3], dirs: [[f64; 3]; 3], origin: [f64; 3]) -> Header {
    Header::Nifti(Box::new(nifti_header(shape, spacing, dirs, origin)))
}

fn nifti_header(shape: [usize; 3], spacing: [f64; 3], dirs: [[f64; 3]; 3], origin: [f64; 3]) -> NiftiHeader {
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
