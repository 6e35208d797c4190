//! Turns the results of `cargo xtask bench` into `BENCHMARKS.md` tables and SVG plots.
//!
//! Reads, from the bench directory (default `target/bench`): `scenarios*.json` (the
//! degradation and quota scenarios, `benches/benches/scenarios.rs`) and `gateway.json`
//! (`router-gateway/benches/gateway.rs`); and criterion's estimates under `target/criterion`
//! (pick, select, overhead). Writes the plots to `docs/benchmarks/` and replaces, in
//! `BENCHMARKS.md`, the text between each `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`
//! pair; the prose around them is kept as it is. Prints the side-by-side table.
//!
//! The committed `BENCHMARKS.md` holds full runs only, so a quick run (`scenarios-quick.json`)
//! is left out of it. With `--quick` (as `cargo xtask bench --quick` calls it) the quick run
//! is reported, and the committed `BENCHMARKS.md` and plots are left alone: a copy of
//! `BENCHMARKS.md` with the new tables goes to `target/bench/quick/BENCHMARKS.md` and the plots
//! beside it. A quick run's cells are shorter than the full ones, and on a fresh clone there
//! are no other results, which would read as "not run".
//!
//! `cargo run --release -p benches --bin bench-report -- [--command "..."] [--quick]`

#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line report: the table on stdout, a failure on stderr"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench-report: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct Args {
    root: PathBuf,
    command: String,
    /// Report the quick run, in `target/bench/quick/` instead of `BENCHMARKS.md` and
    /// `docs/benchmarks/`.
    quick: bool,
}

fn args() -> Result<Args> {
    let mut args = Args {
        root: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        command: "cargo xtask bench".to_owned(),
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--command" => args.command = it.next().context("--command needs a value")?,
            "--root" => args.root = it.next().context("--root needs a value")?.into(),
            "--quick" => args.quick = true,
            other => {
                bail!("unknown argument `{other}` (known: --command TEXT, --root DIR, --quick)")
            }
        }
    }
    Ok(args)
}

fn run() -> Result<()> {
    let args = args()?;
    let bench = args.root.join("target/bench");
    // A quick report goes beside the results; only full runs replace the committed files.
    let out = args.quick.then(|| args.root.join("target/bench/quick"));
    let plots = out
        .clone()
        .unwrap_or_else(|| args.root.join("docs/benchmarks"));
    std::fs::create_dir_all(&plots)
        .with_context(|| format!("cannot create {}", plots.display()))?;
    let scenarios = load_scenarios(&bench, args.quick)?;
    let gateway = read_json(&bench.join("gateway.json"))?;
    let criterion = args.root.join("target/criterion");

    let mut sections: BTreeMap<&str, String> = BTreeMap::new();
    sections.insert("machine", machine(&args));
    sections.insert("pick", pick_table(&criterion));
    sections.insert("select", select_table(&criterion));
    sections.insert("openings", openings_table(&criterion));
    sections.insert(
        "in-process",
        overhead_table(
            &criterion,
            "in_process",
            "backend_direct",
            "backend called directly",
        ),
    );
    sections.insert(
        "over-http",
        overhead_table(
            &criterion,
            "over_http",
            "reqwest_direct",
            "reqwest, directly",
        ),
    );
    sections.insert("degradation", degradation_table(&scenarios.runs));
    sections.insert("quota", quota_table(&scenarios.runs));
    sections.insert("gateway", gateway_table(gateway.as_ref()));
    sections.insert("pressure-quota", pressure_quota_table(&scenarios.runs));
    sections.insert(
        "pressure-degradation",
        pressure_degradation_table(&scenarios.runs),
    );
    sections.insert("pressure-cache", pressure_cache_table(&scenarios.runs));
    let comparison = comparison_table(&scenarios.runs, gateway.as_ref());
    sections.insert("comparison", comparison.clone());

    let degradation: Vec<&Value> = scenarios.of("degradation");
    if !degradation.is_empty() {
        let at = scenarios.document["degradation"]["at"]
            .as_f64()
            .unwrap_or(10.0);
        let slow = scenarios.document["degradation"]["slow_endpoint"]
            .as_str()
            .unwrap_or_default();
        plot_degradation_latency(
            &plots.join("degradation-latency.svg"),
            &degradation,
            at,
            slow,
        )?;
        plot_degradation_share(&plots.join("degradation-share.svg"), &degradation, at, slow)?;
    }
    let quota: Vec<&Value> = scenarios.of("quota");
    if !quota.is_empty() {
        let offered = scenarios.document["quota"]["offered"]
            .as_f64()
            .unwrap_or(1.0);
        plot_quota(&plots.join("quota-tokens-per-minute.svg"), &quota, offered)?;
    }

    let pressure: Vec<&Value> = scenarios.of("pressure-degradation");
    if !pressure.is_empty() {
        plot_pressure_degradation(
            &plots.join("pressure-degradation-share.svg"),
            &pressure,
            "share",
        )?;
        plot_pressure_degradation(
            &plots.join("pressure-degradation-p99.svg"),
            &pressure,
            "p99_ms",
        )?;
    }
    let pressure: Vec<&Value> = scenarios.of("pressure-quota");
    if !pressure.is_empty() {
        plot_pressure_quota(&plots.join("pressure-quota-admitted.svg"), &pressure)?;
    }

    let committed = args.root.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&committed)
        .with_context(|| format!("cannot read {}", committed.display()))?;
    let text = replace_sections(&text, &sections)?;
    let path = out.map_or(committed, |dir| dir.join("BENCHMARKS.md"));
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    println!("{comparison}");
    println!(
        "wrote {} and the plots in {}",
        path.display(),
        plots.display()
    );
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not JSON", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

