//! Discrete speech units: a k-means codebook over pooled log-mel frames.
//!
//! Audio -> normalised log-mel ([`crate::audio::FrontEnd`]) -> averages of `pool` consecutive
//! frames -> nearest centroid -> repeats collapsed. The codebook file (`units.json`, next to
//! the model) stores the front-end configuration too, so encoding always uses the features the
//! codebook was fitted on. Fitting is deterministic given the seed: k-means++ seeding with
//! ChaCha8, Lloyd iterations whose sums are reduced in a fixed order whatever the thread count.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::tasks::Corpus;
use super::SpeechError;
use crate::audio::{Audio, Features, FrontEnd, FrontEndConfig};

/// File name of the codebook inside a model directory.
pub const CODEBOOK_FILE: &str = "units.json";

/// Default number of units.
pub const DEFAULT_UNITS: usize = 128;

/// Default number of log-mel frames averaged into one unit frame (2 x 10 ms).
pub const DEFAULT_POOL: usize = 2;

const FORMAT: &str = "leaf-units";
const VERSION: u32 = 1;

/// Points per work item in the assignment step; fixed so results do not depend on threads.
const CHUNK: usize = 4096;

/// k-means settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KMeansConfig {
    /// Number of centroids (units).
    pub k: usize,
    /// Seed of the k-means++ draws and of the frame subsample.
    pub seed: u64,
    /// Most Lloyd iterations.
    pub max_iters: usize,
    /// Stop when the mean squared distance improves by less than this fraction.
    pub tolerance: f64,
    /// Fit on at most this many frames (a seeded subsample when there are more).
    pub max_frames: usize,
    /// Worker threads (0 = available parallelism). Does not change the result.
    pub threads: usize,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: DEFAULT_UNITS,
            seed: 0,
            max_iters: 50,
            tolerance: 1e-4,
            max_frames: 200_000,
            threads: 0,
        }
    }
}

/// How a fit went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// Frames the centroids were fitted on.
    pub frames: usize,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Mean squared distance of a frame to its centroid at the end.
    pub inertia: f64,
    /// Whether the tolerance was reached before `max_iters`.
    pub converged: bool,
    /// The seed used.
    pub seed: u64,
}

/// A fitted unit codebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    frontend: FrontEndConfig,
    pool: usize,
    k: usize,
    dims: usize,
    centroids: Vec<f32>,
    norms: Vec<f32>,
    report: Option<FitReport>,
}

#[derive(Serialize, Deserialize)]
struct CodebookFile {
    format: String,
    version: u32,
    k: usize,
    dims: usize,
    pool: usize,
    frontend: FrontEndConfig,
    #[serde(default)]
    fit: Option<FitReport>,
    centroids: Vec<Vec<f32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Nearest centroid by `|c|^2 - 2 x.c` (the `|x|^2` term is common); ties go to the lower index.
fn nearest(x: &[f32], centroids: &[f32], norms: &[f32], dims: usize) -> (u32, f32) {
    let mut best = (0u32, f32::INFINITY);
    for (j, (c, n)) in centroids.chunks_exact(dims).zip(norms).enumerate() {
        let score = n - 2.0 * dot(x, c);
        if score < best.1 {
            best = (j as u32, score);
        }
    }
    best
}

fn norms_of(centroids: &[f32], dims: usize) -> Vec<f32> {
    centroids.chunks_exact(dims).map(|c| dot(c, c)).collect()
}

pub(crate) fn thread_count(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Runs `f` on every chunk index in `0..n_chunks` over `threads` workers; results in chunk order.
pub(crate) fn par_chunks<T: Send>(
    n_chunks: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let threads = threads.clamp(1, n_chunks.max(1));
    if threads == 1 {
        return (0..n_chunks).map(f).collect();
    }
    let f = &f;
    let mut slots: Vec<Option<T>> = (0..n_chunks).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..n_chunks)
                        .step_by(threads)
                        .map(|c| (c, f(c)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            // A worker only panics if `f` does; re-raise it here.
            let done = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            for (c, v) in done {
                slots[c] = Some(v);
            }
        }
    });
    slots.into_iter().flatten().collect()
}

