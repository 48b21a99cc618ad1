//! `leaf compare`: LEAF against GRPO with the same base model, traffic, rollout budget, LoRA
//! rank and learning rate, over several seeds.
//!
//! Every (estimator, seed) pair is one [`super::run::run`] into `OUT/{estimator}-seed{seed}`
//! (seed `s` drives the traffic order, sampling and LoRA initialisation; the held-out examples
//! are the same for all). The curves of one estimator are aligned by check index (every run
//! checks after the same number of updates) and summarised by their mean and their spread
//! (sample standard deviation; the figure's band is min..max). Writes `compare.json`,
//! `compare.md` and `compare.png`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plot::{draw_panels, Panel, Series};
use super::report::{write_json, ForkSummary, RunReport};
use super::run::{run, Estimator, EvalDecoding, RunConfig};
use super::JobError;
use crate::advantage::ForkStats;
use crate::speech::eval::EvalReport;
use crate::speech::pretrain::{default_data_dir, ensure_default_model};
use crate::speech::tasks::TaskFamily;

/// Settings of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareConfig {
    /// The settings shared by every run (its `out`, `seed`, `estimator`, `resume` and
    /// `overwrite` are set per run).
    pub run: RunConfig,
    /// Seeds 0..seeds.
    pub seeds: u64,
    /// The estimators compared.
    pub estimators: Vec<Estimator>,
    /// The output directory.
    pub out: PathBuf,
}

/// Mean and spread of some values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for fewer than two values).
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of values.
    pub n: usize,
    /// Half-width of the 95 % confidence interval of the mean (Student's t with n - 1
    /// degrees of freedom; 0 for fewer than two values).
    #[serde(default)]
    pub ci95: f64,
}

/// The two-sided 97.5 % quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        d if d <= 30 => TABLE[d - 1],
        _ => 1.960,
    }
}

impl Spread {
    /// The spread of `values` (all zero for none).
    pub fn of(values: &[f64]) -> Spread {
        let n = values.len();
        if n == 0 {
            return Spread::default();
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n < 2 {
            0.0
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        Spread {
            mean,
            std,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n,
            ci95: if n < 2 {
                0.0
            } else {
                t975(n - 1) * std / (n as f64).sqrt()
            },
        }
    }
}

/// One aligned point of an estimator's curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryPoint {
    /// Mean rollouts at this check.
    pub rollouts: f64,
    /// Held-out reward over seeds.
    pub reward: Spread,
    /// Held-out exact match over seeds.
    pub exact_match: Spread,
    /// Per family: reward over seeds.
    pub family_reward: BTreeMap<String, Spread>,
    /// Per family: exact match over seeds.
    pub family_exact: BTreeMap<String, Spread>,
}

/// One estimator over every seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimatorSummary {
    /// `"leaf"` or `"grpo"`.
    pub estimator: String,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Base model's held-out reward (the same for every seed).
    pub base_reward: f64,
    /// Base model's held-out exact match.
    pub base_exact_match: f64,
    /// Final adapter's held-out reward over seeds (final evaluation).
    pub final_reward: Spread,
    /// Final adapter's exact match over seeds.
    pub final_exact_match: Spread,
    /// Per family: final exact match over seeds.
    pub final_family_exact: BTreeMap<String, Spread>,
    /// Per family: final reward over seeds.
    pub final_family_reward: BTreeMap<String, Spread>,
    /// The same base/final comparison under the decoding the runs did not gate on.
    pub other: OtherSummary,
    /// Fork statistics summed over seeds.
    pub fork_stats: ForkSummary,
    /// Swaps over seeds.
    pub swaps: Spread,
    /// Rollbacks over seeds.
    pub rollbacks: Spread,
    /// Wall seconds per run.
    pub wall_seconds: Spread,
    /// The aligned curve.
    pub curve: Vec<SummaryPoint>,
    /// Greedy exact match of the short and the long families, held-out takes of the heard
    /// speakers and the unheard speaker, base and final.
    #[serde(default)]
    pub greedy: Vec<GreedyRow>,
}

