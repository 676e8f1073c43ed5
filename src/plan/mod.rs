//! Planning: the dataset fingerprint, nnU-Net's target spacing and topology rules, and the 3d_fullres plan.

pub mod fingerprint;
pub mod plans;
pub mod spacing;
pub mod topology;
