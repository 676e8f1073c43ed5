//! nnU-Net v2's plans file schema (`nnUNetPlans.json` and the like), read and written with its
//! key order, its value types (ints stay ints, floats stay floats) and Python's json layout
//! (indent 4, Python's float repr, no trailing newline), so that a file segk writes is the file
//! nnU-Net writes and a file nnU-Net wrote is used as it is. Keys segk does not know are kept.

use serde::{Deserialize, Serialize};
use std::io::Write;

type Extra = serde_json::Map<String, serde_json::Value>;

pub use crate::ordered::Ordered;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PlansJson {
    pub dataset_name: String,
    pub plans_name: String,
    pub original_median_spacing_after_transp: Vec<f64>,
    pub original_median_shape_after_transp: Vec<i64>,
    pub image_reader_writer: String,
    pub transpose_forward: Vec<usize>,
    pub transpose_backward: Vec<usize>,
    pub configurations: Ordered<Configuration>,
    pub experiment_planner_used: String,
    pub label_manager: String,
    pub foreground_intensity_properties_per_channel: serde_json::Value,
    #[serde(flatten)]
    pub extra: Extra,
}

/// One configuration; every key optional, since a configuration may only say what it changes
/// from the one it `inherits_from`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Configuration {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub data_identifier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preprocessor_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub patch_size: Option<Vec<usize>>,
    /// Floats (x.5 kept) for 2d and 3d_fullres, ints for 3d_lowres, as nnU-Net writes them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub median_image_size_in_voxels: Option<Vec<serde_json::Number>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub spacing: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub normalization_schemes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub use_mask_for_norm: Option<Vec<bool>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_seg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_data_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_seg_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_probabilities: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resampling_fn_probabilities_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub architecture: Option<Architecture>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub batch_dice: Option<bool>,
    /// A configuration name, or a list of them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_stage: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub inherits_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub previous_stage: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ResamplingKwargs {
    pub is_seg: bool,
    pub order: u32,
    pub order_z: u32,
    pub force_separate_z: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl ResamplingKwargs {
    pub fn new(is_seg: bool, order: u32) -> ResamplingKwargs {
        ResamplingKwargs { is_seg, order, order_z: 0, force_separate_z: None, extra: Extra::new() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Architecture {
    pub network_class_name: String,
    pub arch_kwargs: ArchKwargs,
    pub _kw_requires_import: Vec<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

pub const PLAIN_UNET: &str = "dynamic_network_architectures.architectures.unet.PlainConvUNet";
pub const RESENC_UNET: &str = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet";

impl Architecture {
    pub fn nnunet(residual: bool, arch_kwargs: ArchKwargs) -> Architecture {
        Architecture {
            network_class_name: if residual { RESENC_UNET } else { PLAIN_UNET }.into(),
            arch_kwargs,
            _kw_requires_import: ["conv_op", "norm_op", "dropout_op", "nonlin"].map(String::from).to_vec(),
            extra: Extra::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArchKwargs {
    pub n_stages: usize,
    pub features_per_stage: Vec<usize>,
    pub conv_op: String,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub n_conv_per_stage: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub n_blocks_per_stage: Option<Vec<usize>>,
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub conv_bias: bool,
    pub norm_op: String,
    pub norm_op_kwargs: NormKwargs,
    pub dropout_op: Option<String>,
    pub dropout_op_kwargs: Option<serde_json::Value>,
    pub nonlin: String,
    pub nonlin_kwargs: serde_json::Value,
    #[serde(flatten)]
    pub extra: Extra,
}

impl ArchKwargs {
    /// nnU-Net's U-Net of `features.len()` stages: a PlainConvUNet (2 convs per stage both
    /// ways) or a ResidualEncoderUNet (`blocks` residual blocks per encoder stage, 1 decoder
    /// conv per stage).
    pub fn new(residual: bool, dim: usize, features: Vec<usize>, kernels: Vec<Vec<usize>>, strides: Vec<Vec<usize>>, blocks: &[usize]) -> ArchKwargs {
        let n = features.len();
        let mut inplace = serde_json::Map::new();
        inplace.insert("inplace".into(), serde_json::Value::from(true));
        ArchKwargs {
            n_stages: n,
            features_per_stage: features,
            conv_op: format!("torch.nn.modules.conv.Conv{dim}d"),
            kernel_sizes: kernels,
            strides,
            n_conv_per_stage: (!residual).then(|| vec![2; n]),
            n_blocks_per_stage: residual.then(|| blocks[..n].to_vec()),
            n_conv_per_stage_decoder: vec![if residual { 1 } else { 2 }; n - 1],
            conv_bias: true,
            norm_op: format!("torch.nn.modules.instancenorm.InstanceNorm{dim}d"),
            norm_op_kwargs: NormKwargs { eps: 1e-5, affine: true, extra: Extra::new() },
            dropout_op: None,
            dropout_op_kwargs: None,
            nonlin: "torch.nn.LeakyReLU".into(),
            nonlin_kwargs: serde_json::Value::Object(inplace),
            extra: Extra::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NormKwargs {
    pub eps: f64,
    pub affine: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// JSON as Python's json.dump(indent=4) writes it: floats in Python's repr (1e-05, 3.0).
pub fn to_python_json<T: Serialize>(value: &T) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter { pretty: serde_json::ser::PrettyFormatter::with_indent(b"    ") });
    value.serialize(&mut ser)?;
    Ok(out)
}

/// Python's repr of a float: the shortest digits that read back, positional from 1e-4 up to
/// 1e16 (with ".0" for whole numbers), scientific with a two-digit exponent beyond.
pub fn python_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1;
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if digits.len() as i32 <= point {
            format!("{digits}{}.0", "0".repeat((point - digits.len() as i32) as usize))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() == 1 { digits } else { format!("{}.{}", &digits[..1], &digits[1..]) };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

struct PythonFormatter<'a> {
    pretty: serde_json::ser::PrettyFormatter<'a>,
}

impl serde_json::ser::Formatter for PythonFormatter<'_> {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, v: f64) -> std::io::Result<()> {
        w.write_all(python_float(v).as_bytes())
    }
    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, v: f32) -> std::io::Result<()> {
        self.write_f64(w, v as f64)
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.pretty.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.pretty.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.pretty.end_object_value(w)
    }
}
