//! Entry points of the fuzz targets: every reader of files from outside, fed arbitrary bytes.
//! `fuzz/` runs them under AFL++ (coverage-guided, `fuzz/run`); tests/fuzz.rs replays the
//! corpus and random mutations of it in CI. A target may return an error, never panic, hang
//! or allocate more than its input can justify.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Target names, each with the seed files (by ending, under tests/fixtures) of its corpus.
pub const TARGETS: [(&str, &[&str]); 10] = [
    ("nifti", &[".nii", ".nii.gz"]),
    ("metaimage", &[".mha", ".mhd"]),
    ("nrrd", &[".nrrd", ".nhdr"]),
    ("png", &[".png"]),
    ("tiff", &[".tif", ".tiff"]),
    ("dataset_json", &["dataset.json"]),
    ("plans", &["Plans.json", "plans.json"]),
    ("splits", &["splits_final.json"]),
    ("safetensors", &[".safetensors"]),
    ("pth", &[".pth"]),
];

/// Where a detached header's data starts in a fuzz input (a .mhd or .nhdr and its data file
/// in one input).
pub const DATA_MARK: &[u8] = b"\n--segk-data--\n";

/// A folder of this process's for the files a target reads.
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segk-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::write(&p, bytes);
    p
}

/// A header and its data file from one input: split at DATA_MARK, the data file named as
/// segk writes it beside the header.
fn detached(dir: &Path, header: &str, data: &str, bytes: &[u8]) -> PathBuf {
    let at = bytes.windows(DATA_MARK.len()).position(|w| w == DATA_MARK);
    let (h, d) = at.map_or((bytes, &[][..]), |i| (&bytes[..i], &bytes[i + DATA_MARK.len()..]));
    put(dir, data, d);
    put(dir, header, h)
}

/// One file holding header and data (`attached`), or, when the input holds DATA_MARK, a
/// header (`header`) and its data under each name a header of segk's or SimpleITK's names.
fn attached_or_detached(dir: &Path, data: &[u8], attached: &str, header: &str, data_names: &[&str]) -> PathBuf {
    if !data.windows(DATA_MARK.len()).any(|w| w == DATA_MARK) {
        return put(dir, attached, data);
    }
    let p = detached(dir, header, data_names[0], data);
    for other in &data_names[1..] {
        let _ = std::fs::copy(dir.join(data_names[0]), dir.join(other));
    }
    p
}

/// A small network's parameter layout for the checkpoint readers to fill.
fn layout() -> &'static crate::model::params::ParamLayout {
    static L: std::sync::OnceLock<crate::model::params::ParamLayout> = std::sync::OnceLock::new();
    L.get_or_init(|| crate::model::params::ParamLayout::new(&crate::model::Topology::isotropic(1, 2, vec![2, 4])))
}

const DATASET: &str = r#"{"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2, "file_ending": ".nii.gz"}"#;