struct Scenarios {
    /// The parameters (of the newest file).
    document: Value,
    runs: Vec<Value>,
}

impl Scenarios {
    fn of(&self, scenario: &str) -> Vec<&Value> {
        self.runs
            .iter()
            .filter(|r| r["scenario"] == scenario)
            .collect()
    }
}

/// `scenarios.json` and any partial `scenarios-NAME.json`, oldest first, so that a newer run of
/// the same scenario, router and strategy replaces an older one; `scenarios-quick.json` only
/// when `quick`.
fn load_scenarios(dir: &Path, quick: bool) -> Result<Scenarios> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let json = Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"));
            if name.starts_with("scenarios") && json {
                let modified = entry.metadata().and_then(|m| m.modified())?;
                files.push((modified, entry.path()));
            }
        }
    }
    files.sort();
    // A quick run older than the full one is superseded by it (its cells have other lengths).
    let full = files
        .iter()
        .find(|(_, p)| p.file_name().is_some_and(|n| n == "scenarios.json"))
        .map(|(t, _)| *t);
    files.retain(|(t, p)| {
        !(p.file_name().is_some_and(|n| n == "scenarios-quick.json")
            && (!quick || full.is_some_and(|f| *t < f)))
    });
    let mut document = Value::Null;
    let mut runs: Vec<Value> = Vec::new();
    for (_, path) in files {
        let Some(file) = read_json(&path)? else {
            continue;
        };
        for run in file["runs"].as_array().into_iter().flatten() {
            let key = |r: &Value| {
                (
                    r["scenario"].clone(),
                    r["case"].clone(),
                    r["system"].clone(),
                    r["run"].clone(),
                )
            };
            runs.retain(|r| key(r) != key(run));
            runs.push(run.clone());
        }
        document = file;
    }
    // Our runs first, then LiteLLM's, each in the order they ran.
    runs.sort_by_key(|r| r["system"] != "openai-router");
    Ok(Scenarios { document, runs })
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn machine(args: &Args) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or_else(
            || "unknown".to_owned(),
            |l| l.trim_start_matches([' ', '\t', ':']).to_owned(),
        );
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("unknown".to_owned(), |kb| {
            format!("{:.1} GiB", kb / 1024.0 / 1024.0)
        });
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown".to_owned(), |v| v.trim_matches('"').to_owned());
    let rustc = output("rustc", &["--version"]).unwrap_or_else(|| "unknown".to_owned());
    let python = args.root.join("target/litellm-venv/bin/python");
    let litellm = output(
        &python.to_string_lossy(),
        &[
            "-c",
            "import importlib.metadata as m, sys; print(m.version('litellm'), 'on Python', sys.version.split()[0])",
        ],
    );
    let date = output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let mut s = String::new();
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {date} |");
    let _ = writeln!(s, "| command | `{}` |", args.command);
    let _ = writeln!(s, "| CPU | {cpu}, {cores} cores |");
    let _ = writeln!(s, "| memory | {memory} |");
    let _ = writeln!(s, "| OS | {os} |");
    let _ = writeln!(s, "| Rust | {rustc}, release profile |");
    let _ = writeln!(
        s,
        "| LiteLLM | {} |",
        litellm.unwrap_or_else(|| "not installed (run with `--compare litellm`)".to_owned())
    );
    s
}