/// Greedy exact match (mean over the families of one length class) of the base model and of
/// the final adapters over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GreedyRow {
    /// `"short"` or `"long"`.
    pub families: String,
    /// `"held-out takes"` (heard speakers) or `"unheard speaker"`.
    pub speakers: String,
    /// The base model.
    pub base: f64,
    /// The final adapters over seeds.
    pub last: Spread,
}

/// The greedy evaluations (base, final) of a run, whichever decoding it gated on.
fn greedy_evals(r: &RunReport) -> (&EvalReport, &EvalReport) {
    match r.eval_decoding {
        EvalDecoding::Greedy => (&r.base_eval, &r.final_eval),
        EvalDecoding::Serving => (&r.other_decoding.base_eval, &r.other_decoding.final_eval),
    }
}

/// Mean exact match over the long (or short) families of a speaker group of `eval`.
fn class_exact(eval: &EvalReport, long: bool, unheard: bool) -> Option<f64> {
    let group = if unheard {
        eval.holdout.as_ref()?
    } else {
        &eval.in_speaker
    };
    let v: Vec<f64> = TaskFamily::ALL
        .iter()
        .filter(|f| f.is_long() == long)
        .filter_map(|f| group.tasks.get(f.name()).map(|s| s.exact_match))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn greedy_rows(reports: &[&RunReport]) -> Vec<GreedyRow> {
    let mut rows = Vec::new();
    for (long, families) in [(false, "short"), (true, "long")] {
        for (unheard, speakers) in [(false, "held-out takes"), (true, "unheard speaker")] {
            let base: Vec<f64> = reports
                .iter()
                .filter_map(|r| class_exact(greedy_evals(r).0, long, unheard))
                .collect();
            let last: Vec<f64> = reports
                .iter()
                .filter_map(|r| class_exact(greedy_evals(r).1, long, unheard))
                .collect();
            if last.is_empty() {
                continue;
            }
            rows.push(GreedyRow {
                families: families.into(),
                speakers: speakers.into(),
                base: Spread::of(&base).mean,
                last: Spread::of(&last),
            });
        }
    }
    rows
}

/// Base and final figures under the other decoding (see [`RunReport::other_decoding`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherSummary {
    /// Which decoding (`"greedy"` when the runs evaluate as they serve).
    pub decoding: String,
    /// Base model's held-out reward.
    pub base_reward: f64,
    /// Base model's held-out exact match.
    pub base_exact_match: f64,
    /// Final adapter's held-out reward over seeds.
    pub final_reward: Spread,
    /// Final adapter's held-out exact match over seeds.
    pub final_exact_match: Spread,
}

/// One run of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Estimator.
    pub estimator: String,
    /// Seed.
    pub seed: u64,
    /// Its `report.json`.
    pub report: PathBuf,
    /// Held-out reward of the final adapter.
    pub final_reward: f64,
    /// Held-out exact match of the final adapter.
    pub final_exact_match: f64,
    /// Rollouts trained on.
    pub rollouts: u64,
    /// Swaps.
    pub swaps: u64,
}

/// `compare.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// The shared settings.
    pub settings: RunConfig,
    /// Every run.
    pub runs: Vec<RunSummary>,
    /// Per estimator.
    pub summary: Vec<EstimatorSummary>,
    /// Seconds of the whole comparison.
    pub wall_seconds: f64,
}

fn families(reports: &[&RunReport]) -> Vec<String> {
    let mut f: Vec<String> = reports
        .iter()
        .flat_map(|r| r.final_eval.in_speaker.tasks.keys().cloned())
        .collect();
    f.sort();
    f.dedup();
    f
}

