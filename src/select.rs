//! `segk find-best-configuration`: nnU-Net's model selection. Each configuration's folds'
//! validation predictions are gathered into `crossval_results_folds_F` and scored against the
//! references; every pair of configurations is ensembled fold by fold from the validation
//! probabilities (`segk train --npz`) and scored; the best (foreground mean Dice) gets its
//! postprocessing determined; `inference_information.json` and `inference_instructions.txt`
//! say what to run, as nnU-Net writes them (with segk's commands).

use crate::dataset::DatasetJson;
use crate::evaluate::evaluate_pairs;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// A trained configuration: trainer, plans and configuration (the model folder's name).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub trainer: String,
    pub plans: String,
    pub configuration: String,
}

impl Candidate {
    pub fn folder_name(&self) -> String {
        format!("{}__{}__{}", self.trainer, self.plans, self.configuration)
    }
}

/// nnU-Net's spelling of a fold list in folder names: `0_1_2_3_4`.
fn folds_string(folds: &[String]) -> String {
    folds.join("_")
}

/// Copies each fold's validation label maps into `merged` (emptied first, so nothing stale is
/// scored); returns each case with the validation folder that holds its probabilities.
fn accumulate(model: &Path, folds: &[String], merged: &Path, ending: &str) -> Result<Vec<(String, PathBuf)>> {
    if merged.exists() {
        std::fs::remove_dir_all(merged).with_context(|| format!("emptying {}", merged.display()))?;
    }
    std::fs::create_dir_all(merged).with_context(|| format!("creating {}", merged.display()))?;
    let mut cases: Vec<(String, PathBuf)> = Vec::new();
    for f in folds {
        let val = model.join(format!("fold_{f}")).join("validation");
        ensure!(val.is_dir(), "{}: no validation predictions (train fold {f} to the end, without --no-validation)", val.display());
        for case in crate::predict::names_in(&val, |n| n.strip_suffix(ending))? {
            if let Some((_, other)) = cases.iter().find(|(c, _)| *c == case) {
                anyhow::bail!("case {case} is predicted by two folds ({} and {}): the folds' splits overlap", other.display(), val.display());
            }
            let file = format!("{case}{ending}");
            std::fs::copy(val.join(&file), merged.join(&file)).with_context(|| format!("copying {} into {}", val.join(&file).display(), merged.display()))?;
            cases.push((case, val.clone()));
        }
    }
    for f in ["dataset.json", crate::predict::PLANS_FILE] {
        std::fs::copy(model.join(f), merged.join(f)).with_context(|| format!("copying {} into {}", model.join(f).display(), merged.display()))?;
    }
    cases.sort();
    Ok(cases)
}

/// The foreground mean Dice of the predictions in `folder` for `cases`, against `labels_tr`.
fn score(folder: &Path, cases: &[String], labels_tr: &Path, json: &DatasetJson) -> Result<f64> {
    let pairs: Vec<(PathBuf, PathBuf)> = cases.iter().map(|c| (folder.join(format!("{c}{}", json.file_ending)), labels_tr.join(format!("{c}{}", json.file_ending)))).collect();
    let s = evaluate_pairs(&pairs, Some(crate::experiment::foreground_labels(json)), json.ignore_label())?;
    std::fs::write(folder.join("summary.json"), serde_json::to_string_pretty(&s)?).with_context(|| format!("writing {}", folder.join("summary.json").display()))?;
    Ok(s.foreground_mean.dice.unwrap_or(0.0))
}

/// One scored entry: a configuration or an ensemble of two.
struct Scored {
    name: String,
    source: PathBuf,
    members: Vec<Candidate>,
    dice: f64,
}

