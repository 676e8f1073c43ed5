//! Cross-validation splits, identical to nnU-Net's: scikit-learn's KFold(5, shuffle=True,
//! random_state=12345) over the case identifiers (sorted here; nnU-Net takes directory order,
//! which is sorted on most file systems). The shuffle is numpy's legacy RandomState: MT19937
//! seeded with init_genrand and a Fisher-Yates pass drawing masked 32-bit integers.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SEED: u32 = 12345;
pub const FOLDS: usize = 5;
/// nnU-Net's file name, so a split made by (or for) nnU-Net is used as it is.
pub const FILE: &str = "splits_final.json";

/// The Mersenne Twister MT19937, as numpy's RandomState(seed) runs it.
pub struct Mt19937 {
    mt: [u32; 624],
    i: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for k in 1..624 {
            mt[k] = 1_812_433_253u32.wrapping_mul(mt[k - 1] ^ (mt[k - 1] >> 30)).wrapping_add(k as u32);
        }
        Mt19937 { mt, i: 624 }
    }
    fn twist(&mut self) {
        for k in 0..624 {
            let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
            self.mt[k] = self.mt[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
        }
        self.i = 0;
    }
    pub fn next_u32(&mut self) -> u32 {
        if self.i >= 624 {
            self.twist();
        }
        let mut y = self.mt[self.i];
        self.i += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
    /// numpy's legacy random_interval: uniform in 0..=max by masked rejection.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16] {
            mask |= mask >> s;
        }
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }
    /// numpy's RandomState.shuffle of a 1-D array.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.interval(i as u32) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Split {
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// KFold(n_splits, shuffle=True, random_state=seed).split over `ids` (taken in the order
/// given): validation folds are consecutive runs of the shuffled indices, the first
/// n % k of them one longer; both lists come out in the original order, as sklearn's do.
pub fn kfold(ids: &[String], folds: usize, seed: u32) -> Result<Vec<Split>> {
    if ids.len() < folds {
        bail!("{} cases cannot make {folds} folds (use fold `all`, or add cases)", ids.len());
    }
    let mut idx: Vec<usize> = (0..ids.len()).collect();
    Mt19937::new(seed).shuffle(&mut idx);
    let mut splits = Vec::with_capacity(folds);
    let mut start = 0;
    for f in 0..folds {
        let len = ids.len() / folds + usize::from(f < ids.len() % folds);
        let val_idx = &idx[start..start + len];
        start += len;
        let mut in_val = vec![false; ids.len()];
        val_idx.iter().for_each(|&i| in_val[i] = true);
        splits.push(Split {
            train: (0..ids.len()).filter(|&i| !in_val[i]).map(|i| ids[i].clone()).collect(),
            val: (0..ids.len()).filter(|&i| in_val[i]).map(|i| ids[i].clone()).collect(),
        });
    }
    Ok(splits)
}

/// Which cases a run trains on: one fold of the split, or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    Index(usize),
    /// nnU-Net's `all`: train on every case; validation is the training set.
    All,
}

impl std::str::FromStr for Fold {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Fold> {
        if s == "all" {
            return Ok(Fold::All);
        }
        s.parse().map(Fold::Index).map_err(|_| anyhow::anyhow!("fold must be a number or `all`, not {s:?}"))
    }
}

/// The (train, val) identifiers of a fold.
pub fn select(splits: &[Split], ids: &[String], fold: Fold) -> Result<Split> {
    match fold {
        Fold::All => Ok(Split { train: ids.to_vec(), val: ids.to_vec() }),
        Fold::Index(k) => splits.get(k).cloned().with_context(|| format!("fold {k} does not exist: the split has {} folds", splits.len())),
    }
}

/// A split users may have written by hand: every fold trains and validates on something, and
/// only on cases the dataset has.
fn check_cases(splits: &[Split], ids: &[String]) -> Result<()> {
    let known: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    for (k, s) in splits.iter().enumerate() {
        for (what, list) in [("train", &s.train), ("val", &s.val)] {
            anyhow::ensure!(!list.is_empty(), "fold {k}: \"{what}\" is empty");
            let unknown: Vec<&str> = list.iter().map(String::as_str).filter(|c| !known.contains(c)).collect();
            anyhow::ensure!(unknown.is_empty(), "fold {k}: \"{what}\" names cases the dataset does not have: {}", unknown.join(", "));
        }
    }
    Ok(())
}

/// Reads `dir/splits_final.json`, or writes nnU-Net's 5-fold split of `ids` there when it
/// is missing (an existing file is never overwritten: it may be the user's own).
pub fn load_or_create(dir: &Path, ids: &[String]) -> Result<Vec<Split>> {
    let path = dir.join(FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let splits: Vec<Split> = serde_json::from_str(&text).with_context(|| format!("{}: not a list of {{\"train\": [...], \"val\": [...]}}", path.display()))?;
        check_cases(&splits, ids).with_context(|| format!("{}", path.display()))?;
        return Ok(splits);
    }
    let splits = kfold(ids, FOLDS, SEED)?;
    crate::store::write_json_atomic(&path, &splits)?;
    Ok(splits)
}
