//! Planning: the dataset fingerprint, nnU-Net's planners and plans schema, and segk's view of
//! a plan (what it trains, what that needs on a GPU).

pub mod fingerprint;
pub mod nnunet;
pub mod plans;
pub mod plans_json;
pub mod spacing;
