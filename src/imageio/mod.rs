//! Images as nnU-Net's readers hand them over, whatever the file: arrays [z][y][x] with x
//! fastest (SimpleITK's order), spacing [z, y, x], float32 voxels. The format is the file's
//! ending, as nnU-Net's reader registry chooses it:
//!
//! | ending              | nnU-Net's reader  | here            |
//! |---------------------|-------------------|-----------------|
//! | .nii.gz .nii        | SimpleITKIO       | nifti.rs        |
//! | .mha .mhd           | SimpleITKIO       | metaimage.rs    |
//! | .nrrd .nhdr         | SimpleITKIO       | nrrd.rs         |
//! | .png                | NaturalImage2DIO  | natural.rs      |
//! | .tif .tiff          | NaturalImage2DIO (one 2D page) / Tiff3DIO (a stack) | tiff.rs |
//!
//! Geometry is kept two ways: `affine`, voxel to world in NIfTI's RAS convention for every
//! format (orientation checks compare it across files), and `header`, the file's own fields,
//! so a prediction is written with exactly the input's geometry in the input's format.
//! Every reader checks what a header claims against the file before allocating for it.

pub mod itk;
pub mod metaimage;
pub mod natural;
pub mod nifti;
pub mod nrrd;
pub mod tiff;

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::Path;

pub use nifti::header_for;

/// One image: a 3D volume (2D images are one slice deep), one or more channels.
#[derive(Clone, Debug)]
pub struct Volume {
    /// [z, y, x]
    pub shape: [usize; 3],
    /// [z, y, x], in the file's units (mm for medical images), as nnU-Net's readers report it.
    pub spacing: [f64; 3],
    /// Voxel (i=x, j=y, k=z) to world (RAS, as NIfTI), rows of a 3x4 matrix.
    pub affine: [[f64; 4]; 3],
    /// The voxels, channel after channel when the file holds several (an RGB PNG).
    pub data: Vec<f32>,
    /// The file's own geometry fields, for writing results as the input was.
    pub header: Header,
}

/// A file's own geometry, by format.
#[derive(Clone, Debug)]
pub enum Header {
    Nifti(Box<::nifti::NiftiHeader>),
    /// MetaImage and NRRD: ITK's spacing, origin and direction (LPS).
    Itk(itk::Geometry),
    /// PNG and 2D TIFF carry no geometry: nnU-Net gives them spacing (999, 1, 1).
    Natural,
    /// A TIFF stack; its spacing comes from nnU-Net's CASE.json beside it.
    Tiff3d { spacing: [f64; 3] },
}

impl Volume {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
    /// A 2D image, written back as one: a picture, or a 2D ITK or NIfTI file (one slice deep
    /// here, with nnU-Net's made-up slice spacing that no file should keep).
    pub fn is_2d(&self) -> bool {
        self.shape[0] == 1
            && match &self.header {
                Header::Natural => true,
                Header::Itk(g) => g.dims == 2,
                Header::Nifti(h) => h.dim[0] == 2,
                Header::Tiff3d { .. } => false,
            }
    }
    /// How many channels the file held (3 or 4 for an RGB(A) picture, else 1).
    pub fn channels(&self) -> usize {
        self.data.len() / self.voxels().max(1)
    }
    /// Unit direction cosines of the voxel axes (x, y, z), for orientation checks.
    pub fn directions(&self) -> [[f64; 3]; 3] {
        std::array::from_fn(|c| {
            let v = [self.affine[0][c], self.affine[1][c], self.affine[2][c]];
            let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
            v.map(|a| a / n)
        })
    }
    /// A label map on this image's grid and geometry (no intensity scaling carried over).
    pub fn labels_like(&self, labels: Vec<f32>) -> Volume {
        let mut header = self.header.clone();
        if let Header::Nifti(h) = &mut header {
            (h.scl_slope, h.scl_inter) = (1.0, 0.0);
        }
        Volume { data: labels, header, ..self.clone_geometry() }
    }
    /// The channels apart, one vector each, and the volume left without data.
    pub fn into_channels(mut self) -> (Volume, Vec<Vec<f32>>) {
        let n = self.voxels().max(1);
        let data = std::mem::take(&mut self.data);
        let channels = match data.len() == n {
            true => vec![data],
            false => data.chunks(n).map(<[f32]>::to_vec).collect(),
        };
        (self, channels)
    }
    fn clone_geometry(&self) -> Volume {
        Volume { shape: self.shape, spacing: self.spacing, affine: self.affine, data: Vec::new(), header: self.header.clone() }
    }
}

