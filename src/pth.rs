//! nnU-Net's `.pth` checkpoints: `torch.save` of a dict holding `network_weights` (the
//! network's state dict), `optimizer_state`, `init_args` (plans, configuration, fold, ...),
//! `trainer_name`, `inference_allowed_mirroring_axes` and the training log.
//!
//! Read through the pytorch-reader crate (Burn's reader of PyTorch files, no PyTorch or Python
//! needed): it parses the pickle without running it (a call it does not know, such as a numpy
//! scalar or `os.system`, stays an opaque value and is never executed), checks every length a
//! file declares against what the file holds, and reads a tensor's bytes only when asked.
//! segk takes the weights and the plain values above; everything else is left unread.

use anyhow::{bail, ensure, Context, Result};
use pytorch_reader::{DType, PickleValue, PytorchReader, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The parts of an nnU-Net checkpoint segk uses.
pub struct TorchCheckpoint {
    pub path: PathBuf,
    pub trainer_name: Option<String>,
    /// `init_args["configuration"]`: the configuration the net was trained as.
    pub configuration: Option<String>,
    /// The axes test-time mirroring may flip (nnU-Net's `inference_allowed_mirroring_axes`;
    /// None: the checkpoint allows none).
    pub mirror_axes: Option<Vec<usize>>,
    weights: HashMap<String, Tensor>,
}

/// Names under which PyTorch lists a tensor a second time: a conv block's `all_modules`
/// sequence, and the decoder's reference to the encoder.
pub fn is_alias(name: &str) -> bool {
    name.contains(".all_modules.") || name.starts_with("decoder.encoder.")
}

impl TorchCheckpoint {
    pub fn open(path: &Path) -> Result<TorchCheckpoint> {
        let unreadable = |e: pytorch_reader::PytorchError| anyhow::anyhow!("{}: not a readable PyTorch checkpoint ({e})", path.display());
        let root = PytorchReader::read_pickle_data(path, None).map_err(unreadable)?;
        let PickleValue::Dict(top) = root else {
            bail!("{}: not an nnU-Net checkpoint (its top level is {}, not a dict holding network_weights)", path.display(), describe(&root));
        };
        if !top.contains_key("network_weights") {
            let mut keys: Vec<&str> = top.keys().map(String::as_str).collect();
            keys.sort();
            bail!("{}: not an nnU-Net checkpoint (no network_weights; its top-level keys are {})", path.display(), keys.join(", "));
        }
        let string = |v: Option<&PickleValue>| match v {
            Some(PickleValue::String(s)) => Some(s.clone()),
            _ => None,
        };
        let configuration = match top.get("init_args") {
            Some(PickleValue::Dict(args)) => string(args.get("configuration")),
            _ => None,
        };
        let mirror_axes = match top.get("inference_allowed_mirroring_axes") {
            Some(PickleValue::List(axes)) => {
                let axes: Option<Vec<usize>> = axes.iter().map(|a| if let PickleValue::Int(i) = a { usize::try_from(*i).ok().filter(|&i| i < 3) } else { None }).collect();
                Some(axes.with_context(|| format!("{}: inference_allowed_mirroring_axes is not a list of axes 0..2", path.display()))?)
            }
            _ => None,
        };
        let weights = PytorchReader::with_top_level_key(path, "network_weights").map_err(unreadable)?.into_tensors();
        ensure!(!weights.is_empty(), "{}: network_weights holds no tensors", path.display());
        Ok(TorchCheckpoint { path: path.to_path_buf(), trainer_name: string(top.get("trainer_name")), configuration, mirror_axes, weights })
    }

    /// The names of the stored tensors, aliases left out, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.weights.keys().map(String::as_str).filter(|n| !is_alias(n)).collect();
        v.sort();
        v
    }

    /// Every stored name, aliases included, sorted.
    pub fn all_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.weights.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// A tensor's shape, without reading it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.weights.get(name).map(Tensor::shape)
    }

    /// Reads a tensor as f32 (f64, f16 and bf16 are converted); None when absent.
    pub fn tensor(&self, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Some(t) = self.weights.get(name) else { return Ok(None) };
        let bytes = t.read().with_context(|| format!("{}: reading tensor {name}", self.path.display()))?;
        ensure!(bytes.len() == t.byte_len(), "{}: tensor {name} has {} bytes, its shape {:?} needs {}", self.path.display(), bytes.len(), t.shape(), t.byte_len());
        let data: Vec<f32> = match t.dtype() {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail!("{}: tensor {name} holds {other:?}, not floating point weights", self.path.display()),
        };
        Ok(Some((t.shape().to_vec(), data)))
    }
}

