//! ITK's image geometry (MetaImage, NRRD): spacing, origin and direction in LPS world
//! coordinates, as SimpleITK reports them to nnU-Net, and its translation to segk's RAS affine
//! and nnU-Net's spacing.

use super::{Header, Volume};

/// ITK's geometry of a 2D or 3D image, axes in file order (x fastest).
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    /// 2 or 3.
    pub dims: usize,
    /// Per axis (x, y, z); z is 1 for 2D.
    pub spacing: [f64; 3],
    /// LPS; z is 0 for 2D.
    pub origin: [f64; 3],
    /// Row-major: column c is axis c's direction in LPS (SimpleITK's GetDirection()).
    pub direction: [[f64; 3]; 3],
}

/// RAS from LPS: the first two world axes turn around.
const FLIP: [f64; 3] = [-1.0, -1.0, 1.0];

impl Geometry {
    /// nnU-Net's spacing ([z, y, x]) and segk's RAS affine of an image with this geometry.
    /// A 2D image is one slice deep, with nnU-Net's slice spacing: 999 × its largest spacing.
    pub fn spacing_affine(&self) -> ([f64; 3], [[f64; 4]; 3]) {
        let mut sp = self.spacing.map(f64::abs);
        let mut dir = self.direction;
        if self.dims == 2 {
            sp[2] = 999.0 * sp[0].max(sp[1]);
            dir = [[dir[0][0], dir[0][1], 0.0], [dir[1][0], dir[1][1], 0.0], [0.0, 0.0, 1.0]];
        }
        let affine = std::array::from_fn(|r| [FLIP[r] * dir[r][0] * sp[0], FLIP[r] * dir[r][1] * sp[1], FLIP[r] * dir[r][2] * sp[2], FLIP[r] * self.origin[r]]);
        ([sp[2], sp[1], sp[0]], affine)
    }
    /// The geometry of `v` as ITK would see it: its own header when read from an ITK
    /// format, else made from its spacing and affine (3D).
    pub fn of(v: &Volume) -> Geometry {
        if let Header::Itk(g) = &v.header {
            return g.clone();
        }
        let spacing = [v.spacing[2], v.spacing[1], v.spacing[0]];
        let direction = std::array::from_fn(|r| {
            std::array::from_fn(|c| {
                let n = (0..3).map(|i| v.affine[i][c] * v.affine[i][c]).sum::<f64>().sqrt();
                match n > 0.0 {
                    true => FLIP[r] * v.affine[r][c] / n,
                    false => (r == c) as u8 as f64,
                }
            })
        });
        let mut g = Geometry { dims: 3, spacing, origin: std::array::from_fn(|r| FLIP[r] * v.affine[r][3]), direction };
        if v.is_2d() {
            // The slice axis is nnU-Net's invention: a 2D image stays 2D.
            g.dims = 2;
            g.spacing[2] = 1.0;
            g.origin[2] = 0.0;
            g.direction = [[g.direction[0][0], g.direction[0][1], 0.0], [g.direction[1][0], g.direction[1][1], 0.0], [0.0, 0.0, 1.0]];
        }
        g
    }
    /// A volume of `shape` with this geometry and `data`.
    pub fn volume(self, shape: [usize; 3], data: Vec<f32>) -> Volume {
        let (spacing, affine) = self.spacing_affine();
        Volume { shape, spacing, affine, data, header: Header::Itk(self) }
    }
    /// The file's axis sizes (x first) of a volume of `shape` ([z, y, x]).
    pub fn sizes(&self, shape: [usize; 3]) -> Vec<usize> {
        [shape[2], shape[1], shape[0]][..self.dims].to_vec()
    }
    /// From the file's axis lists: sizes, spacing, origin and direction columns for the
    /// first `dims` axes (missing entries default to ITK's: spacing 1, origin 0, identity).
    pub fn from_axes(sizes: &[usize], spacing: &[f64], origin: &[f64], columns: &[Vec<f64>]) -> ([usize; 3], Geometry) {
        let dims = sizes.len();
        let mut g = Geometry { dims, spacing: [1.0; 3], origin: [0.0; 3], direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] };
        for a in 0..dims {
            g.spacing[a] = spacing.get(a).copied().unwrap_or(1.0);
            g.origin[a] = origin.get(a).copied().unwrap_or(0.0);
            if let Some(col) = columns.get(a) {
                for r in 0..dims {
                    g.direction[r][a] = col.get(r).copied().unwrap_or(0.0);
                }
            }
            // As ITK: a negative spacing is a positive one along the opposite direction.
            if g.spacing[a] < 0.0 {
                g.spacing[a] = -g.spacing[a];
                (0..dims).for_each(|r| g.direction[r][a] = -g.direction[r][a]);
            }
        }
        let s = |a: usize| sizes.get(a).copied().unwrap_or(1);
        ([s(2), s(1), s(0)], g)
    }
}

/// Numbers in a header as shortest round-trip decimals, space separated.
pub fn join(v: impl IntoIterator<Item = f64>) -> String {
    v.into_iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(" ")
}