/// Criterion's estimate of one benchmark, in nanoseconds: the slope when it has one, else the
/// mean.
fn estimate(criterion: &Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(criterion.join(id).join("new/estimates.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| v["mean"]["point_estimate"].as_f64())
}

fn nanos(ns: Option<f64>) -> String {
    match ns {
        None => "not run".to_owned(),
        Some(ns) if ns >= 1000.0 => format!("{:.2} µs", ns / 1000.0),
        Some(ns) if ns >= 100.0 => format!("{ns:.0} ns"),
        Some(ns) => format!("{ns:.1} ns"),
    }
}

const SIZES: [u32; 4] = [2, 8, 64, 256];

fn pick_table(criterion: &Path) -> String {
    let mut s =
        String::from("| strategy | N = 2 | N = 8 | N = 64 | N = 256 |\n|---|---|---|---|---|\n");
    for (id, label) in [
        ("round-robin", "round-robin"),
        ("least-busy", "least-busy (P2C)"),
        (
            "least-latency",
            "least-latency (P2C on the pair, probe budget, slow start)",
        ),
        ("weighted", "weighted"),
    ] {
        let cells: Vec<String> = SIZES
            .iter()
            .map(|n| {
                let ns = estimate(criterion, &format!("pick/{id}/{n}"));
                let text = nanos(ns);
                if ns.is_some_and(|ns| ns > 50.0) {
                    format!("**{text}**")
                } else {
                    text
                }
            })
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    s
}

fn select_table(criterion: &Path) -> String {
    let cells: Vec<String> = SIZES
        .iter()
        .map(|n| nanos(estimate(criterion, &format!("select/least-latency/{n}"))))
        .collect();
    format!(
        "| N = 2 | N = 8 | N = 64 | N = 256 |\n|---|---|---|---|\n| {} |\n",
        cells.join(" | ")
    )
}

/// A waiting decision's walk of one deployment's log to the `n`-th opening.
fn openings_table(criterion: &Path) -> String {
    let counts = [1, 64, 1024, 4096];
    let cells: Vec<String> = counts
        .iter()
        .map(|n| {
            nanos(estimate(
                criterion,
                &format!("openings/sliding-5000-marks/{n}"),
            ))
        })
        .collect();
    format!(
        "| n = 1 | n = 64 | n = 1,024 | n = 4,096 |\n|---|---|---|---|\n| {} |\n",
        cells.join(" | ")
    )
}

/// A direct call against the same call through the router, in µs (criterion gives ns).
fn overhead_table(criterion: &Path, group: &str, direct: &str, direct_label: &str) -> String {
    let base = estimate(criterion, &format!("{group}/{direct}"));
    let routed = estimate(criterion, &format!("{group}/router"));
    let show = |v: Option<f64>| v.map_or("not run".to_owned(), |v| format!("{:.2} µs", v / 1e3));
    let added = match (base, routed) {
        (Some(b), Some(r)) => format!("**{:.2} µs**", (r - b) / 1e3),
        _ => "not run".to_owned(),
    };
    format!(
        "| path | time per request |\n|---|---|\n| {direct_label} | {} |\n| through the router | {} |\n| **added by the router** | {added} |\n",
        show(base),
        show(routed)
    )
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |v| format!("{v:.0} ms"))
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("-".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

fn failed(run: &Value) -> u64 {
    run["requests"].as_u64().unwrap_or_default() - run["ok"].as_u64().unwrap_or_default()
}

fn degradation_table(runs: &[Value]) -> String {
    let mut s = String::from(
        "| router | strategy | least share before | p50 before | p99 before | p50 after | p99 after | p99 settled | slow endpoint's share after | failed requests |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs.iter().filter(|r| r["scenario"] == "degradation") {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run["system"].as_str().unwrap_or_default(),
            run["run"].as_str().unwrap_or_default(),
            pct(&run["least_share_before"]),
            ms(&run["before_p50_ms"]),
            ms(&run["before_p99_ms"]),
            ms(&run["after_p50_ms"]),
            ms(&run["after_p99_ms"]),
            ms(&run["settled_p99_ms"]),
            pct(&run["slow_share_after"]),
            failed(run),
        );
    }
    s
}

fn quota_table(runs: &[Value]) -> String {
    let mut s = String::from(
        "| router | run | share of summed quota served | upstream 429s | 429s reaching callers | router throttles | timeouts | other errors | served | p50 | p99 |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs.iter().filter(|r| r["scenario"] == "quota") {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run["system"].as_str().unwrap_or_default(),
            run["run"].as_str().unwrap_or_default(),
            pct(&run["share_served"]),
            run["upstream_429s"],
            run["upstream_429_to_caller"],
            run["throttled"],
            run["timeout"],
            run["error"],
            run["ok"],
            ms(&run["p50_ms"]),
            ms(&run["p99_ms"]),
        );
    }
    s
}

/// `value`, and ✓ or ✗ by `holds`; `-` when there is no value.
fn judged(value: String, holds: Option<bool>) -> String {
    match holds {
        Some(true) => format!("{value} ✓"),
        Some(false) => format!("{value} ✗"),
        None => value,
    }
}

/// The quota cells of the pressure matrix, against the targets of routing under pressure.
/// The router a run is of: the system, and what sets it apart when it is not the default.
fn router_name(run: &Value) -> String {
    let system = run["system"].as_str().unwrap_or_default();
    match run["run"].as_str() {
        Some(label) if label.ends_with("no cache affinity") => {
            format!("{system}, no cache affinity")
        }
        _ => system.to_owned(),
    }
}

/// The runs with conversations (sessions that share cacheable prefixes): the prefixes the
/// upstreams found cached, with prompt-cache affinity and without, beside the cell's main
/// result.
fn pressure_cache_table(runs: &[Value]) -> String {
    let mut s = String::from(
        "| cell | router | requests whose prefix was cached upstream | served of the summed quota, or slow-phase p99 ÷ oracle |\n|---|---|---|---|\n",
    );
    for run in runs.iter().filter(|r| !r["sessions"].is_null()) {
        let main = if run["scenario"] == "pressure-quota" {
            format!("{} served", pct(&run["share_served"]))
        } else {
            run["p99_vs_oracle"]
                .as_f64()
                .map_or("-".to_owned(), |v| format!("{v:.2} × the oracle's p99"))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {main} |",
            run["case"].as_str().unwrap_or_default(),
            router_name(run),
            pct(&run["cache_hit_share"]),
        );
    }
    s
}

fn pressure_quota_table(runs: &[Value]) -> String {
    let mut s = String::from(
        "| cell | router | served of the summed quota (the upstreams' ceiling) | upstream 429s (of upstream requests) | 429s reaching callers | served p99 (bound: unloaded p99 + max queue wait) | refusals | retries at `Retry-After` served |\n|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs.iter().filter(|r| r["scenario"] == "pressure-quota") {
        let case = run["case"].as_str().unwrap_or_default();
        // The target, or what the upstreams themselves can admit with requests of this size
        // when that is less.
        let ceiling = run["upstream_ceiling"].as_f64().unwrap_or(1.0);
        let target: f64 = if case.starts_with("fixed") {
            0.97
        } else {
            0.92
        };
        let floor = target.min(ceiling);
        let share = run["share_served"].as_f64();
        let share_429 = run["upstream_429_share"].as_f64();
        let p99 = run["p99_ms"].as_f64();
        let bound = run["p99_bound_ms"].as_f64();
        let retries = run["retries"].as_u64().unwrap_or_default();
        let at_retry_after = if run["system"] == "litellm" || retries == 0 {
            "-".to_owned()
        } else {
            let served = run["retries_served"].as_u64().unwrap_or_default();
            let ratio = served as f64 / retries as f64;
            judged(
                format!("{:.0} % ({served} of {retries})", ratio * 100.0),
                Some(ratio >= 0.8),
            )
        };
        let _ = writeln!(
            s,
            "| {case} | {} | {} | {} | {} | {} | {} | {at_retry_after} |",
            router_name(run),
            judged(
                format!(
                    "{} ({})",
                    pct(&run["share_served"]),
                    pct(&run["upstream_ceiling"])
                ),
                share.map(|v| v >= floor)
            ),
            judged(
                format!(
                    "{} ({} of {})",
                    pct(&run["upstream_429_share"]),
                    run["upstream_429s"],
                    run["upstream_requests"]
                ),
                share_429.map(|v| v <= 0.02)
            ),
            judged(
                run["upstream_429_to_caller"].to_string(),
                run["upstream_429_to_caller"].as_u64().map(|n| n == 0)
            ),
            judged(
                format!("{} ({})", ms(&run["p99_ms"]), ms(&run["p99_bound_ms"])),
                p99.zip(bound).map(|(p, b)| p <= b)
            ),
            run["throttled"],
        );
    }
    s
}

/// The degradation cells of the pressure matrix, against the targets of routing under
/// pressure (shares relative to the fair share, so that 3 and 4 endpoints compare).
fn pressure_degradation_table(runs: &[Value]) -> String {
    let mut s = String::from(
        "| cell | router | least share while equal (≥ ¾ fair) | slow-phase p99, settled ÷ oracle (≤ 1.2) | slow-phase p99, all | slow endpoint's share while slow | back to ¾ fair share within (≤ 10 s) | its most share in a second while it ramps (≤ 1½ fair) | failed |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs
        .iter()
        .filter(|r| r["scenario"] == "pressure-degradation")
    {
        let fair = run["fair_share"].as_f64().unwrap_or(1.0 / 3.0);
        let vs = run["p99_vs_oracle"].as_f64();
        let back = run["recovered_within_s"].as_u64();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run["case"].as_str().unwrap_or_default(),
            router_name(run),
            judged(
                pct(&run["least_share_before"]),
                run["least_share_before"].as_f64().map(|v| v >= 0.75 * fair)
            ),
            judged(
                vs.map_or("-".to_owned(), |v| {
                    format!(
                        "{v:.2} ({} ÷ {})",
                        ms(&run["settled_p99_ms"]),
                        ms(&run["oracle_p99_ms"])
                    )
                }),
                vs.map(|v| v <= 1.2)
            ),
            ms(&run["after_p99_ms"]),
            pct(&run["slow_share_after"]),
            judged(
                back.map_or("not within 10 s".to_owned(), |b| format!("{b} s")),
                Some(back.is_some())
            ),
            judged(
                pct(&run["most_share_during_ramp"]),
                run["most_share_during_ramp"]
                    .as_f64()
                    .map(|v| v <= 1.5 * fair + 1e-9)
            ),
            failed(run),
        );
    }
    s
}

fn us(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |v| {
        if v >= 1000.0 {
            format!("{:.2} ms", v / 1000.0)
        } else {
            format!("{v:.0} µs")
        }
    })
}

fn gateway_table(gateway: Option<&Value>) -> String {
    let Some(g) = gateway else {
        return "Not run: `cargo xtask bench` runs it.\n".to_owned();
    };
    let ours = &g["openai-router"];
    let direct = &g["direct"];
    let litellm = &g["litellm"];
    let with_litellm = litellm.is_object();
    let mut s = String::from("| measure | straight to the upstream | through openai-router |");
    if with_litellm {
        s.push_str(" through the LiteLLM proxy |");
    }
    s.push_str("\n|---|---|---|");
    if with_litellm {
        s.push_str("---|");
    }
    s.push('\n');
    let rows: [(&str, &str, Show); 7] = [
        ("latency p50, 1 connection", "p50_us", us),
        ("latency p99, 1 connection", "p99_us", us),
        ("added p50 (over straight)", "added_p50_us", us),
        ("added p99 (over straight)", "added_p99_us", us),
        ("requests/s, 50 connections", "rps", rps),
        ("streamed requests/s, 50 connections", "streamed_rps", rps),
        ("peak RSS", "peak_rss_mib", mib),
    ];
    for (label, key, show) in rows {
        let _ = write!(
            s,
            "| {label} | {} | {} |",
            show(&direct[key]),
            show(&ours[key])
        );
        if with_litellm {
            let _ = write!(s, " {} |", show(&litellm[key]));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "| one cross-core round trip (the floor of any extra hop here) | p50 {}, p99 {} | | {}",
        us(&g["cross_core"]["p50_us"]),
        us(&g["cross_core"]["p99_us"]),
        if with_litellm { "|" } else { "" }
    );
    s
}

/// How a figure is shown.
type Show = fn(&Value) -> String;

fn rps(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |v| format!("{v:.0}"))
}

fn mib(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |v| format!("{v:.1} MiB"))
}