/// The largest image a header may claim: 2^32 voxels (a 1600³ volume), far above any scan.
pub const MAX_VOXELS: usize = 1 << 32;

/// Deflate expands at most 1032:1; a compressed stream claiming more than this many bytes per
/// compressed byte is refused before anything is allocated for it.
pub const MAX_INFLATE_RATIO: usize = 1100;

/// The voxel count a header claims, refused when it is zero, overflows or exceeds MAX_VOXELS.
pub fn claimed_voxels(path: &Path, dims: &[usize]) -> Result<usize> {
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n <= MAX_VOXELS);
    match n {
        Some(0) => bail!("{}: the header claims an empty image (sizes {dims:?})", path.display()),
        Some(n) => Ok(n),
        None => bail!("{}: the header claims sizes {dims:?}, over segk's limit of {MAX_VOXELS} voxels", path.display()),
    }
}

/// `bytes` bytes from `r`, the buffer growing only as data arrives: a header that claims
/// more than the file holds costs what the file holds, then an error. Bytes after them are
/// left unread (ITK reads such files too).
pub fn read_claimed(r: impl Read, bytes: usize, path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(bytes.min(1 << 24));
    r.take(bytes as u64).read_to_end(&mut buf).with_context(|| format!("{}: reading the voxel data", path.display()))?;
    ensure!(buf.len() == bytes, "{}: the header claims {bytes} bytes of voxel data, the file holds {}", path.display(), buf.len());
    Ok(buf)
}

/// Opens the data file a header names (relative to the header's folder): a regular file,
/// its length.
pub fn open_data_file(header: &Path, name: &str) -> Result<(std::fs::File, u64, std::path::PathBuf)> {
    let path = header.parent().unwrap_or(Path::new(".")).join(name);
    let f = std::fs::File::open(&path).with_context(|| format!("{}: its data file {} cannot be opened", header.display(), path.display()))?;
    let meta = f.metadata().with_context(|| format!("{}: cannot stat", path.display()))?;
    ensure!(meta.is_file(), "{}: its data file {} is not a regular file", header.display(), path.display());
    Ok((f, meta.len(), path))
}

/// `bytes` bytes inflated from a zlib or gzip stream of `compressed_len` bytes (either framing,
/// as ITK's readers accept), refused first when no deflate stream could expand that far.
pub fn inflate_claimed(r: impl Read, compressed_len: u64, bytes: usize, path: &Path) -> Result<Vec<u8>> {
    ensure!(
        (bytes as u64) <= compressed_len.saturating_mul(MAX_INFLATE_RATIO as u64).saturating_add(4096),
        "{}: the header claims {bytes} bytes of voxel data, more than {compressed_len} compressed bytes can hold",
        path.display()
    );
    let mut r = std::io::BufReader::new(r);
    let head = std::io::BufRead::fill_buf(&mut r).with_context(|| format!("{}: reading the voxel data", path.display()))?;
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let out = match gzip {
        true => read_claimed(flate2::bufread::MultiGzDecoder::new(r), bytes, path),
        false => read_claimed(flate2::bufread::ZlibDecoder::new(r), bytes, path),
    };
    out.with_context(|| format!("{}: the compressed voxel data is damaged or short", path.display()))
}