/// A short description of a pickled value, for errors.
fn describe(v: &PickleValue) -> String {
    match v {
        PickleValue::Unsupported(t) => format!("an object of type {t}"),
        PickleValue::List(_) => "a list".into(),
        PickleValue::Dict(_) => "a dict".into(),
        PickleValue::String(_) => "a string".into(),
        PickleValue::None => "None".into(),
        _ => "a number or bytes".into(),
    }
}

/// The names PyTorch also lists `name` under in a U-Net's state dict (see [`is_alias`]): a
/// conv block's conv and norm again as `all_modules.0` and `all_modules.1`, and every
/// encoder tensor again under the decoder's reference to the encoder.
pub fn aliases_of(name: &str) -> Vec<String> {
    let in_block = |n: &str| -> Option<String> {
        for (part, index) in [(".conv.", 0), (".norm.", 1)] {
            if let Some(at) = n.rfind(part) {
                return Some(format!("{}.all_modules.{index}.{}", &n[..at], &n[at + part.len()..]));
            }
        }
        None
    };
    let mut v: Vec<String> = in_block(name).into_iter().collect();
    if name.starts_with("encoder.") {
        let twin = format!("decoder.{name}");
        v.extend(in_block(&twin));
        v.push(twin);
    }
    v
}

/// What segk writes into an nnU-Net checkpoint besides the weights.
pub struct CheckpointInfo<'a> {
    pub configuration: &'a str,
    pub fold: &'a str,
    pub plans: &'a serde_json::Value,
    pub dataset_json: &'a serde_json::Value,
    pub epoch: usize,
    pub best_ema: Option<f64>,
    /// nnU-Net's `inference_allowed_mirroring_axes`, in the net's own axes (2d: 0 and 1).
    pub mirror_axes: &'a [usize],
}

