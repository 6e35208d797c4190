//! `cargo xtask fuzz`: each fuzz target in `fuzz/` under cargo-fuzz (nightly, debug assertions
//! on, so overflows count as crashes; no sanitizer, the code being safe Rust) up to a number
//! of executions or a time limit, its corpus minimised afterwards, and a table of executions,
//! rates, crashes and corpus sizes, also written to `target/fuzz/report.md`. A crash's input is left in `fuzz/artifacts/TARGET/`:
//! copy it to `fuzz/regressions/TARGET/` (which the corpus replay in `cargo xtask ci` runs) once
//! it is fixed.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{ensure_tool, say};

/// Every target, in the order they run.
pub(crate) const TARGETS: [&str; 5] = [
    "sse",
    "rate_limit_headers",
    "types",
    "config",
    "gateway_request",
];

struct Options {
    runs: u64,
    minutes: u64,
    targets: Vec<String>,
}

fn options(args: impl Iterator<Item = String>) -> Result<Options> {
    let mut options = Options {
        runs: 10_000_000,
        minutes: 30,
        targets: Vec::new(),
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} takes a value"));
        match arg.as_str() {
            "--runs" => {
                options.runs = value("--runs")?
                    .replace('_', "")
                    .parse()
                    .context("--runs takes a number of executions")?;
            }
            "--minutes" => {
                options.minutes = value("--minutes")?
                    .parse()
                    .context("--minutes takes a whole number of minutes per target")?;
            }
            "--target" => {
                let target = value("--target")?;
                if !TARGETS.contains(&target.as_str()) {
                    bail!(
                        "--target: no target `{target}`; the targets: {}",
                        TARGETS.join(", ")
                    );
                }
                options.targets.push(target);
            }
            other => bail!("unknown argument `{other}`; try `cargo xtask help`"),
        }
    }
    if options.targets.is_empty() {
        options.targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    Ok(options)
}

/// What one target's run showed.
struct Outcome {
    target: String,
    executions: u64,
    seconds: f64,
    crashed: bool,
    corpus: usize,
}

pub(crate) fn run(args: impl Iterator<Item = String>) -> Result<()> {
    let options = options(args)?;
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        bail!("cargo fuzz needs the nightly toolchain: rustup toolchain install nightly");
    }
    ensure_tool("cargo-fuzz", "fuzz", "cargo-fuzz")?;
    std::fs::create_dir_all("target/fuzz")?;
    let mut outcomes = Vec::new();
    for target in &options.targets {
        outcomes.push(fuzz_one(target, &options)?);
    }
    let report = report(&outcomes, &options);
    std::fs::write("target/fuzz/report.md", &report)?;
    say(&report);
    say("==> written to target/fuzz/report.md");
    if let Some(crashed) = outcomes.iter().find(|o| o.crashed) {
        bail!(
            "the `{}` target crashed: its input is in fuzz/artifacts/{}/ (log: target/fuzz/{}.log)",
            crashed.target,
            crashed.target,
            crashed.target
        );
    }
    Ok(())
}

fn fuzz_one(target: &str, options: &Options) -> Result<Outcome> {
    let log_path = format!("target/fuzz/{target}.log");
    let log = std::fs::File::create(&log_path)?;
    say(&format!(
        "==> fuzz {target}: up to {} executions or {} min (log: {log_path})",
        options.runs, options.minutes
    ));
    let started = Instant::now();
    let mut child = Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "--debug-assertions",
        ])
        .arg(target)
        .arg("--")
        .arg(format!("-runs={}", options.runs))
        .arg(format!("-max_total_time={}", options.minutes * 60))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot run cargo +nightly fuzz")?;
    let mut last_said = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::park_timeout(Duration::from_secs(1));
        if last_said.elapsed() >= Duration::from_secs(30) {
            last_said = Instant::now();
            if let Some(line) = last_progress(Path::new(&log_path)) {
                say(&format!(
                    "    {target} {:>5.0}s  {line}",
                    started.elapsed().as_secs_f64()
                ));
            }
        }
    };
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
    };
    let executions = stat("number_of_executed_units").unwrap_or(0);
    // libFuzzer's own time: the build before it is not fuzzing.
    let seconds = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Done ")?
                .split(" in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| started.elapsed().as_secs_f64());
    let found = [
        "==ERROR",
        "panicked at",
        "deadly signal",
        "Test unit written to",
    ]
    .iter()
    .any(|mark| text.contains(mark));
    if !status.success() && !found {
        bail!("cargo fuzz {target} failed before fuzzing ({status}); see {log_path}");
    }
    let crashed = !status.success();
    if !crashed {
        // Keep the corpus small: only inputs that add coverage stay.
        let minimised = Command::new("cargo")
            .args([
                "+nightly",
                "fuzz",
                "cmin",
                "--fuzz-dir",
                "fuzz",
                "--debug-assertions",
            ])
            .arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !minimised.success() {
            bail!("cargo fuzz cmin {target} failed");
        }
    }
    let corpus = std::fs::read_dir(format!("fuzz/corpus/{target}")).map_or(0, Iterator::count);
    Ok(Outcome {
        target: target.to_owned(),
        executions,
        seconds,
        crashed,
        corpus,
    })
}

/// libFuzzer's last status line (`#N pulse|NEW|REDUCE cov: … exec/s: …`).
fn last_progress(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with('#'))
        .map(str::to_owned)
}

fn report(outcomes: &[Outcome], options: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Fuzzing: `cargo xtask fuzz` (cargo-fuzz, libFuzzer, debug assertions on, no sanitizer), up to {} \
         executions or {} min per target.\n",
        options.runs, options.minutes
    );
    out.push_str("| target | executions | seconds | executions/s | crashes | corpus files |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for o in outcomes {
        #[expect(clippy::cast_precision_loss, reason = "a rate for people to read")]
        let rate = o.executions as f64 / o.seconds.max(1e-9);
        let _ = writeln!(
            out,
            "| `{}` | {} | {:.0} | {:.0} | {} | {} |",
            o.target,
            o.executions,
            o.seconds,
            rate,
            u8::from(o.crashed),
            o.corpus
        );
    }
    out
}