/// Voxel types of the files segk reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoxelType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl VoxelType {
    pub fn bytes(self) -> usize {
        match self {
            VoxelType::U8 | VoxelType::I8 => 1,
            VoxelType::U16 | VoxelType::I16 => 2,
            VoxelType::U32 | VoxelType::I32 | VoxelType::F32 => 4,
            VoxelType::U64 | VoxelType::I64 | VoxelType::F64 => 8,
        }
    }
    /// Packed voxels as f32 (what nnU-Net's readers cast every image to).
    pub fn decode(self, bytes: &[u8], big_endian: bool) -> Vec<f32> {
        macro_rules! each {
            ($t:ty, $n:expr) => {
                bytes
                    .chunks_exact($n)
                    .map(|c| {
                        let a: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                        (if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }) as f32
                    })
                    .collect()
            };
        }
        match self {
            VoxelType::U8 => bytes.iter().map(|&b| b as f32).collect(),
            VoxelType::I8 => bytes.iter().map(|&b| b as i8 as f32).collect(),
            VoxelType::U16 => each!(u16, 2),
            VoxelType::I16 => each!(i16, 2),
            VoxelType::U32 => each!(u32, 4),
            VoxelType::I32 => each!(i32, 4),
            VoxelType::U64 => each!(u64, 8),
            VoxelType::I64 => each!(i64, 8),
            VoxelType::F32 => each!(f32, 4),
            VoxelType::F64 => each!(f64, 8),
        }
    }
    /// f32 voxels packed little-endian, integers rounded (and saturated at the type's range).
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        macro_rules! each {
            ($t:ty) => {
                data.iter().flat_map(|&x| (x.round() as $t).to_le_bytes()).collect()
            };
        }
        match self {
            VoxelType::U8 => each!(u8),
            VoxelType::I8 => each!(i8),
            VoxelType::U16 => each!(u16),
            VoxelType::I16 => each!(i16),
            VoxelType::U32 => each!(u32),
            VoxelType::I32 => each!(i32),
            VoxelType::U64 => each!(u64),
            VoxelType::I64 => each!(i64),
            VoxelType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            VoxelType::F64 => data.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        }
    }
    /// The type nnU-Net writes a label map as: uint8 below 255, else uint16.
    pub fn for_labels(max: i64) -> VoxelType {
        if max < 255 { VoxelType::U8 } else { VoxelType::U16 }
    }
}

/// The formats, by file ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nifti,
    MetaImage,
    Nrrd,
    Png,
    Tiff,
}

/// File endings segk reads and writes, in nnU-Net's spelling.
pub const ENDINGS: [&str; 9] = [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".tif", ".tiff"];

/// The format of a file ending (dataset.json's file_ending) or of a path.
pub fn format_of(name: &str) -> Option<Format> {
    let n = name.to_ascii_lowercase();
    let ends = |e: &str| n.ends_with(e);
    Some(match () {
        _ if ends(".nii.gz") || ends(".nii") => Format::Nifti,
        _ if ends(".mha") || ends(".mhd") => Format::MetaImage,
        _ if ends(".nrrd") || ends(".nhdr") => Format::Nrrd,
        _ if ends(".png") => Format::Png,
        _ if ends(".tif") || ends(".tiff") => Format::Tiff,
        _ => return None,
    })
}

/// Whether `name` ends in an image ending segk reads.
pub fn is_image_file(name: &str) -> bool {
    format_of(name).is_some()
}

fn format_of_path(path: &Path) -> Result<Format> {
    format_of(&path.to_string_lossy()).with_context(|| format!("{}: not an image format segk reads (it reads {})", path.display(), ENDINGS.join(", ")))
}

/// Reads an image, every channel it holds.
pub fn read_channels(path: &Path) -> Result<Volume> {
    let v = read_any(path)?;
    // ITK refuses a zero spacing; a huge one would make preprocessing's grid enormous.
    ensure!(
        v.spacing.iter().all(|s| s.is_finite() && *s > 0.0 && *s < 1e9),
        "{}: spacing {:?} (z,y,x) is not a positive size in mm",
        path.display(),
        v.spacing
    );
    debug_assert_eq!(v.data.len() % v.voxels().max(1), 0);
    Ok(v)
}

