//! Shapes and raw views. One layout everywhere: NDHWC (channels last).

/// Shape of an NDHWC tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Dims {
    pub n: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Dims {
    pub fn new(n: usize, spatial: [usize; 3], c: usize) -> Dims {
        Dims { n, d: spatial[0], h: spatial[1], w: spatial[2], c }
    }
    pub fn spatial(&self) -> [usize; 3] {
        [self.d, self.h, self.w]
    }
    /// Voxels of one sample.
    pub fn voxels(&self) -> usize {
        self.d * self.h * self.w
    }
    /// Rows of the (voxels x channels) matrix over the whole batch.
    pub fn rows(&self) -> usize {
        self.n * self.voxels()
    }
    pub fn len(&self) -> usize {
        self.rows() * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn with_c(&self, c: usize) -> Dims {
        Dims { c, ..*self }
    }
    pub fn with_spatial(&self, s: [usize; 3]) -> Dims {
        Dims::new(self.n, s, self.c)
    }
    /// Row index -> (sample, z, y, x).
    pub fn unravel(&self, row: usize) -> [usize; 4] {
        let x = row % self.w;
        let t = row / self.w;
        let y = t % self.h;
        let t = t / self.h;
        [t / self.d, t % self.d, y, x]
    }
    /// (sample, z, y, x) -> row index.
    pub fn ravel(&self, n: usize, z: usize, y: usize, x: usize) -> usize {
        ((n * self.d + z) * self.h + y) * self.w + x
    }
}

impl std::fmt::Display for Dims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}x{}", self.n, self.d, self.h, self.w, self.c)
    }
}