/// Writes `weights` (name, PyTorch shape, values in PyTorch's layout) as an nnU-Net
/// checkpoint that `torch.load` reads and nnU-Net's predictor loads with a strict
/// `load_state_dict`: every alias listed, sharing its tensor's storage. Written to a
/// temporary name and renamed.
pub fn write_checkpoint(path: &Path, weights: &[(String, Vec<usize>, Vec<f32>)], info: &CheckpointInfo) -> Result<()> {
    for (name, shape, data) in weights {
        ensure!(data.len() == shape.iter().product::<usize>(), "{}: tensor {name} has {} values for shape {shape:?}", path.display(), data.len());
    }
    let mut p = Pickle::new();
    p.0.extend_from_slice(b"\x80\x02}(");
    p.str("network_weights");
    p.ordered_dict_start();
    for (i, (name, shape, _)) in weights.iter().enumerate() {
        for key in std::iter::once(name.clone()).chain(aliases_of(name)) {
            p.str(&key);
            p.tensor(&i.to_string(), shape);
        }
    }
    p.0.push(b'u');
    p.str("trainer_name");
    p.str("nnUNetTrainer");
    p.str("init_args");
    let args = serde_json::json!({"plans": info.plans, "configuration": info.configuration, "fold": fold_value(info.fold), "dataset_json": info.dataset_json});
    p.json(&args);
    p.str("inference_allowed_mirroring_axes");
    ensure!((1..=3).contains(&info.mirror_axes.len()) && info.mirror_axes.iter().all(|&a| a < 3), "mirror axes {:?}", info.mirror_axes);
    for &a in info.mirror_axes {
        p.int(a as i64);
    }
    // TUPLE1, TUPLE2, TUPLE3
    p.0.push(b'\x84' + info.mirror_axes.len() as u8);
    p.str("current_epoch");
    p.int(info.epoch as i64);
    p.str("_best_ema");
    match info.best_ema {
        Some(v) => p.float(v),
        None => p.0.push(b'N'),
    }
    p.0.extend_from_slice(b"u.");

    let tmp = path.with_extension("pth.tmp");
    let write = || -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        // Stored, each record 64-byte aligned, as torch.save writes them (torch.load may map them).
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).with_alignment(64);
        let mut record = |name: &str, bytes: &[u8]| -> Result<()> {
            use std::io::Write;
            zip.start_file(format!("archive/{name}"), opts)?;
            zip.write_all(bytes)?;
            Ok(())
        };
        record("data.pkl", &p.0)?;
        record("byteorder", b"little")?;
        for (i, (_, _, data)) in weights.iter().enumerate() {
            record(&format!("data/{i}"), bytemuck::cast_slice(data))?;
        }
        record("version", b"3\n")?;
        zip.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    };
    if let Err(e) = write().and_then(|()| std::fs::rename(&tmp, path).map_err(Into::into)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    Ok(())
}

/// nnU-Net's fold: an int, or the string "all".
fn fold_value(fold: &str) -> serde_json::Value {
    fold.parse::<i64>().map_or_else(|_| serde_json::Value::from(fold), serde_json::Value::from)
}

/// A protocol-2 pickle of plain values and tensors, written opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Pickle {
        Pickle(Vec::new())
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn int(&mut self, v: i64) {
        match i32::try_from(v) {
            Ok(small) => {
                self.0.push(b'J');
                self.0.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                self.0.extend_from_slice(b"\x8a\x08");
                self.0.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    fn float(&mut self, v: f64) {
        self.0.push(b'G');
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn tuple(&mut self, items: &[usize]) {
        self.0.push(b'(');
        for &i in items {
            self.int(i as i64);
        }
        self.0.push(b't');
    }
    /// `OrderedDict()` followed by a MARK for its items (closed by SETITEMS).
    fn ordered_dict_start(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R(");
    }
    /// `torch._utils._rebuild_tensor_v2(storage, 0, shape, contiguous stride, False, OrderedDict())`
    /// over float storage `key` (archive/data/KEY).
    fn tensor(&mut self, key: &str, shape: &[usize]) {
        let numel: usize = shape.iter().product();
        let mut stride = vec![1usize; shape.len()];
        for a in (0..shape.len().saturating_sub(1)).rev() {
            stride[a] = stride[a + 1] * shape[a + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.0.push(b'(');
        self.0.push(b'(');
        self.str("storage");
        self.global("torch", "FloatStorage");
        self.str(key);
        self.str("cpu");
        self.int(numel as i64);
        self.0.extend_from_slice(b"tQ");
        self.int(0);
        self.tuple(shape);
        self.tuple(&stride);
        self.0.push(b'\x89');
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")Rt");
        self.0.push(b'R');
    }
    fn json(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Null => self.0.push(b'N'),
            Value::Bool(b) => self.0.push(if *b { b'\x88' } else { b'\x89' }),
            Value::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => self.float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => self.str(s),
            Value::Array(items) => {
                self.0.extend_from_slice(b"](");
                items.iter().for_each(|i| self.json(i));
                self.0.push(b'e');
            }
            Value::Object(map) => {
                self.0.extend_from_slice(b"}(");
                for (k, v) in map {
                    self.str(k);
                    self.json(v);
                }
                self.0.push(b'u');
            }
        }
    }
}