fn read_any(path: &Path) -> Result<Volume> {
    match format_of_path(path)? {
        Format::Nifti => nifti::read(path),
        Format::MetaImage => metaimage::read(path),
        Format::Nrrd => nrrd::read(path),
        Format::Png => natural::read_png(path),
        Format::Tiff => tiff::read(path),
    }
}

/// The channel images of one case in channel order, each file holding one channel or an
/// RGB(A) picture's three or four, all on one grid (checked against `shape` when given); and
/// the first file's volume (its geometry and header), without data.
pub fn read_case(paths: &[std::path::PathBuf], shape: Option<[usize; 3]>) -> Result<(Vec<Vec<f32>>, Volume)> {
    let mut channels = Vec::with_capacity(paths.len());
    let mut first: Option<Volume> = None;
    for p in paths {
        let v = read_channels(p)?;
        if let Some(want) = shape.or(first.as_ref().map(|f| f.shape)) {
            ensure!(v.shape == want, "{}: shape {:?} differs from {:?} (the label map's or the first channel's)", p.display(), v.shape, want);
        }
        let (v, c) = v.into_channels();
        channels.extend(c);
        first.get_or_insert(v);
    }
    let first = first.with_context(|| "a case needs at least one channel image")?;
    Ok((channels, first))
}

/// Reads a one-channel image (a label map, or a channel of a case).
pub fn read(path: &Path) -> Result<Volume> {
    let v = read_channels(path)?;
    ensure!(v.channels() == 1, "{}: holds {} channels (an RGB(A) picture); a label map holds one", path.display(), v.channels());
    Ok(v)
}

/// Writes `v` in the format of `path`'s ending as voxel type `ty` (rounded for integers),
/// with `v`'s geometry: its own header when it came from a file of that format, else one
/// made from its affine and spacing.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    ensure!(v.data.len() == v.voxels(), "{}: writing {} values for a {:?} grid", path.display(), v.data.len(), v.shape);
    let r = match format_of_path(path)? {
        Format::Nifti => nifti::write(path, v, ty),
        Format::MetaImage => metaimage::write(path, v, ty),
        Format::Nrrd => nrrd::write(path, v, ty),
        Format::Png => natural::write_png(path, v, ty),
        Format::Tiff => tiff::write(path, v, ty),
    };
    r.with_context(|| format!("writing {}", path.display()))
}

/// Writes a text header and its voxel data: into one file (`separator` between them), or,
/// when `data_file` is given, the data into that file beside the header.
pub(crate) fn write_header_and_data(path: &Path, head: &str, separator: &[u8], data: &[u8], data_file: Option<&Path>) -> Result<()> {
    use std::io::Write;
    match data_file {
        Some(d) => {
            std::fs::write(d, data).with_context(|| format!("writing {}", d.display()))?;
            std::fs::write(path, head)?;
        }
        None => {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
            f.write_all(head.as_bytes())?;
            f.write_all(separator)?;
            f.write_all(data)?;
            f.flush()?;
        }
    }
    Ok(())
}

/// A file's name with `suffix` in place of its image ending (CASE.mhd -> CASE.raw).
pub fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
    path.with_file_name(format!("{stem}{suffix}"))
}

/// Writes like `write`, complete or not at all: the file and its companions (a .mhd's data,
/// a TIFF stack's spacing JSON) are made in a hidden folder beside it and moved into place,
/// the image itself last, so an image that exists is whole (what `--continue` relies on).
pub fn write_atomic(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(".partial.{}.d", name.to_string_lossy()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let moved = write(&tmp.join(name), v, ty).and_then(|()| {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&tmp)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort_by_key(|f| f.file_name() == Some(name));
        for f in files {
            let to = dir.join(f.file_name().unwrap_or_default());
            std::fs::rename(&f, &to).with_context(|| format!("renaming {} to {}", f.display(), to.display()))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&tmp);
    moved
}

/// The type nnU-Net writes a label map of these values as.
pub fn label_type(values: &[f32]) -> VoxelType {
    VoxelType::for_labels(values.iter().fold(0.0f32, |m, &x| m.max(x)) as i64)
}