fn find<'a>(runs: &'a [Value], scenario: &str, system: &str, run: &str) -> Option<&'a Value> {
    runs.iter()
        .find(|r| r["scenario"] == scenario && r["system"] == system && r["run"] == run)
}

/// Ours divided by `LiteLLM`'s, as text.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(o), Some(t)) if t != 0.0 => {
            let r = o / t;
            if r >= 10.0 {
                format!("{r:.0}×")
            } else {
                format!("{r:.2}×")
            }
        }
        (Some(0.0), Some(_)) => "equal (both 0)".to_owned(),
        (Some(_), Some(_)) => "∞".to_owned(),
        _ => "-".to_owned(),
    }
}

fn comparison_table(runs: &[Value], gateway: Option<&Value>) -> String {
    let mut s = String::from(
        "| scenario | measure | openai-router | LiteLLM | openai-router ÷ LiteLLM |\n|---|---|---|---|---|\n",
    );
    let mut rows = 0;
    for (ours, theirs) in [
        ("least-latency", "latency-based-routing"),
        ("least-busy", "least-busy"),
        ("usage-based", "usage-based-routing-v2"),
        ("weighted", "simple-shuffle"),
    ] {
        let (Some(o), Some(t)) = (
            find(runs, "degradation", "openai-router", ours),
            find(runs, "degradation", "litellm", theirs),
        ) else {
            continue;
        };
        for (label, key, show) in [
            (
                "least share while all were equal",
                "least_share_before",
                pct as fn(&Value) -> String,
            ),
            ("p99 after the slowdown", "after_p99_ms", ms),
            ("p99 settled (3 s after it)", "settled_p99_ms", ms),
            ("slow endpoint's share after", "slow_share_after", pct),
        ] {
            let _ = writeln!(
                s,
                "| degradation | {label} | {} ({ours}) | {} ({theirs}) | {} |",
                show(&o[key]),
                show(&t[key]),
                ratio(o[key].as_f64(), t[key].as_f64())
            );
            rows += 1;
        }
    }
    if let Some(o) = find(runs, "quota", "openai-router", "least-latency") {
        // LiteLLM's strategy made for quotas; the quota table has its other three, which
        // fare the same here.
        for theirs in ["usage-based-routing-v2"] {
            let Some(t) = find(runs, "quota", "litellm", theirs) else {
                continue;
            };
            for (label, key, show) in [
                (
                    "share of summed quota served",
                    "share_served",
                    pct as fn(&Value) -> String,
                ),
                (
                    "upstream 429s reaching callers",
                    "upstream_429_to_caller",
                    |v: &Value| v.to_string(),
                ),
                ("requests served, of the same offered", "ok", |v: &Value| {
                    v.to_string()
                }),
                ("requests the router refused", "throttled", |v: &Value| {
                    v.to_string()
                }),
                ("p50 of served requests", "p50_ms", ms),
                ("p99 of served requests", "p99_ms", ms),
            ] {
                let _ = writeln!(
                    s,
                    "| quota | {label} | {} (quota-aware) | {} ({theirs}) | {} |",
                    show(&o[key]),
                    show(&t[key]),
                    ratio(o[key].as_f64(), t[key].as_f64())
                );
                rows += 1;
            }
        }
    }
    if let Some(g) = gateway.filter(|g| g["litellm"].is_object()) {
        let rows_g: [(&str, &str, Show); 5] = [
            ("added latency p50, 1 connection", "added_p50_us", us),
            ("added latency p99, 1 connection", "added_p99_us", us),
            ("requests/s, 50 connections", "rps", rps),
            ("streamed requests/s, 50 connections", "streamed_rps", rps),
            ("peak RSS", "peak_rss_mib", mib),
        ];
        for (label, key, show) in rows_g {
            let (o, t) = (&g["openai-router"][key], &g["litellm"][key]);
            let _ = writeln!(
                s,
                "| gateway | {label} | {} | {} (proxy) | {} |",
                show(o),
                show(t),
                ratio(o.as_f64(), t.as_f64())
            );
            rows += 1;
        }
    }
    if rows == 0 {
        return "Not run: `cargo xtask bench --compare litellm` runs it.\n".to_owned();
    }
    s
}

