//! Planning: the dataset fingerprint, then (next) the 3d_fullres plan.

pub mod fingerprint;
pub mod plans;
pub mod spacing;
pub mod topology;