/// Summarises the runs of one estimator.
pub fn summarise(estimator: &str, seeds: &[u64], reports: &[&RunReport]) -> EstimatorSummary {
    let fams = families(reports);
    let spread = |f: &dyn Fn(&RunReport) -> f64| {
        Spread::of(&reports.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let fam_final = |exact: bool| -> BTreeMap<String, Spread> {
        fams.iter()
            .map(|k| {
                let v: Vec<f64> = reports
                    .iter()
                    .filter_map(|r| r.final_eval.in_speaker.tasks.get(k))
                    .map(|f| if exact { f.exact_match } else { f.bleu / 100.0 })
                    .collect();
                (k.clone(), Spread::of(&v))
            })
            .collect()
    };
    let mut forks = ForkStats::default();
    for r in reports {
        forks.merge(&r.fork_stats.counts);
    }
    let n_points = reports.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    let curve = (0..n_points)
        .map(|i| {
            let at = |f: &dyn Fn(&super::report::CurvePoint) -> f64| {
                Spread::of(&reports.iter().map(|r| f(&r.curve[i])).collect::<Vec<_>>())
            };
            let fam = |exact: bool| -> BTreeMap<String, Spread> {
                fams.iter()
                    .map(|k| {
                        let v: Vec<f64> = reports
                            .iter()
                            .filter_map(|r| r.curve[i].tasks.get(k))
                            .map(|p| if exact { p.exact_match } else { p.reward })
                            .collect();
                        (k.clone(), Spread::of(&v))
                    })
                    .collect()
            };
            SummaryPoint {
                rollouts: at(&|p| p.rollouts as f64).mean,
                reward: at(&|p| p.reward),
                exact_match: at(&|p| p.exact_match),
                family_reward: fam(false),
                family_exact: fam(true),
            }
        })
        .collect();
    EstimatorSummary {
        estimator: estimator.into(),
        seeds: seeds.to_vec(),
        base_reward: spread(&|r| r.base_reward).mean,
        base_exact_match: spread(&|r| r.base_exact_match).mean,
        final_reward: spread(&|r| r.final_reward),
        final_exact_match: spread(&|r| r.final_exact_match),
        final_family_exact: fam_final(true),
        final_family_reward: fam_final(false),
        other: OtherSummary {
            decoding: reports
                .first()
                .map(|r| r.other_decoding.decoding.name().to_string())
                .unwrap_or_default(),
            base_reward: spread(&|r| r.other_decoding.base_reward).mean,
            base_exact_match: spread(&|r| r.other_decoding.base_exact_match).mean,
            final_reward: spread(&|r| r.other_decoding.final_reward),
            final_exact_match: spread(&|r| r.other_decoding.final_exact_match),
        },
        fork_stats: ForkSummary::from_counts(forks),
        swaps: spread(&|r| r.swaps as f64),
        rollbacks: spread(&|r| r.rollbacks as f64),
        wall_seconds: spread(&|r| r.wall_seconds),
        curve,
        greedy: greedy_rows(reports),
    }
}

fn pm(s: &Spread) -> String {
    format!("{:.3} ± {:.3}", s.mean, s.ci95)
}

/// The task families of a comparison's summaries, sorted.
fn summary_families(report: &CompareReport) -> Vec<String> {
    report
        .summary
        .iter()
        .flat_map(|s| s.final_family_exact.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The markdown table of a comparison.
pub fn markdown(report: &CompareReport) -> String {
    let fams = summary_families(report);
    let mut md = String::new();
    let s = &report.settings;
    let _ = writeln!(md, "# LEAF vs GRPO on the spoken-digit tasks\n");
    let _ = writeln!(
        md,
        "Same base model, traffic, rollout budget ({} rollouts), K = {}, B = {} groups per \
         update, LoRA rank {} (alpha {}), learning rate {}, KL beta {}, held-out check every {} \
         updates ({} examples per family); final evaluation: {} examples per family on the test \
         takes, decoded {}. Reward: cased sentence BLEU / 100. Mean ± half-width of the 95 % \
         interval (Student's t) over seeds.\n",
        s.rollouts,
        s.group_size,
        s.groups_per_update,
        s.rank,
        s.alpha,
        s.learning_rate,
        s.kl_beta,
        s.publish_every,
        s.eval_samples,
        s.final_eval_samples,
        match s.eval_decoding {
            EvalDecoding::Serving => format!(
                "as the server samples the traffic (temperature {}, top-p {})",
                s.temperature, s.top_p
            ),
            EvalDecoding::Greedy => "greedy".to_string(),
        }
    );
    let mut head =
        "| estimator | seeds | base reward | final reward | base exact | final exact |".to_string();
    let mut rule = "|---|---|---|---|---|---|".to_string();
    for f in &fams {
        let _ = write!(head, " {f} exact | {f} reward |");
        rule.push_str("---|---|");
    }
    head.push_str(" fork-fire rate | usable-fork rate | mean node size | swaps | rollbacks |");
    rule.push_str("---|---|---|---|---|");
    let _ = writeln!(md, "{head}\n{rule}");
    for e in &report.summary {
        let mut row = format!(
            "| {} | {} | {:.3} | {} | {:.3} | {} |",
            e.estimator,
            e.seeds.len(),
            e.base_reward,
            pm(&e.final_reward),
            e.base_exact_match,
            pm(&e.final_exact_match)
        );
        for f in &fams {
            let x = e.final_family_exact.get(f).copied().unwrap_or_default();
            let r = e.final_family_reward.get(f).copied().unwrap_or_default();
            let _ = write!(row, " {} | {} |", pm(&x), pm(&r));
        }
        let forks = if e.fork_stats.counts.groups == 0 {
            "n/a | n/a | n/a".to_string()
        } else {
            format!(
                "{:.3} | {:.3} | {:.2}",
                e.fork_stats.fork_fire_rate,
                e.fork_stats.usable_fork_rate,
                e.fork_stats.mean_node_size
            )
        };
        let _ = writeln!(
            md,
            "{row} {forks} | {:.1} | {:.1} |",
            e.swaps.mean, e.rollbacks.mean
        );
    }
    if let Some(first) = report.summary.first() {
        let _ = writeln!(
            md,
            "\nThe same base and final adapters, {} decoding:\n\n| estimator | base reward | \
             final reward | base exact | final exact |\n|---|---|---|---|---|",
            first.other.decoding
        );
        for e in &report.summary {
            let o = &e.other;
            let _ = writeln!(
                md,
                "| {} | {:.3} | {} | {:.3} | {} |",
                e.estimator,
                o.base_reward,
                pm(&o.final_reward),
                o.base_exact_match,
                pm(&o.final_exact_match)
            );
        }
    }
    let _ = writeln!(
        md,
        "\nGreedy exact match by answer length (short: 1-4 words; long: 5-10 digit codes and \
         arithmetic with the working), base -> final:\n\n| estimator | families | speakers | \
         base | final |\n|---|---|---|---|---|"
    );
    for e in &report.summary {
        for g in &e.greedy {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.3} | {} |",
                e.estimator,
                g.families,
                g.speakers,
                g.base,
                pm(&g.last)
            );
        }
    }
    let _ = writeln!(md, "\nHeld-out checks (mean over seeds):\n");
    let _ = writeln!(
        md,
        "| estimator | rollouts | reward | exact match |\n|---|---|---|---|"
    );
    for e in &report.summary {
        for p in &e.curve {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {} |",
                e.estimator,
                p.rollouts,
                pm(&p.reward),
                pm(&p.exact_match)
            );
        }
    }
    let _ = writeln!(
        md,
        "\nWall time: {:.0} s for {} runs. Figure: `compare.png`.",
        report.wall_seconds,
        report.runs.len()
    );
    md
}

fn series(e: &EstimatorSummary, color: usize, f: &dyn Fn(&SummaryPoint) -> Spread) -> Series {
    Series {
        label: e.estimator.to_uppercase(),
        points: e.curve.iter().map(|p| (p.rollouts, f(p).mean)).collect(),
        band: e
            .curve
            .iter()
            .map(|p| {
                let s = f(p);
                (p.rollouts, s.min, s.max)
            })
            .collect(),
        color,
        markers_only: false,
    }
}

/// `compare.png`: held-out reward and per-family exact match against rollouts, mean over
/// seeds with a min..max band.
pub fn figure(path: &Path, report: &CompareReport) -> Result<(), JobError> {
    let fams = summary_families(report);
    let mut panels = vec![Panel {
        title: format!(
            "held-out reward (BLEU/100, {} decoding)",
            report.settings.eval_decoding.name()
        ),
        x_label: "rollouts".into(),
        y_label: "reward".into(),
        series: report
            .summary
            .iter()
            .enumerate()
            .map(|(i, e)| series(e, i, &|p| p.reward))
            .collect(),
        baseline: report.summary.first().map(|e| {
            (
                e.curve.first().map_or(e.base_reward, |p| p.reward.mean),
                "base".into(),
            )
        }),
    }];
    for f in fams.iter().take(3) {
        panels.push(Panel {
            title: format!("{f}: exact match"),
            x_label: "rollouts".into(),
            y_label: "exact match".into(),
            series: report
                .summary
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    series(e, i, &|p| {
                        p.family_exact.get(f).copied().unwrap_or_default()
                    })
                })
                .collect(),
            baseline: None,
        });
    }
    draw_panels(path, (1200, 900), 2, 2, &panels)
}