fn replace_sections(text: &str, sections: &BTreeMap<&str, String>) -> Result<String> {
    let mut text = text.to_owned();
    for (name, body) in sections {
        let open = format!("<!-- bench:{name} -->");
        let close = format!("<!-- /bench:{name} -->");
        let (Some(start), Some(end)) = (text.find(&open), text.find(&close)) else {
            bail!("BENCHMARKS.md lacks the markers {open} … {close}");
        };
        if end < start {
            bail!("BENCHMARKS.md: {close} comes before {open}");
        }
        text.replace_range(start + open.len()..end, &format!("\n{body}"));
    }
    Ok(text)
}

// Plots.

const COLOURS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

struct Line {
    name: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

fn per_second(run: &Value, key: &str) -> Vec<(f64, f64)> {
    run["series"][key]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(s, v)| v.as_f64().map(|v| (s as f64 + 0.5, v)))
        .collect()
}

/// One panel per run, in a grid of rows × columns, each with its lines.
/// The axes every panel of a figure shares.
struct Axes {
    x_max: f64,
    y_max: f64,
    y_desc: &'static str,
    /// A vertical line (the moment something changed).
    marker: Option<f64>,
    /// Another (the moment it changed back).
    second_marker: Option<f64>,
    legend: SeriesLabelPosition,
}