struct Step {
    sums: Vec<f64>,
    counts: Vec<u64>,
    dist: f64,
    changed: usize,
}

impl Codebook {
    /// Fits `config.k` centroids to the rows of `frames` (already pooled unit frames) and records
    /// the front-end configuration and pooling that produced them.
    ///
    /// Fails when there are fewer distinct frames than `k`, on non-finite values, or when
    /// `frames.dims()` differs from `frontend.n_mels`.
    pub fn fit(
        frames: &Features,
        frontend: FrontEndConfig,
        pool: usize,
        config: &KMeansConfig,
    ) -> Result<Codebook, SpeechError> {
        let dims = frames.dims();
        let k = config.k;
        if dims != frontend.n_mels {
            return Err(SpeechError::Codebook(format!(
                "frames have {dims} values, the front-end makes {}",
                frontend.n_mels
            )));
        }
        if k == 0 || pool == 0 {
            return Err(SpeechError::Config("k and pool must be positive".into()));
        }
        if frames.as_slice().iter().any(|v| !v.is_finite()) {
            return Err(SpeechError::Codebook(
                "a training frame is not finite".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        // Seeded subsample, kept in the original order.
        let data: Vec<f32> = if frames.frames() > config.max_frames && config.max_frames > 0 {
            let mut idx: Vec<usize> = (0..frames.frames()).collect();
            for i in 0..config.max_frames {
                let j = rng.random_range(i..idx.len());
                idx.swap(i, j);
            }
            idx.truncate(config.max_frames);
            idx.sort_unstable();
            idx.iter()
                .flat_map(|&i| frames.row(i).iter().copied())
                .collect()
        } else {
            frames.as_slice().to_vec()
        };
        let n = data.len() / dims;
        if n < k {
            return Err(SpeechError::Codebook(format!(
                "{n} frames cannot make {k} units"
            )));
        }
        let threads = thread_count(config.threads);
        let rows = |i: usize| &data[i * dims..(i + 1) * dims];

        // k-means++ seeding.
        let mut centroids = Vec::with_capacity(k * dims);
        let first = rng.random_range(0..n);
        centroids.extend_from_slice(rows(first));
        let n_chunks = n.div_ceil(CHUNK);
        let mut min_d: Vec<f32> = (0..n).map(|i| sq_dist(rows(i), rows(first))).collect();
        for c in 1..k {
            let total: f64 = min_d.iter().map(|&d| f64::from(d)).sum();
            if total <= 0.0 {
                return Err(SpeechError::Codebook(format!(
                    "only {c} distinct frames, fewer than k = {k}"
                )));
            }
            let target = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut pick = n - 1;
            for (i, &d) in min_d.iter().enumerate() {
                acc += f64::from(d);
                if acc > target && d > 0.0 {
                    pick = i;
                    break;
                }
            }
            if min_d[pick] <= 0.0 {
                // Rounding at the very end of the sum: take the last frame with distance.
                pick = min_d.iter().rposition(|&d| d > 0.0).unwrap_or(pick);
            }
            let new: Vec<f32> = rows(pick).to_vec();
            let updates = par_chunks(n_chunks, threads, |ch| {
                let (lo, hi) = (ch * CHUNK, ((ch + 1) * CHUNK).min(n));
                (lo..hi)
                    .map(|i| sq_dist(rows(i), &new).min(min_d[i]))
                    .collect::<Vec<f32>>()
            });
            min_d = updates.concat();
            centroids.extend_from_slice(&new);
        }

        // Lloyd iterations.
        let mut assign = vec![u32::MAX; n];
        let mut prev_inertia = f64::INFINITY;
        let mut report = FitReport {
            frames: n,
            iterations: 0,
            inertia: f64::NAN,
            converged: false,
            seed: config.seed,
        };
        for iter in 0..config.max_iters.max(1) {
            let norms = norms_of(&centroids, dims);
            let steps = par_chunks(n_chunks, threads, |ch| {
                let (lo, hi) = (ch * CHUNK, ((ch + 1) * CHUNK).min(n));
                let mut st = Step {
                    sums: vec![0.0; k * dims],
                    counts: vec![0; k],
                    dist: 0.0,
                    changed: 0,
                };
                let mut labels = Vec::with_capacity(hi - lo);
                for (i, &prev) in (lo..hi).zip(&assign[lo..hi]) {
                    let x = rows(i);
                    let (j, _) = nearest(x, &centroids, &norms, dims);
                    let ju = j as usize;
                    st.dist += f64::from(sq_dist(x, &centroids[ju * dims..(ju + 1) * dims]));
                    st.counts[ju] += 1;
                    for (s, &v) in st.sums[ju * dims..(ju + 1) * dims].iter_mut().zip(x) {
                        *s += f64::from(v);
                    }
                    if prev != j {
                        st.changed += 1;
                    }
                    labels.push(j);
                }
                (st, labels)
            });
            let mut total = Step {
                sums: vec![0.0; k * dims],
                counts: vec![0; k],
                dist: 0.0,
                changed: 0,
            };
            for (ch, (st, labels)) in steps.into_iter().enumerate() {
                total
                    .sums
                    .iter_mut()
                    .zip(&st.sums)
                    .for_each(|(a, b)| *a += b);
                total
                    .counts
                    .iter_mut()
                    .zip(&st.counts)
                    .for_each(|(a, b)| *a += b);
                total.dist += st.dist;
                total.changed += st.changed;
                assign[ch * CHUNK..ch * CHUNK + labels.len()].copy_from_slice(&labels);
            }
            let inertia = total.dist / n as f64;
            report.iterations = iter + 1;
            report.inertia = inertia;

            // New centroids; an empty cluster takes the frame farthest from its centroid.
            let mut taken = vec![false; n];
            for j in 0..k {
                let c = &mut centroids[j * dims..(j + 1) * dims];
                if total.counts[j] > 0 {
                    let inv = 1.0 / total.counts[j] as f64;
                    for (cv, s) in c.iter_mut().zip(&total.sums[j * dims..(j + 1) * dims]) {
                        *cv = (s * inv) as f32;
                    }
                }
            }
            for j in 0..k {
                if total.counts[j] == 0 {
                    let far = (0..n)
                        .filter(|&i| !taken[i])
                        .map(|i| {
                            let a = assign[i] as usize;
                            (i, sq_dist(rows(i), &centroids[a * dims..(a + 1) * dims]))
                        })
                        .fold(
                            (usize::MAX, -1f32),
                            |b, (i, d)| if d > b.1 { (i, d) } else { b },
                        );
                    if far.0 == usize::MAX {
                        return Err(SpeechError::Codebook("cannot re-seed an empty unit".into()));
                    }
                    taken[far.0] = true;
                    let src = rows(far.0).to_vec();
                    centroids[j * dims..(j + 1) * dims].copy_from_slice(&src);
                }
            }
            let empty = total.counts.contains(&0);
            let improved = (prev_inertia - inertia) / prev_inertia.max(f64::MIN_POSITIVE);
            if !empty && (total.changed == 0 || (iter > 0 && improved < config.tolerance)) {
                report.converged = true;
                break;
            }
            prev_inertia = inertia;
        }
        let norms = norms_of(&centroids, dims);
        Ok(Codebook {
            frontend,
            pool,
            k,
            dims,
            centroids,
            norms,
            report: Some(report),
        })
    }

    /// A codebook from given centroids (`k` rows of `frontend.n_mels` values).
    pub fn from_centroids(
        centroids: Vec<f32>,
        k: usize,
        frontend: FrontEndConfig,
        pool: usize,
    ) -> Result<Codebook, SpeechError> {
        frontend.validate()?;
        let dims = frontend.n_mels;
        if k == 0 || pool == 0 || centroids.len() != k * dims {
            return Err(SpeechError::Codebook(format!(
                "{} centroid values for k = {k} x {dims} dims (pool {pool})",
                centroids.len()
            )));
        }
        if centroids.iter().any(|v| !v.is_finite()) {
            return Err(SpeechError::Codebook("a centroid is not finite".into()));
        }
        let norms = norms_of(&centroids, dims);
        Ok(Codebook {
            frontend,
            pool,
            k,
            dims,
            centroids,
            norms,
            report: None,
        })
    }

    /// Number of units.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Values per centroid.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Log-mel frames averaged per unit frame.
    pub fn pool(&self) -> usize {
        self.pool
    }

    /// The front-end configuration the codebook was fitted with.
    pub fn frontend_config(&self) -> &FrontEndConfig {
        &self.frontend
    }

    /// All centroids, row-major (`k * dims`).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// How the fit went (`None` for a codebook built from given centroids).
    pub fn report(&self) -> Option<&FitReport> {
        self.report.as_ref()
    }

    /// The unit of one pooled frame.
    pub fn nearest(&self, frame: &[f32]) -> Result<u32, SpeechError> {
        if frame.len() != self.dims {
            return Err(SpeechError::Codebook(format!(
                "frame has {} values, the codebook {}",
                frame.len(),
                self.dims
            )));
        }
        Ok(nearest(frame, &self.centroids, &self.norms, self.dims).0)
    }

    /// Units of every pooled frame of `features` (log-mel frames, pooled here), not collapsed.
    pub fn assign(&self, features: &Features) -> Result<Vec<u32>, SpeechError> {
        if features.dims() != self.dims {
            return Err(SpeechError::Codebook(format!(
                "features have {} values per frame, the codebook {}",
                features.dims(),
                self.dims
            )));
        }
        let pooled = features.pooled(self.pool);
        Ok(pooled
            .rows()
            .map(|x| nearest(x, &self.centroids, &self.norms, self.dims).0)
            .collect())
    }

    /// Writes the codebook as JSON (bit-exact floats).
    pub fn save(&self, path: &Path) -> Result<(), SpeechError> {
        let file = CodebookFile {
            format: FORMAT.into(),
            version: VERSION,
            k: self.k,
            dims: self.dims,
            pool: self.pool,
            frontend: self.frontend.clone(),
            fit: self.report.clone(),
            centroids: self
                .centroids
                .chunks_exact(self.dims)
                .map(<[f32]>::to_vec)
                .collect(),
        };
        let json = serde_json::to_string(&file)
            .map_err(|e| SpeechError::Codebook(format!("serialising: {e}")))?;
        std::fs::write(path, json).map_err(|source| SpeechError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a codebook written by [`Codebook::save`], validating every field.
    pub fn load(path: &Path) -> Result<Codebook, SpeechError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpeechError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| SpeechError::Codebook(format!("{}: {reason}", path.display()));
        let file: CodebookFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.format != FORMAT || file.version != VERSION {
            return Err(bad(format!(
                "format {} v{} is not {FORMAT} v{VERSION}",
                file.format, file.version
            )));
        }
        if file.centroids.len() != file.k
            || file.centroids.iter().any(|c| c.len() != file.dims)
            || file.dims != file.frontend.n_mels
        {
            return Err(bad(format!(
                "centroids do not form {} rows of {} = n_mels {}",
                file.k, file.dims, file.frontend.n_mels
            )));
        }
        let mut cb =
            Codebook::from_centroids(file.centroids.concat(), file.k, file.frontend, file.pool)
                .map_err(|e| bad(e.to_string()))?;
        cb.report = file.fit;
        Ok(cb)
    }
}

/// Drops consecutive repeats: `[3, 3, 7, 7, 7, 3]` -> `[3, 7, 3]`.
pub fn collapse(units: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(units.len());
    for &u in units {
        if out.last() != Some(&u) {
            out.push(u);
        }
    }
    out
}

/// Front-end plus codebook: audio in, unit sequence out. `Send + Sync`.
#[derive(Debug, Clone)]
pub struct UnitEncoder {
    frontend: FrontEnd,
    codebook: Codebook,
}

impl UnitEncoder {
    /// Builds the front-end the codebook was fitted with.
    pub fn new(codebook: Codebook) -> Result<Self, SpeechError> {
        let frontend = FrontEnd::new(codebook.frontend_config().clone())?;
        Ok(Self { frontend, codebook })
    }

    /// Loads a codebook file and builds its front-end.
    pub fn load(path: &Path) -> Result<Self, SpeechError> {
        Self::new(Codebook::load(path)?)
    }

    /// The front-end.
    pub fn frontend(&self) -> &FrontEnd {
        &self.frontend
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// Collapsed units of normalised log-mel features.
    pub fn units_from_features(&self, features: &Features) -> Result<Vec<u32>, SpeechError> {
        Ok(collapse(&self.codebook.assign(features)?))
    }

    /// Units of audio before collapsing repeats (one per pooled frame).
    pub fn frame_units(&self, audio: &Audio) -> Result<Vec<u32>, SpeechError> {
        self.codebook.assign(&self.frontend.features(audio)?)
    }

    /// Collapsed units of audio.
    pub fn units(&self, audio: &Audio) -> Result<Vec<u32>, SpeechError> {
        Ok(collapse(&self.frame_units(audio)?))
    }

    /// Collapsed units of a WAV file in memory (the serving path).
    pub fn units_from_wav(&self, wav: &[u8]) -> Result<Vec<u32>, SpeechError> {
        self.units(&self.frontend.decode(wav)?)
    }
}

/// Pooled features of every clip of `corpus`, one matrix (rows in clip order). Clips are
/// featurised on `threads` workers (0 = available parallelism); the result does not depend on it.
pub fn corpus_frames(
    corpus: &Corpus,
    frontend: &FrontEnd,
    pool: usize,
    threads: usize,
) -> Result<Features, SpeechError> {
    const CLIPS_PER_CHUNK: usize = 32;
    let n_chunks = corpus.len().div_ceil(CLIPS_PER_CHUNK);
    let parts = par_chunks(n_chunks, thread_count(threads), |ch| {
        let lo = ch * CLIPS_PER_CHUNK;
        let hi = (lo + CLIPS_PER_CHUNK).min(corpus.len());
        let mut out = Vec::new();
        for i in lo..hi {
            let audio = corpus.clip_audio(i)?;
            let f = frontend
                .features(&audio)
                .map_err(|source| SpeechError::ClipAudio {
                    path: corpus.clips()[i].path.clone(),
                    source,
                })?;
            out.extend_from_slice(f.pooled(pool).as_slice());
        }
        Ok::<_, SpeechError>(out)
    });
    let mut data = Vec::new();
    for p in parts {
        data.extend_from_slice(&p?);
    }
    Ok(Features::new(data, frontend.dims())?)
}

/// Fits a codebook on every clip of `corpus` (pass the training split).
pub fn fit_corpus(
    corpus: &Corpus,
    frontend: &FrontEnd,
    pool: usize,
    config: &KMeansConfig,
) -> Result<Codebook, SpeechError> {
    let frames = corpus_frames(corpus, frontend, pool, config.threads)?;
    Codebook::fit(&frames, frontend.config().clone(), pool, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_hand_checked() {
        assert_eq!(collapse(&[3, 3, 7, 7, 7, 3]), vec![3, 7, 3]);
        assert_eq!(collapse(&[]), Vec::<u32>::new());
        assert_eq!(collapse(&[1]), vec![1]);
        assert_eq!(collapse(&[1, 2, 3]), vec![1, 2, 3]);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..83).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..83).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x * y)).sum();
        assert!((f64::from(dot(&a, &b)) - naive).abs() < 1e-4);
    }

    #[test]
    fn par_chunks_keeps_order() {
        let v = par_chunks(10, 3, |c| c * 2);
        assert_eq!(v, (0..10).map(|c| c * 2).collect::<Vec<_>>());
    }
}