/// Runs the comparison and writes `compare.json`, `compare.md` and `compare.png` to
/// `config.out`.
pub fn compare(config: &CompareConfig) -> crate::Result<CompareReport> {
    if config.seeds == 0 || config.estimators.is_empty() {
        return Err(
            JobError::Config("compare needs at least one seed and one estimator".into()).into(),
        );
    }
    config.run.validate()?;
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&config.out).map_err(|source| crate::Error::Io {
        path: config.out.clone(),
        source,
    })?;
    let mut shared = config.run.clone();
    if shared.model.is_none() {
        let data = match &shared.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir()?,
        };
        shared.model = Some(ensure_default_model(
            &shared.cache_dir,
            &data,
            shared.progress,
        )?);
    }
    let seeds: Vec<u64> = (0..config.seeds).collect();
    let mut reports: Vec<(Estimator, u64, PathBuf, RunReport)> = Vec::new();
    for &seed in &seeds {
        for &est in &config.estimators {
            let mut rc = shared.clone();
            rc.estimator = est;
            rc.seed = seed;
            rc.resume = false;
            rc.overwrite = true;
            rc.out = config.out.join(format!("{}-seed{seed}", est.name()));
            if rc.progress {
                eprintln!(
                    "leaf compare: {} seed {seed} -> {}",
                    est.name(),
                    rc.out.display()
                );
            }
            let report = run(&rc)?;
            if rc.progress {
                eprintln!(
                    "leaf compare: {} seed {seed}: held-out reward {:.3} -> {:.3}, exact match \
                     {:.3} -> {:.3}",
                    est.name(),
                    report.base_reward,
                    report.final_reward,
                    report.base_exact_match,
                    report.final_exact_match
                );
            }
            reports.push((est, seed, rc.out.join(super::run::REPORT_FILE), report));
        }
    }
    let summary = config
        .estimators
        .iter()
        .map(|&est| {
            let rs: Vec<&RunReport> = reports
                .iter()
                .filter(|(e, ..)| *e == est)
                .map(|(.., r)| r)
                .collect();
            summarise(est.name(), &seeds, &rs)
        })
        .collect();
    let runs = reports
        .iter()
        .map(|(e, seed, path, r)| RunSummary {
            estimator: e.name().into(),
            seed: *seed,
            report: path.clone(),
            final_reward: r.final_reward,
            final_exact_match: r.final_exact_match,
            rollouts: r.rollouts,
            swaps: r.swaps,
        })
        .collect();
    let mut settings = shared.clone();
    settings.out = config.out.clone();
    let report = CompareReport {
        settings,
        runs,
        summary,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_json(&config.out.join("compare.json"), &report)?;
    let md_path = config.out.join("compare.md");
    std::fs::write(&md_path, markdown(&report)).map_err(|source| crate::Error::Io {
        path: md_path.clone(),
        source,
    })?;
    figure(&config.out.join("compare.png"), &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_by_hand() {
        let s = Spread::of(&[1.0, 2.0, 3.0]);
        assert_eq!(s.mean, 2.0);
        assert_eq!(s.std, 1.0);
        assert_eq!((s.min, s.max, s.n), (1.0, 3.0, 3));
        // t(2) = 4.303: 4.303 * 1 / sqrt(3).
        assert!((s.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-12);
        let one = Spread::of(&[0.5]);
        assert_eq!((one.mean, one.std, one.ci95), (0.5, 0.0, 0.0));
        assert_eq!(t975(4), 2.776);
        assert_eq!(t975(100), 1.960);
        assert_eq!(Spread::of(&[]), Spread::default());
    }
}