/// Runs target `name` on `data`; the result is what the reader said (errors are fine).
pub fn run(name: &str, data: &[u8], dir: &Path) -> anyhow::Result<()> {
    use crate::imageio;
    match name {
        // The first byte chooses the compressed path: gzip of the rest, or the rest as it is.
        "nifti" => {
            let (gz, rest) = data.split_first().map_or((false, data), |(b, r)| (b & 1 == 1, r));
            let p = match gz {
                true => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(rest)?;
                    put(dir, "f.nii.gz", &e.finish()?)
                }
                false => put(dir, "f.nii", rest),
            };
            imageio::read_channels(&p).map(drop)
        }
        "metaimage" => imageio::read_channels(&attached_or_detached(dir, data, "f.mha", "f.mhd", &["f.zraw", "f.raw"])).map(drop),
        "nrrd" => imageio::read_channels(&attached_or_detached(dir, data, "f.nrrd", "f.nhdr", &["f.raw.gz", "f.raw"])).map(drop),
        "png" => imageio::read_channels(&put(dir, "f.png", data)).map(drop),
        "tiff" => imageio::read_channels(&put(dir, "f_0000.tif", data)).map(drop),
        "dataset_json" => crate::dataset::read_json_file(&put(dir, "dataset.json", data)).map(drop),
        "plans" => {
            let plans = crate::plan::plans::parse_plans(data, "plans")?;
            let json: crate::dataset::DatasetJson = serde_json::from_str(DATASET)?;
            for c in plans.configurations.keys() {
                if let Ok(conf) = crate::plan::nnunet::resolve(&plans, c) {
                    let _ = crate::plan::nnunet::segk_topology(&conf, &json);
                }
            }
            Ok(())
        }
        "splits" => {
            put(dir, "splits_final.json", data);
            let ids: Vec<String> = (0..6).map(|i| format!("case_{i:04}")).collect();
            crate::preprocess::splits::load_or_create(dir, &ids).map(drop)
        }
        "safetensors" => {
            let l = layout();
            let mut region = vec![0.0f32; l.len];
            crate::checkpoint::read_into(&put(dir, "f.safetensors", data), &l.tensors, &mut region).map(drop)
        }
        "pth" => {
            let ckpt = crate::pth::TorchCheckpoint::open(&put(dir, "f.pth", data))?;
            let l = layout();
            let mut region = vec![0.0f32; l.len];
            ckpt.names().iter().for_each(|n| drop(ckpt.tensor(n)));
            // The seeds are other networks' checkpoints: filling this one mostly fails, and
            // exercises the checks on the way.
            let _ = crate::checkpoint::read_torch_into(&ckpt, &l.tensors, &mut region);
            Ok(())
        }
        other => anyhow::bail!("no fuzz target {other:?} (targets: {})", TARGETS.map(|t| t.0).join(", ")),
    }
}

/// The largest seed kept: AFL++ works best on small inputs.
const MAX_SEED: usize = 1 << 18;

/// Every file under `dir` (recursively) whose name ends with one of `endings`.
fn files_ending(dir: &Path, endings: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files_ending(&p, endings, out);
        } else if endings.iter().any(|e| p.to_string_lossy().ends_with(e)) {
            out.push(p);
        }
    }
}

/// The seed corpus of `target`: its files among the test fixtures under `fixtures`, in the
/// shape `run` takes them (a detached header joined to its data, a NIfTI behind its
/// selector byte), and files made here where the fixtures have none.
pub fn seeds(target: &str, fixtures: &Path) -> Vec<Vec<u8>> {
    let endings = TARGETS.iter().find(|t| t.0 == target).map_or(&[][..], |t| t.1);
    let mut files = Vec::new();
    files_ending(fixtures, endings, &mut files);
    let mut out: Vec<Vec<u8>> = Vec::new();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        let name = f.to_string_lossy().to_string();
        let seed = match target {
            "nifti" if name.ends_with(".gz") => {
                let mut raw = vec![1u8];
                let _ = std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw);
                raw
            }
            "nifti" => [&[0u8][..], &bytes].concat(),
            "metaimage" | "nrrd" if name.ends_with(".mhd") || name.ends_with(".nhdr") => {
                let data_file = String::from_utf8_lossy(&bytes).lines().find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("ElementDataFile").or_else(|| l.strip_prefix("data file:")).map(|v| v.trim_start_matches([' ', '=', ':']).trim().to_string())
                });
                let data = data_file.and_then(|d| std::fs::read(f.with_file_name(d)).ok()).unwrap_or_default();
                [&bytes[..], DATA_MARK, &data].concat()
            }
            _ => bytes,
        };
        if seed.len() <= MAX_SEED {
            out.push(seed);
        }
    }
    match target {
        "safetensors" => {
            let l = layout();
            if let Ok(b) = crate::checkpoint::tensors_bytes(&l.tensors, &vec![0.5; l.len], Default::default()) {
                out.push(b);
            }
        }
        "splits" => {
            let ids: Vec<String> = (0..6).map(|i| format!("case_{i:04}")).collect();
            if let Ok(s) = crate::preprocess::splits::kfold(&ids, 5, 12345) {
                out.push(serde_json::to_vec(&s).unwrap_or_default());
            }
        }
        _ => {}
    }
    out.dedup();
    out
}