fn grid(path: &Path, title: &str, panels: &[(String, Vec<Line>)], axes: &Axes) -> Result<()> {
    let Axes {
        x_max,
        y_max,
        y_desc,
        marker,
        second_marker,
        ref legend,
    } = *axes;
    let columns = panels.len().clamp(1, 5);
    let rows = panels.len().div_ceil(columns);
    let size = (260 * columns as u32 + 20, 230 * rows as u32 + 50);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(draw)?;
    let areas = root.split_evenly((rows, columns));
    for ((name, lines), area) in panels.iter().zip(areas) {
        let mut chart = ChartBuilder::on(&area)
            .caption(name, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_desc)
            .x_labels(5)
            .y_labels(5)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(draw)?;
        for x in marker.into_iter().chain(second_marker) {
            chart
                .draw_series(LineSeries::new([(x, 0.0), (x, y_max)], BLACK.mix(0.3)))
                .map_err(draw)?;
        }
        for line in lines {
            let colour = line.colour;
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(draw)?
                .label(line.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(legend.clone())
            .label_font(("sans-serif", 11))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(draw)?;
    }
    root.present().map_err(draw)?;
    Ok(())
}

fn panel_name(run: &Value) -> String {
    let system = if run["system"] == "litellm" {
        "LiteLLM"
    } else {
        "openai-router"
    };
    format!("{system}: {}", run["run"].as_str().unwrap_or_default())
}

fn plot_degradation_latency(path: &Path, runs: &[&Value], at: f64, slow: &str) -> Result<()> {
    let x_max = runs
        .iter()
        .map(|r| per_second(r, "p99_ms").len())
        .max()
        .unwrap_or(1) as f64;
    let panels: Vec<(String, Vec<Line>)> = runs
        .iter()
        .map(|run| {
            (
                panel_name(run),
                vec![
                    Line {
                        name: "p99".into(),
                        colour: COLOURS[0],
                        points: per_second(run, "p99_ms"),
                    },
                    Line {
                        name: "p50".into(),
                        colour: COLOURS[1],
                        points: per_second(run, "p50_ms"),
                    },
                ],
            )
        })
        .collect();
    grid(
        path,
        &format!(
            "Degradation: latency of the requests sent each second ({slow} turns 5× slower at the grey line)"
        ),
        &panels,
        &Axes {
            x_max,
            y_max: 1500.0,
            y_desc: "ms",
            marker: Some(at),
            second_marker: None,
            legend: SeriesLabelPosition::UpperLeft,
        },
    )
}

fn plot_degradation_share(path: &Path, runs: &[&Value], at: f64, slow: &str) -> Result<()> {
    let x_max = runs
        .iter()
        .map(|r| per_second(r, "p50_ms").len())
        .max()
        .unwrap_or(1) as f64;
    let panels: Vec<(String, Vec<Line>)> = runs
        .iter()
        .map(|run| (panel_name(run), share_lines(run, Some(slow))))
        .collect();
    grid(
        path,
        &format!(
            "Degradation: share of each second's requests per endpoint ({slow} turns 5× slower at the grey line)"
        ),
        &panels,
        &Axes {
            x_max,
            // Headroom above 100 % for the legend.
            y_max: 145.0,
            y_desc: "% of requests",
            marker: Some(at),
            second_marker: None,
            legend: SeriesLabelPosition::UpperLeft,
        },
    )
}

/// Each endpoint's share of each second's requests in `run`, in percent, one line per endpoint
/// as the scenario named them (sorted: the slowed one first, marked when `slow` names it).
fn share_lines(run: &Value, slow: Option<&str>) -> Vec<Line> {
    run["series"]["share"]
        .as_object()
        .into_iter()
        .flatten()
        .zip(COLOURS)
        .map(|((ep, shares), colour)| Line {
            name: if Some(ep.as_str()) == slow {
                format!("{ep} (slowed)")
            } else {
                ep.clone()
            },
            colour,
            points: shares
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .filter_map(|(s, v)| v.as_f64().map(|v| (s as f64 + 0.5, v * 100.0)))
                .collect(),
        })
        .collect()
}

/// One panel per pressure-degradation run: each endpoint's share (`key` = `share`) or the p99
/// (`p99_ms`) of each second's requests, the slowdown and the recovery marked.
fn plot_pressure_degradation(path: &Path, runs: &[&Value], key: &str) -> Result<()> {
    let x_max = runs
        .iter()
        .map(|r| per_second(r, "p50_ms").len())
        .max()
        .unwrap_or(1) as f64;
    let mut y_max: f64 = 145.0;
    let panels: Vec<(String, Vec<Line>)> = runs
        .iter()
        .map(|run| {
            let lines: Vec<Line> = if key == "share" {
                share_lines(run, None)
            } else {
                let oracle = run["oracle_p99_ms"].as_f64();
                let mut lines = vec![Line {
                    name: "p99".into(),
                    colour: COLOURS[0],
                    points: per_second(run, "p99_ms"),
                }];
                if let Some(o) = oracle {
                    lines.push(Line {
                        name: "oracle p99".into(),
                        colour: COLOURS[2],
                        points: vec![(0.0, o), (x_max, o)],
                    });
                    y_max = y_max.max(o * 4.0);
                }
                lines
            };
            (
                format!(
                    "{} · {}",
                    panel_name(run),
                    run["case"].as_str().unwrap_or_default()
                ),
                lines,
            )
        })
        .collect();
    let at = runs.first().and_then(|r| r["at_s"].as_f64());
    let recover = runs.first().and_then(|r| r["recover_s"].as_f64());
    let (title, y_desc) = if key == "share" {
        (
            "Under pressure: each endpoint's share of each second's requests (ep0 slows at the first grey line, recovers at the second)",
            "% of requests",
        )
    } else {
        (
            "Under pressure: p99 of each second's requests, beside the oracle (the healthy endpoints alone)",
            "ms",
        )
    };
    grid(
        path,
        title,
        &panels,
        &Axes {
            x_max,
            y_max: if key == "share" {
                145.0
            } else {
                y_max.min(3000.0)
            },
            y_desc,
            marker: at,
            second_marker: recover,
            legend: SeriesLabelPosition::UpperLeft,
        },
    )
}

/// One panel per pressure-quota run: tokens admitted per window as a share of the summed
/// quota, against the offered load.
fn plot_pressure_quota(path: &Path, runs: &[&Value]) -> Result<()> {
    let mut x_max: f64 = 1.0;
    let panels: Vec<(String, Vec<Line>)> = runs
        .iter()
        .map(|run| {
            let summed = run["summed_tpm"].as_f64().unwrap_or(1.0);
            let offered = run["offered"].as_f64().unwrap_or(1.0) * 100.0;
            let points: Vec<(f64, f64)> = run["tokens_per_window"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| {
                    let level = w[2].as_f64()? / summed * 100.0;
                    Some([(w[0].as_f64()?, level), (w[1].as_f64()?, level)])
                })
                .flatten()
                .collect();
            x_max = points.iter().map(|p| p.0).fold(x_max, f64::max);
            (
                format!(
                    "{} · {}",
                    panel_name(run),
                    run["case"].as_str().unwrap_or_default()
                ),
                vec![
                    Line {
                        name: "offered".into(),
                        colour: COLOURS[2],
                        points: vec![(0.0, offered), (1e6, offered)],
                    },
                    Line {
                        name: "summed quota".into(),
                        colour: COLOURS[0],
                        points: vec![(0.0, 100.0), (1e6, 100.0)],
                    },
                    Line {
                        name: "admitted".into(),
                        colour: COLOURS[1],
                        points,
                    },
                ],
            )
        })
        .collect();
    grid(
        path,
        "Under pressure: tokens the endpoints admitted per window (at least 5 s), as % of the summed quota",
        &panels,
        &Axes {
            x_max: x_max.ceil(),
            y_max: 260.0,
            y_desc: "% of summed quota",
            marker: None,
            second_marker: None,
            legend: SeriesLabelPosition::UpperRight,
        },
    )
}

fn plot_quota(path: &Path, runs: &[&Value], offered_factor: f64) -> Result<()> {
    let summed = runs
        .first()
        .and_then(|r| r["summed_tpm"].as_f64())
        .unwrap_or(1.0);
    let offered = summed * offered_factor;
    let mut x_max: f64 = 1.0;
    let panels: Vec<(String, Vec<Line>)> = runs
        .iter()
        .map(|run| {
            // Steps: one level per quota window.
            let points: Vec<(f64, f64)> = run["tokens_per_window"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| {
                    let level = w[2].as_f64()? / 1000.0;
                    Some([(w[0].as_f64()?, level), (w[1].as_f64()?, level)])
                })
                .flatten()
                .collect();
            x_max = points.iter().map(|p| p.0).fold(x_max, f64::max);
            (
                panel_name(run),
                // The admitted line last, so that it is drawn over the quota it meets.
                vec![
                    Line {
                        name: "offered".into(),
                        colour: COLOURS[2],
                        points: vec![(0.0, offered / 1000.0), (1e6, offered / 1000.0)],
                    },
                    Line {
                        name: "summed quota".into(),
                        colour: COLOURS[0],
                        points: vec![(0.0, summed / 1000.0), (1e6, summed / 1000.0)],
                    },
                    Line {
                        name: "admitted by the endpoints".into(),
                        colour: COLOURS[1],
                        points,
                    },
                ],
            )
        })
        .collect();
    grid(
        path,
        "Quota: tokens the endpoints admitted in each 10 s quota window, per minute, against the summed quota",
        &panels,
        &Axes {
            x_max: x_max.ceil(),
            y_max: summed / 1000.0 * 1.4,
            y_desc: "thousand tokens/min",
            marker: None,
            second_marker: None,
            legend: SeriesLabelPosition::LowerRight,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section the report writes, in the order `run` inserts them.
    const SECTIONS: [&str; 13] = [
        "machine",
        "pick",
        "select",
        "openings",
        "in-process",
        "over-http",
        "degradation",
        "quota",
        "gateway",
        "comparison",
        "pressure-quota",
        "pressure-degradation",
        "pressure-cache",
    ];

    #[test]
    fn replaces_between_markers_and_keeps_the_prose() {
        let text = "intro\n<!-- bench:pick -->\nold table\n<!-- /bench:pick -->\nprose after\n";
        let sections = BTreeMap::from([("pick", "| new |\n".to_owned())]);
        let out = replace_sections(text, &sections).unwrap();
        assert_eq!(
            out,
            "intro\n<!-- bench:pick -->\n| new |\n<!-- /bench:pick -->\nprose after\n"
        );
        // Twice gives the same text: the markers stay.
        assert_eq!(replace_sections(&out, &sections).unwrap(), out);
    }

    #[test]
    fn a_missing_marker_is_an_error_that_names_it() {
        let sections = BTreeMap::from([("quota", String::new())]);
        let error = replace_sections("no markers here", &sections).unwrap_err();
        assert!(
            error.to_string().contains("<!-- bench:quota -->"),
            "{error}"
        );
        let reversed = "<!-- /bench:quota --> <!-- bench:quota -->";
        assert!(replace_sections(reversed, &sections).is_err());
    }

    #[test]
    fn benchmarks_md_has_every_marker() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
        let text = std::fs::read_to_string(path).unwrap();
        let sections: BTreeMap<&str, String> =
            SECTIONS.iter().map(|name| (*name, String::new())).collect();
        replace_sections(&text, &sections).unwrap();
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25×");
        assert_eq!(ratio(Some(300.0), Some(2.0)), "150×");
        assert_eq!(ratio(Some(0.0), Some(0.0)), "equal (both 0)");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "∞");
        assert_eq!(ratio(None, Some(1.0)), "-");
    }

    #[test]
    fn comparison_pairs_our_strategy_with_litellms() {
        let runs = vec![
            serde_json::json!({"scenario": "degradation", "system": "openai-router", "run": "least-latency",
                               "after_p99_ms": 300.0, "after_p50_ms": 180.0, "slow_share_after": 0.05}),
            serde_json::json!({"scenario": "degradation", "system": "litellm", "run": "latency-based-routing",
                               "after_p99_ms": 900.0, "after_p50_ms": 190.0, "slow_share_after": 0.10}),
        ];
        let table = comparison_table(&runs, None);
        assert!(table.contains("| degradation | p99 after the slowdown | 300 ms (least-latency) | 900 ms (latency-based-routing) | 0.33× |"), "{table}");
        assert!(
            table.contains("| 5.0 % (least-latency) | 10.0 % (latency-based-routing) | 0.50× |"),
            "{table}"
        );
        assert!(comparison_table(&runs[..1], None).starts_with("Not run"));
    }
}
