//! Feature matrices (frames x dimensions) and per-utterance normalisation.

use serde::{Deserialize, Serialize};

use super::AudioError;

/// A row-major matrix of feature frames: `frames()` rows of `dims()` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    data: Vec<f32>,
    dims: usize,
}

impl Features {
    /// Wraps row-major data; `data.len()` must be a multiple of `dims` (and `dims > 0`).
    pub fn new(data: Vec<f32>, dims: usize) -> Result<Self, AudioError> {
        if dims == 0 || !data.len().is_multiple_of(dims) {
            return Err(AudioError::Shape(format!(
                "{} values do not form rows of {dims}",
                data.len()
            )));
        }
        Ok(Self { data, dims })
    }

    /// Number of frames (rows).
    pub fn frames(&self) -> usize {
        self.data.len() / self.dims
    }

    /// Values per frame (columns).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// True when there are no frames.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One frame.
    ///
    /// # Panics
    /// When `i >= self.frames()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dims..(i + 1) * self.dims]
    }

    /// One frame, mutable.
    ///
    /// # Panics
    /// When `i >= self.frames()`.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.dims..(i + 1) * self.dims]
    }

    /// Iterates over frames.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.dims)
    }

    /// The row-major data.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The row-major data, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the matrix, returning its row-major data.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Averages non-overlapping groups of `pool` consecutive frames (the last group may be
    /// shorter and is averaged over the frames it has). `pool <= 1` returns a copy.
    pub fn pooled(&self, pool: usize) -> Features {
        if pool <= 1 {
            return self.clone();
        }
        let mut out = Vec::with_capacity(self.frames().div_ceil(pool) * self.dims);
        for group in self.data.chunks(pool * self.dims) {
            let n = group.len() / self.dims;
            let inv = 1.0 / n as f32;
            let start = out.len();
            out.extend_from_slice(&group[..self.dims]);
            for row in group.chunks_exact(self.dims).skip(1) {
                for (o, v) in out[start..].iter_mut().zip(row) {
                    *o += v;
                }
            }
            for o in &mut out[start..] {
                *o *= inv;
            }
        }
        Features {
            data: out,
            dims: self.dims,
        }
    }
}

/// Per-utterance normalisation of each feature dimension.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Normalisation {
    /// Leave the features as they are.
    None,
    /// Subtract each dimension's mean over the utterance.
    Mean,
    /// Subtract each dimension's mean and divide by `max(std, std_floor)`.
    MeanVariance {
        /// Lower bound on the standard deviation, so near-constant dimensions (e.g. mel bands
        /// above the band limit of 8 kHz recordings) are not blown up into noise.
        std_floor: f32,
    },
}

/// Normalises `features` in place over its frames (see [`Normalisation`]).
pub fn normalise(features: &mut Features, how: Normalisation) {
    let n = features.frames();
    if n == 0 || how == Normalisation::None {
        return;
    }
    let dims = features.dims();
    let mut mean = vec![0f64; dims];
    for row in features.rows() {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    let inv_n = 1.0 / n as f64;
    mean.iter_mut().for_each(|m| *m *= inv_n);
    let scale: Vec<f64> = match how {
        Normalisation::MeanVariance { std_floor } => {
            let mut var = vec![0f64; dims];
            for row in features.rows() {
                for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
                    let d = f64::from(v) - m;
                    *s += d * d;
                }
            }
            var.iter()
                .map(|s| 1.0 / (s * inv_n).sqrt().max(f64::from(std_floor)).max(1e-12))
                .collect()
        }
        _ => vec![1.0; dims],
    };
    for row in features.as_mut_slice().chunks_exact_mut(dims) {
        for ((v, m), s) in row.iter_mut().zip(&mean).zip(&scale) {
            *v = ((f64::from(*v) - m) * s) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_averages_groups() {
        let f = Features::new(vec![1.0, 10.0, 3.0, 20.0, 5.0, 60.0], 2).unwrap();
        let p = f.pooled(2);
        assert_eq!(p.as_slice(), &[2.0, 15.0, 5.0, 60.0]);
        assert_eq!(f.pooled(1), f);
    }

    #[test]
    fn mean_variance_hand_checked() {
        // Column 0: 1, 3 -> mean 2, std 1. Column 1 constant 5 -> std 0, floored to 0.5.
        let mut f = Features::new(vec![1.0, 5.0, 3.0, 5.0], 2).unwrap();
        normalise(&mut f, Normalisation::MeanVariance { std_floor: 0.5 });
        assert_eq!(f.as_slice(), &[-1.0, 0.0, 1.0, 0.0]);
        let mut g = Features::new(vec![1.0, 5.0, 3.0, 7.0], 2).unwrap();
        normalise(&mut g, Normalisation::Mean);
        assert_eq!(g.as_slice(), &[-1.0, -1.0, 1.0, 1.0]);
    }

    #[test]
    fn bad_shape_is_error() {
        assert!(Features::new(vec![1.0; 5], 2).is_err());
        assert!(Features::new(vec![], 0).is_err());
    }
}