/// Runs the selection for `candidates` (their model folders in `results`) on `folds`.
pub fn find_best(dataset: &str, results: &Path, labels_tr: &Path, candidates: &[Candidate], folds: &[String], allow_ensembling: bool) -> Result<serde_json::Value> {
    ensure!(!candidates.is_empty(), "no configurations to compare");
    let mut scored = Vec::new();
    let mut merged_cases = Vec::new();
    let mut json: Option<DatasetJson> = None;
    for c in candidates {
        let model = results.join(c.folder_name());
        ensure!(model.is_dir(), "{}: no such model folder: train {} (every fold of {}) first", model.display(), c.configuration, folds.join(" "));
        let j = crate::dataset::read_json(&model)?;
        let merged = model.join(format!("crossval_results_folds_{}", folds_string(folds)));
        let cases = accumulate(&model, folds, &merged, &j.file_ending)?;
        let names: Vec<String> = cases.iter().map(|(c, _)| c.clone()).collect();
        let dice = score(&merged, &names, labels_tr, &j)?;
        println!("  {}: foreground mean Dice {dice:.5} over {} cross-validation cases", c.folder_name(), cases.len());
        scored.push(Scored { name: c.folder_name(), source: merged.clone(), members: vec![c.clone()], dice });
        merged_cases.push((merged, cases));
        json.get_or_insert(j);
    }
    let json = json.expect("at least one candidate");
    if allow_ensembling {
        let head = crate::predict::export::Head::of(&json)?;
        for i in 0..candidates.len() {
            for k in i + 1..candidates.len() {
                let ((a, cases_a), (_, cases_b)) = (&merged_cases[i], &merged_cases[k]);
                let name = format!("ensemble___{}___{}___{}", candidates[i].folder_name(), candidates[k].folder_name(), folds_string(folds));
                // Each case's probabilities where its fold's validation left them, in both models.
                let sources: Option<Vec<(String, [PathBuf; 2])>> = cases_a
                    .iter()
                    .map(|(c, va)| cases_b.iter().find(|(d, _)| d == c).map(|(_, vb)| (c.clone(), [va.clone(), vb.clone()])))
                    .collect();
                let Some(sources) = sources.filter(|s| s.len() == cases_b.len() && s.iter().all(|(c, v)| v.iter().all(|d| d.join(format!("{c}.npz")).is_file()))) else {
                    println!("  {name}: skipped, the validation probabilities are missing or the folds differ (train with --npz, on the same folds)");
                    continue;
                };
                let out = results.join("ensembles").join(&name);
                if out.exists() {
                    std::fs::remove_dir_all(&out).with_context(|| format!("emptying {}", out.display()))?;
                }
                std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
                for (case, dirs) in &sources {
                    crate::ensemble::merge_case(dirs, case, &json.file_ending, &head, &out, false).with_context(|| format!("ensembling case {case}"))?;
                }
                let cases: Vec<String> = sources.iter().map(|(c, _)| c.clone()).collect();
                for f in ["dataset.json", crate::predict::PLANS_FILE] {
                    std::fs::copy(a.join(f), out.join(f)).with_context(|| format!("copying {} into {}", a.join(f).display(), out.display()))?;
                }
                let dice = score(&out, &cases, labels_tr, &json)?;
                println!("  {name}: foreground mean Dice {dice:.5}");
                scored.push(Scored { name, source: out, members: vec![candidates[i].clone(), candidates[k].clone()], dice });
            }
        }
    }
    // The first of equal scores, as nnU-Net takes it.
    let best = scored.iter().fold(&scored[0], |b, s| if s.dice > b.dice { s } else { b });
    println!("best: {} ({:.5}); determining its postprocessing", best.name, best.dice);
    let decision = crate::postprocess::determine(&best.source, labels_tr, &json)?;
    for line in &decision.log {
        println!("  {line}");
    }
    let pp_file = best.source.join("postprocessing.json");
    crate::postprocess::write_json(&pp_file, &decision)?;
    crate::postprocess::apply_folder(&best.source, &best.source.join("postprocessed"), &decision.steps, &json.file_ending)?;
    let info = serde_json::json!({
        "folds": folds,
        "dataset_name_or_id": dataset,
        "considered_models": candidates.iter().map(|c| serde_json::json!({"plans": c.plans, "configuration": c.configuration, "trainer": c.trainer})).collect::<Vec<_>>(),
        "ensembling_allowed": allow_ensembling,
        "all_results": scored.iter().map(|s| (s.name.clone(), serde_json::json!(s.dice))).collect::<serde_json::Map<_, _>>(),
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": best.dice,
            "result_on_crossval_post_pp": decision.after.1.dice,
            "postprocessing_file": pp_file.display().to_string(),
            "some_plans_file": best.source.join(crate::predict::PLANS_FILE).display().to_string(),
            "selected_model_or_models": best.members.iter().map(|c| serde_json::json!({"configuration": c.configuration, "trainer": c.trainer, "plans_identifier": c.plans})).collect::<Vec<_>>(),
        }
    });
    std::fs::write(results.join("inference_information.json"), serde_json::to_string_pretty(&info)?).with_context(|| format!("writing {}", results.join("inference_information.json").display()))?;
    // A cascade member predicts after its previous stage (its model folder's plans say which).
    let prev: Vec<Option<String>> = best
        .members
        .iter()
        .map(|m| {
            let plans = crate::plan::plans::read_nnunet_plans(&results.join(m.folder_name()).join(crate::predict::PLANS_FILE))?;
            crate::cascade::previous_stage(&plans, &m.configuration)
        })
        .collect::<Result<_>>()?;
    let text = instructions(dataset, &best.members, &prev, folds, &pp_file);
    std::fs::write(results.join("inference_instructions.txt"), &text).with_context(|| format!("writing {}", results.join("inference_instructions.txt").display()))?;
    print!("{text}");
    Ok(info)
}

/// What to run at inference, with segk's commands (nnU-Net's inference_instructions.txt).
fn instructions(dataset: &str, members: &[Candidate], prev: &[Option<String>], folds: &[String], pp_file: &Path) -> String {
    let mut t = String::from("***Run inference like this:***\n\n");
    let ensemble = members.len() > 1;
    if ensemble {
        t.push_str("An ensemble won! Run the following commands to predict with the ensemble members:\n\n");
    }
    let mut outputs = Vec::new();
    for (j, m) in members.iter().enumerate() {
        let out = if ensemble { format!("OUTPUT_FOLDER_MODEL_{}", j + 1) } else { "OUTPUT_FOLDER".to_string() };
        let probs = if ensemble { " --save-probabilities" } else { "" };
        // (nnU-Net 2.8.1 means to write the previous stage's command too, but its check never
        // matches; segk writes it.)
        let mut after = String::new();
        if let Some(p) = &prev[j] {
            let prev_out = format!("{out}_PREV_STAGE");
            t.push_str(&format!("segk predict -d {dataset} -i INPUT_FOLDER -o {prev_out} -f {} -tr {} -c {p} -p {}\n", folds.join(" "), m.trainer, m.plans));
            after = format!(" --prev-stage-predictions {prev_out}");
        }
        t.push_str(&format!("segk predict -d {dataset} -i INPUT_FOLDER -o {out} -f {} -tr {} -c {} -p {}{after}{probs}\n", folds.join(" "), m.trainer, m.configuration, m.plans));
        outputs.push(out);
    }
    if ensemble {
        t.push_str(&format!("\nThe ensemble:\n\nsegk ensemble -i {} -o OUTPUT_FOLDER\n", outputs.join(" ")));
    }
    t.push_str(&format!("\n***Once inference is completed, run postprocessing like this:***\n\nsegk postprocess -i OUTPUT_FOLDER -o OUTPUT_FOLDER_PP --pp-json {}\n", pp_file.display()));
    t
}
