//! Planning: the dataset fingerprint, nnU-Net's target spacing and topology rules, and the 3d_fullres plan.

pub mod fingerprint;
pub mod nnunet;
pub mod plans;
pub mod plans_json;
pub mod spacing;
pub mod topology;
