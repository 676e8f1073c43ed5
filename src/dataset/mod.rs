//! nnU-Net v2 raw datasets: DatasetXXX_Name/{dataset.json, imagesTr/CASE_XXXX<ending>,
//! labelsTr/CASE<ending>, imagesTs/}. Read as nnU-Net users have them, no edits.

pub mod integrity;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A label's value: one integer, or a list of them (a region, nnU-Net's region training).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LabelValue {
    One(i64),
    Region(Vec<i64>),
}

/// The values one label stands for.
pub fn values_of(l: &LabelValue) -> Vec<i64> {
    match l {
        LabelValue::One(x) => vec![*x],
        LabelValue::Region(r) => r.clone(),
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct DatasetJson {
    /// Channel index ("0", "1", ...) -> modality name ("CT", "T2", ...).
    #[serde(alias = "modality")]
    pub channel_names: BTreeMap<String, String>,
    /// In the file's order: a region net's outputs follow it, as nnU-Net's.
    pub labels: crate::ordered::Ordered<LabelValue>,
    #[serde(rename = "numTraining")]
    pub num_training: usize,
    pub file_ending: String,
    #[serde(default)]
    pub regions_class_order: Option<Vec<i64>>,
    #[serde(default)]
    pub name: Option<String>,
    /// nnU-Net's choice of reader class; segk reads by file ending and accepts the classes
    /// whose reading it matches.
    #[serde(default)]
    pub overwrite_image_reader_writer: Option<String>,
}

/// nnU-Net's reader classes segk reads as they do (by file ending; a .tif of one page is a
/// picture, a stack a volume).
pub const READERS: [&str; 5] = ["SimpleITKIO", "NibabelIO", "NaturalImage2DIO", "Tiff3DIO", "None"];

impl DatasetJson {
    pub fn channels(&self) -> usize {
        self.channel_names.len()
    }
    /// Every integer value a label map may contain.
    pub fn label_values(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.labels.values().flat_map(values_of).collect();
        v.sort();
        v.dedup();
        v
    }
    /// Whether labels are regions (nnU-Net's region-based training): some label is a list.
    pub fn has_regions(&self) -> bool {
        self.labels.values().any(|v| matches!(v, LabelValue::Region(_)))
    }
    /// The foreground regions in the file's order (background and ignore aside), one output
    /// channel each, as nnU-Net's LabelManager.foreground_regions.
    pub fn regions(&self) -> Vec<Vec<i64>> {
        self.labels.iter().filter(|(k, _)| *k != "background" && *k != "ignore").map(|(_, v)| values_of(v)).collect()
    }
    /// Every label value but background and the ignore label, ascending (nnU-Net's
    /// LabelManager.foreground_labels).
    pub fn foreground_values(&self) -> Vec<i64> {
        let ignore = self.ignore_label();
        self.label_values().into_iter().filter(|&v| v != 0 && Some(v) != ignore).collect()
    }
    /// The "ignore" label's value, when the dataset declares one.
    pub fn ignore_label(&self) -> Option<i64> {
        match self.labels.get("ignore") {
            Some(LabelValue::One(v)) => Some(*v),
            _ => None,
        }
    }
}

/// The name of nnU-Net's reader class for this dataset (plans' image_reader_writer): the
/// dataset's own choice, else the one nnU-Net's registry picks for its file ending (for TIFF
/// by what `example`, a first image, holds: one page or a stack).
pub fn reader_writer(json: &DatasetJson, example: Option<&Path>) -> String {
    if let Some(r) = json.overwrite_image_reader_writer.as_deref().filter(|r| *r != "None") {
        return r.to_string();
    }
    let ending = json.file_ending.to_ascii_lowercase();
    match ending.as_str() {
        ".png" => "NaturalImage2DIO",
        ".nii" => "NibabelIO",
        ".tif" | ".tiff" => match example.and_then(|p| crate::imageio::read_channels(p).ok()) {
            Some(v) if matches!(v.header, crate::imageio::Header::Tiff3d { .. }) => "Tiff3DIO",
            _ => "NaturalImage2DIO",
        },
        _ => "SimpleITKIO",
    }
    .to_string()
}

/// One training case: its channel images in channel order and its label map.
#[derive(Clone, Debug)]
pub struct Case {
    pub id: String,
    pub images: Vec<PathBuf>,
    pub label: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub json: DatasetJson,
    pub cases: Vec<Case>,
}

/// Path of channel `c` of case `id` ("CASE_0000.nii.gz").
pub fn image_path(dir: &Path, id: &str, c: usize, ending: &str) -> PathBuf {
    dir.join(format!("{id}_{c:04}{ending}"))
}

/// An image file's stem (`CASE_0001`) as its case and channel: nnU-Net's four-digit suffix.
pub fn split_channel(stem: &str) -> Option<(&str, usize)> {
    let (id, c) = stem.rsplit_once('_')?;
    (c.len() == 4 && c.bytes().all(|d| d.is_ascii_digit())).then(|| (id, c.parse().unwrap_or(0)))
}

pub fn read_json(root: &Path) -> Result<DatasetJson> {
    read_json_file(&root.join("dataset.json"))
}

/// A dataset.json by its own path.
pub fn read_json_file(p: &Path) -> Result<DatasetJson> {
    let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    let mut json: DatasetJson = serde_json::from_str(&text)
        .map_err(|e| match e.to_string().contains("untagged enum LabelValue") {
            // serde's own words name a Rust type; say what the file must hold.
            true => anyhow::anyhow!("a label's value must be an integer or a list of integers (line {}, column {})", e.line(), e.column()),
            false => anyhow::Error::new(e),
        })
        .with_context(|| format!("{}: not a valid nnU-Net v2 dataset.json (needs channel_names, labels, numTraining, file_ending)", p.display()))?;
    if crate::imageio::format_of(&json.file_ending).is_none() || !json.file_ending.starts_with('.') {
        bail!("{}: file_ending {:?} is not a format segk reads ({})", p.display(), json.file_ending, crate::imageio::ENDINGS.join(", "));
    }
    if let Some(r) = json.overwrite_image_reader_writer.as_deref().filter(|r| !READERS.contains(r)) {
        bail!(
            "{}: overwrite_image_reader_writer {r:?} is not a reader segk can stand in for ({}); segk reads images by file_ending{}",
            p.display(),
            READERS[..4].join(", "),
            if r.contains("Reorient") { " and does not reorient them: drop the key, or reorient the images beforehand" } else { "" }
        );
    }
    // As nnU-Net: a list of one value is that label, not a region.
    for v in json.labels.values_mut() {
        if let LabelValue::Region(r) = v {
            if let [one] = r.as_slice() {
                *v = LabelValue::One(*one);
            }
        }
    }
    Ok(json)
}

/// Files in `dir` ending with `ending`, sorted.
pub fn files_with(dir: &Path, ending: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && p.to_string_lossy().ends_with(ending)).collect();
    v.sort();
    Ok(v)
}

/// The channel files in `dir` by case: ID -> channel number -> path (ID_XXXX<ending>).
pub fn channel_files(dir: &Path, ending: &str) -> Result<BTreeMap<String, BTreeMap<usize, PathBuf>>> {
    let mut out: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    for p in files_with(dir, ending)? {
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if let Some((id, c)) = split_channel(&name[..name.len() - ending.len()]) {
            out.entry(id.to_string()).or_default().insert(c, p.clone());
        }
    }
    Ok(out)
}

/// Datasets opened in this process (a command opens its dataset once; a test counts it).
static OPENS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times a dataset was opened in this process.
pub fn opens() -> usize {
    OPENS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Dataset {
    /// Reads dataset.json and pairs every label map in labelsTr with its channel images
    /// (missing images are left for the integrity check to report).
    pub fn open(root: &Path) -> Result<Dataset> {
        OPENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let json = read_json(root)?;
        if json.channels() == 0 {
            bail!("{}: channel_names is empty", root.join("dataset.json").display());
        }
        let ending = json.file_ending.clone();
        let (img_dir, lab_dir) = (root.join("imagesTr"), root.join("labelsTr"));
        // A missing imagesTr leaves every case's images missing, for the check to report.
        let mut images = if img_dir.is_dir() { channel_files(&img_dir, &ending)? } else { BTreeMap::new() };
        let mut cases = Vec::new();
        for label in files_with(&lab_dir, &ending)? {
            let name = label.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let id = name[..name.len() - ending.len()].to_string();
            // nnU-Net's listing: every ID_XXXX file of the case (an RGB picture holds three
            // channels in one); none at all leaves the expected names, for the check to report.
            let images = match images.remove(&id) {
                Some(found) => found.into_values().collect(),
                None => (0..json.channels()).map(|c| image_path(&img_dir, &id, c, &ending)).collect(),
            };
            cases.push(Case { id, images, label });
        }
        Ok(Dataset { root: root.to_path_buf(), json, cases })
    }
}
