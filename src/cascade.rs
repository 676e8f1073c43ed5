//! nnU-Net's cascade: 3d_lowres's predictions become extra inputs of 3d_cascade_fullres, one
//! one-hot channel per foreground label. Training takes the lowres model's cross-validation
//! predictions (its fold validations write them into MODEL/predicted_next_stage/NEXT/, as
//! nnU-Net's do), brought onto the full-resolution store grid once and memory-mapped;
//! prediction takes a folder of the lowres model's label maps (`--prev-stage-predictions`).
//!
//! Deviation, said where the user sees it: nnU-Net's validation resamples the lowres logits to
//! the next stage's grid before the argmax; segk writes the exported label maps (on the input's
//! grid) and brings them onto the store grid as nnU-Net's prediction does with
//! `-prev_stage_predictions`, so training and prediction see their inputs made the same way.

use crate::plan::plans_json::PlansJson;
use crate::store::StoredCase;
use anyhow::{ensure, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// The folder a model's validation writes the next stage's inputs into (nnU-Net's name).
pub const NEXT_STAGE_DIR: &str = "predicted_next_stage";

/// The configuration whose predictions `configuration` takes (its plans' previous_stage).
pub fn previous_stage(plans: &PlansJson, configuration: &str) -> Result<Option<String>> {
    Ok(crate::plan::nnunet::resolve(plans, configuration)?.previous_stage)
}

/// The configurations that take `configuration`'s predictions.
pub fn next_stages(plans: &PlansJson, configuration: &str) -> Vec<String> {
    plans.configurations.keys().filter(|c| previous_stage(plans, c).ok().flatten().as_deref() == Some(configuration)).map(str::to_string).collect()
}

/// Where a model folder's validation writes its predictions for `next`.
pub fn next_stage_dir(model_dir: &Path, next: &str) -> PathBuf {
    model_dir.join(NEXT_STAGE_DIR).join(next)
}

fn prev_file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.prev"))
}

/// Brings the previous stage's label map of each of `ids` onto its stored grid (`store`) into
/// `out`; cases already there are kept. Names the case a map is missing for.
pub fn prepare(store: &Path, ids: &[String], source: &Path, ending: &str, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for id in ids {
        let header = StoredCase::open(store, id)?.header;
        let dst = prev_file(out, id);
        let path = source.join(format!("{id}{ending}"));
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        // Stale when the lowres prediction or the stored case (its grid) is newer.
        let newest_input = modified(&path).max(modified(&store.join(format!("{id}.seg"))));
        let current = std::fs::metadata(&dst).is_ok_and(|m| m.len() as usize == header.voxels()) && modified(&dst) >= newest_input;
        if current {
            continue;
        }
        ensure!(path.is_file(), "{}: missing: the previous stage's prediction of case {id} (train every fold of the previous stage with its validation, which writes them)", path.display());
        let vol = crate::imageio::read(&path)?;
        let g = &header.geometry;
        ensure!(vol.shape == g.original_shape, "{}: shape {:?}, the case's image has {:?}", path.display(), vol.shape, g.original_shape);
        let raw = crate::preprocess::labels_of(&vol, &path)?;
        let grid: Vec<u8> = g.labels_onto_grid(&raw).iter().map(|&l| l.clamp(0, 254) as u8).collect();
        crate::store::write_atomic_via(&dst, &format!(".{}.tmp", std::process::id()), |w| std::io::Write::write_all(w, &grid))?;
    }
    Ok(())
}

/// The previous stage's maps (`CASE.prev`, u8, on each case's stored grid) of `ids`,
/// memory-mapped, in order.
pub fn open(dir: &Path, ids: &[String]) -> Result<Vec<Mmap>> {
    ids.iter().map(|id| crate::store::map(&prev_file(dir, id))).collect()
}

/// A label map of another model on `image`'s grid as one-hot channels on the stored grid of
/// `geometry` (prediction of a cascade net).
pub fn one_hot_channels(path: &Path, image_shape: [usize; 3], geometry: &crate::preprocess::geometry::Geometry, labels: &[i64]) -> Result<Vec<Vec<f32>>> {
    ensure!(path.is_file(), "{}: missing: the previous stage's prediction of this case", path.display());
    let vol = crate::imageio::read(path)?;
    ensure!(vol.shape == image_shape, "{}: shape {:?}, the image has {:?}", path.display(), vol.shape, image_shape);
    let grid = geometry.labels_onto_grid(&crate::preprocess::labels_of(&vol, path)?);
    let mut flat = vec![0.0f32; labels.len() * grid.len()];
    crate::loader::cascade::one_hot(&grid, labels, &mut flat);
    Ok(flat.chunks(grid.len().max(1)).map(<[f32]>::to_vec).collect())
}
