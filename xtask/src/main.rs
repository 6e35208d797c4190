//! Project automation, run as `cargo xtask <task>` (the alias is in `.cargo/config.toml`).
//!
//! - `ci`: everything CI checks, in order: formatting, clippy with warnings denied, the whole
//!   test suite (nextest), doc tests, rustdoc with warnings denied, the examples, a short run of
//!   the demo (which fails on any caller-visible failure), every feature of each library crate
//!   alone (`cargo hack check --each-feature --no-dev-deps`), a four-minute chaos soak, and
//!   `cargo deny` (bans, licenses,
//!   sources). The tests include the architecture checks (`arch.rs`: dependency edges as
//!   ARCHITECTURE.md draws them, no import circles). Tools it needs and can install from the
//!   crate registry (`cargo-deny`, `cargo-nextest`, `cargo-hack`) are installed when missing,
//!   and so are Debian's `redis-server`, `nodejs` and `npm` (the Redis and Node client tests)
//!   and `chromium` and `chromium-driver` (the status page's browser test).
//! - `test`: the test suite and the doc tests only.
//! - `bench [--compare litellm]`: the benchmarks: criterion in `benches/` (pick, overhead; with
//!   shortened warm-up and measurement), the degradation and quota scenarios
//!   (`benches/benches/scenarios.rs`), the gateway under load
//!   (`router-gateway/benches/gateway.rs`), gateway replicas sharing limits through one Redis
//!   (`router-gateway/benches/replicas.rs`) and one Redis serving 100 replicas that lease
//!   slices (`state-redis/benches/fleet.rs`), both into `target/bench/`, then `bench-report`, which rewrites the tables of
//!   `BENCHMARKS.md` and the plots in `docs/benchmarks/`. With `--compare litellm` the
//!   scenarios and the gateway load also go through `LiteLLM` (its Router and its proxy),
//!   installed from `PyPI` into `target/litellm-venv`. `--quick`: the pressure matrix alone,
//!   with short phases, reported in `target/bench/quick/` (`BENCHMARKS.md` holds full runs).
//! - `demo`: `openai-router demo` in release mode.
//! - `soak [--minutes M] [--seed S] [--workers N]`: the chaos soak
//!   (`router-gateway/benches/soak.rs`), ten minutes by default.
//! - `fuzz [--runs N] [--minutes M] [--target T]`: the fuzz targets (`fuzz.rs`).
//!
//! Each step prints its command and duration; a summary closes the run.

#[cfg(test)]
mod arch;
mod fuzz;

use std::env;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// One command of a task.
struct Step {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    /// Arguments known only at run time, after `args`.
    extra: Vec<String>,
    env: &'static [(&'static str, &'static str)],
}

impl Step {
    fn with(mut self, extra: impl IntoIterator<Item = String>) -> Self {
        self.extra.extend(extra);
        self
    }
}

/// A `cargo` step.
const fn cargo(name: &'static str, args: &'static [&'static str]) -> Step {
    Step {
        name,
        program: "cargo",
        args,
        extra: Vec::new(),
        env: &[],
    }
}

const FMT: Step = cargo("format", &["fmt", "--all", "--check"]);
const CLIPPY: Step = cargo(
    "clippy",
    &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ],
);
const NEXTEST: Step = cargo(
    "tests",
    &[
        "nextest",
        "run",
        "--workspace",
        "--all-features",
        "--locked",
        "--profile",
        "ci",
    ],
);
const DOCTEST: Step = cargo(
    "doc tests",
    &["test", "--doc", "--workspace", "--all-features", "--locked"],
);
const RUSTDOC: Step = Step {
    name: "rustdoc",
    program: "cargo",
    args: &[
        "doc",
        "--workspace",
        "--no-deps",
        "--all-features",
        "--locked",
    ],
    extra: Vec::new(),
    env: &[("RUSTDOCFLAGS", "-D warnings")],
};
/// The router examples: each runs against the simulator and checks what it shows.
const EXAMPLES: [Step; 3] = [
    cargo(
        "examples",
        &[
            "run",
            "--quiet",
            "--locked",
            "-p",
            "router-facade",
            "--example",
            "least_latency",
        ],
    ),
    cargo(
        "examples",
        &[
            "run",
            "--quiet",
            "--locked",
            "-p",
            "router-facade",
            "--example",
            "custom_backend",
        ],
    ),
    cargo(
        "examples",
        &[
            "run",
            "--quiet",
            "--locked",
            "-p",
            "router-facade",
            "--example",
            "custom_strategy",
        ],
    ),
];
/// The demo, short: it must end with zero caller-visible failures on the default seed.
const DEMO: Step = cargo(
    "demo",
    &[
        "run",
        "--quiet",
        "--locked",
        "-p",
        "router-gateway",
        "--",
        "demo",
        "--duration",
        "3",
    ],
);
const DEMO_RELEASE: Step = cargo(
    "demo",
    &[
        "run",
        "--release",
        "--locked",
        "-p",
        "router-gateway",
        "--",
        "demo",
    ],
);
/// Criterion's settings for `cargo xtask bench`: shorter than its defaults (3 s warm-up, 5 s
/// measurement), so that the whole run, `LiteLLM` included, stays near ten minutes on 2 cores.
const CRITERION_QUICK: [&str; 5] = ["--", "--warm-up-time", "1", "--measurement-time", "2"];
const BENCH_PICK: Step = cargo(
    "bench pick",
    &["bench", "--locked", "-p", "benches", "--bench", "pick"],
);
const BENCH_OVERHEAD: Step = cargo(
    "bench overhead",
    &["bench", "--locked", "-p", "benches", "--bench", "overhead"],
);
const BENCH_SCENARIOS: Step = cargo(
    "scenarios",
    &[
        "bench",
        "--locked",
        "-p",
        "benches",
        "--bench",
        "scenarios",
        "--",
    ],
);
const BENCH_GATEWAY: Step = cargo(
    "bench gateway",
    &[
        "bench",
        "--locked",
        "-p",
        "router-gateway",
        "--bench",
        "gateway",
        "--",
    ],
);
/// Gateway processes on one Redis under 1.5x overload of a key's, a group's and a
/// deployment's limit (`router-gateway/benches/replicas.rs`).
const BENCH_REPLICAS: Step = cargo(
    "bench replicas",
    &[
        "bench",
        "--locked",
        "-p",
        "router-gateway",
        "--bench",
        "replicas",
    ],
);
/// One Redis serving 100 replicas that lease slices (`state-redis/benches/fleet.rs`).
const BENCH_FLEET: Step = cargo(
    "bench fleet",
    &["bench", "--locked", "-p", "state-redis", "--bench", "fleet"],
);
/// The chaos soak (`router-gateway/benches/soak.rs`): the release gateway under a mixed load
/// and a seeded fault schedule; `--minutes` and `--seed` follow.
const SOAK: Step = cargo(
    "soak",
    &[
        "bench",
        "--locked",
        "-p",
        "router-gateway",
        "--bench",
        "soak",
        "--",
    ],
);
const BENCH_REPORT: Step = cargo(
    "report",
    &[
        "run",
        "--quiet",
        "--release",
        "--locked",
        "-p",
        "benches",
        "--bin",
        "bench-report",
        "--",
    ],
);
/// Where `--compare litellm` keeps its Python environment.
const LITELLM_VENV: &str = "target/litellm-venv";
const LITELLM_REQUIREMENTS: &str = "benches/litellm/requirements.txt";
/// Every feature of each library crate on its own, without dev-dependencies (which would
/// turn features on): a feature that does not build alone fails here.
const HACK: Step = cargo(
    "features",
    &[
        "hack",
        "check",
        "--each-feature",
        "--no-dev-deps",
        "-p",
        "router-types",
        "-p",
        "router-core",
        "-p",
        "backend-openai",
        "-p",
        "backend-azure",
        "-p",
        "router-facade",
        "-p",
        "state-redis",
    ],
);
const DENY: Step = cargo(
    "cargo deny",
    &["deny", "check", "bans", "licenses", "sources"],
);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln_safe(&format!("xtask: {error:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let task = env::args().nth(1).unwrap_or_default();
    // Run from the workspace root whatever the caller's directory.
    let root = env::var("CARGO_MANIFEST_DIR")
        .map(|dir| std::path::PathBuf::from(dir).join(".."))
        .context("run through `cargo xtask`")?;
    env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    match task.as_str() {
        "ci" => {
            ensure_tool("cargo-nextest", "nextest", "cargo-nextest")?;
            ensure_tool("cargo-deny", "deny", "cargo-deny")?;
            ensure_tool("cargo-hack", "hack", "cargo-hack")?;
            ensure_redis()?;
            ensure_node()?;
            ensure_chromium()?;
            let [example_a, example_b, example_c] = EXAMPLES;
            run_steps(&[
                FMT,
                CLIPPY,
                NEXTEST,
                DOCTEST,
                RUSTDOC,
                example_a,
                example_b,
                example_c,
                DEMO,
                SOAK.with(["--minutes".to_owned(), "4".to_owned()]),
                HACK,
                DENY,
            ])
        }
        "test" => {
            ensure_tool("cargo-nextest", "nextest", "cargo-nextest")?;
            ensure_redis()?;
            ensure_node()?;
            ensure_chromium()?;
            run_steps(&[NEXTEST, DOCTEST])
        }
        "bench" => bench(),
        "demo" => run_steps(&[DEMO_RELEASE]),
        "fuzz" => fuzz::run(env::args().skip(2)),
        "soak" => soak(),
        "" | "help" | "--help" | "-h" => {
            say(concat!(
                "usage: cargo xtask <ci|test|bench [--quick] [--compare litellm]|demo|soak|fuzz>\n",
                "  ci     format, clippy, tests, doc tests, rustdoc, examples, a short demo,\n",
                "         each library feature alone (cargo hack), cargo deny\n",
                "  test   tests and doc tests\n",
                "  bench  every benchmark, then BENCHMARKS.md and its plots (docs/benchmarks/);\n",
                "         --compare litellm: the same scenarios and gateway load through LiteLLM too\n",
                "         (installed from PyPI into target/litellm-venv); --quick: the routing\n",
                "         under pressure matrix alone, with short phases (about 3 minutes),\n",
                "         reported in target/bench/quick/ (BENCHMARKS.md is left as it is)\n",
                "  demo   the demo, in release mode\n",
                "  soak   the chaos soak: the release gateway under a mixed load and a seeded\n",
                "         fault schedule, invariants checked (--minutes M, 10; --seed S, 1;\n",
                "         --workers N, 16); the report in target/soak/report.md\n",
                "  fuzz   each fuzz target (fuzz/, cargo-fuzz on nightly) up to --runs N executions\n",
                "         (10 million) or --minutes M (30) each; --target T (repeatable) for some;\n",
                "         a table in target/fuzz/report.md. CI replays the corpora on stable",
            ));
            Ok(())
        }
        other => bail!("unknown task `{other}`; try `cargo xtask help`"),
    }
}

/// `cargo xtask bench [--quick] [--compare litellm]`.
fn bench() -> Result<()> {
    let mut compare = None;
    let mut quick = false;
    let mut args = env::args().skip(2);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--compare" => match args.next().as_deref() {
                Some("litellm") => compare = Some("litellm"),
                other => bail!(
                    "--compare takes `litellm` (got {})",
                    other.unwrap_or("nothing")
                ),
            },
            other => bail!("unknown argument `{other}`; try `cargo xtask help`"),
        }
    }
    ensure_redis()?;
    let python = match compare {
        Some(_) => Some(ensure_litellm()?),
        None => None,
    };
    let litellm: Vec<String> = python
        .iter()
        .flat_map(|p| ["--litellm".to_owned(), p.clone()])
        .collect();
    let command = match (quick, compare) {
        (false, Some(_)) => "cargo xtask bench --compare litellm",
        (false, None) => "cargo xtask bench",
        (true, Some(_)) => "cargo xtask bench --quick --compare litellm",
        (true, None) => "cargo xtask bench --quick",
    };
    if quick {
        // The pressure matrix alone, with short phases, then the report, written
        // beside the results (bench-report says where): BENCHMARKS.md holds full runs.
        let mut scenario_args = vec!["--quick".to_owned()];
        scenario_args.extend(litellm);
        return run_steps(&[
            BENCH_SCENARIOS.with(scenario_args),
            BENCH_REPORT.with([
                "--command".to_owned(),
                command.to_owned(),
                "--quick".to_owned(),
            ]),
        ]);
    }
    let quick = CRITERION_QUICK.map(str::to_owned);
    run_steps(&[
        BENCH_PICK.with(quick.clone()),
        BENCH_OVERHEAD.with(quick),
        BENCH_SCENARIOS.with(litellm.clone()),
        BENCH_GATEWAY.with(litellm),
        BENCH_REPLICAS,
        BENCH_FLEET,
        BENCH_REPORT.with(["--command".to_owned(), command.to_owned()]),
    ])
}

/// `cargo xtask soak`: the chaos soak, ten minutes unless `--minutes` says otherwise.
fn soak() -> Result<()> {
    let mut soak = vec!["--minutes".to_owned(), "10".to_owned()];
    let mut args = env::args().skip(2);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--minutes" | "--seed" | "--workers", Some(value)) => {
                soak.extend([arg.clone(), value]);
            }
            _ => bail!("soak takes --minutes M, --seed S and --workers N"),
        }
    }
    ensure_redis()?;
    run_steps(&[SOAK.with(soak)])
}

/// The Redis tests start their own `redis-server`s (one, or a cluster joined with
/// `redis-cli`): install them from Debian's packages when either is missing and this is root on
/// a Debian-like machine; otherwise say how.
fn ensure_redis() -> Result<()> {
    let has = |binary: &str| {
        ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
            .iter()
            .any(|dir| std::path::Path::new(dir).join(binary).is_file())
            || Command::new(binary)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
    };
    if has("redis-server") && has("redis-cli") {
        return Ok(());
    }
    install_debian(
        &["redis-server", "redis-tools"],
        "redis-server and redis-cli (for the Redis tests)",
    )
}

/// The gateway's Node client test runs the official `openai` npm package: install Debian's
/// Node.js and npm when either is missing and this is root on a Debian-like machine;
/// otherwise say how.
fn ensure_node() -> Result<()> {
    let works = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("node") && works("npm") {
        return Ok(());
    }
    install_debian(
        &["nodejs", "npm"],
        "Node.js and npm (for the Node client test)",
    )
}

/// The status page's browser test drives Debian's headless Chromium through `chromedriver`:
/// install `chromium` and `chromium-driver` when either is missing and this is root on a
/// Debian-like machine; otherwise say how.
fn ensure_chromium() -> Result<()> {
    let works = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("chromium") && works("chromedriver") {
        return Ok(());
    }
    install_debian(
        &["chromium", "chromium-driver"],
        "Chromium and chromedriver (for the status page's browser test)",
    )
}

/// The Python of a venv under `target/` holding the pinned `LiteLLM`: created, and installed
/// from `PyPI`, when missing or when `benches/litellm/requirements.txt` changed since.
fn ensure_litellm() -> Result<String> {
    // Absolute: the bench binaries run from their own package's directory.
    let venv = env::current_dir()?.join(LITELLM_VENV);
    let venv = venv.as_path();
    let python = venv.join("bin/python");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(LITELLM_REQUIREMENTS)
        .with_context(|| format!("cannot read {LITELLM_REQUIREMENTS}"))?;
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python.to_string_lossy().into_owned());
    }
    if !python.is_file() {
        say(&format!("==> creating a Python venv in {LITELLM_VENV}"));
        let create = || {
            Command::new("python3")
                .args(["-m", "venv", LITELLM_VENV])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !create() {
            // Debian's python3 lacks venv until python3-venv is installed.
            install_debian(&["python3", "python3-venv"], "python3 with venv")?;
            let _ = std::fs::remove_dir_all(venv);
            if !create() {
                bail!("cannot create a venv: python3 -m venv {LITELLM_VENV} failed");
            }
        }
    }
    say(&format!(
        "==> installing LiteLLM from PyPI ({LITELLM_REQUIREMENTS}); this happens once per machine"
    ));
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            LITELLM_REQUIREMENTS,
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("pip could not install {LITELLM_REQUIREMENTS} into {LITELLM_VENV}");
    }
    std::fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python.to_string_lossy().into_owned())
}

/// Installs Debian packages when this is root on a Debian-like machine; otherwise says how.
fn install_debian(packages: &[&str], what: &str) -> Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = std::path::Path::new("/usr/bin/apt-get").is_file();
    if !(root && apt) {
        bail!(
            "{what} is needed; install it: sudo apt-get install {}",
            packages.join(" ")
        );
    }
    say(&format!(
        "==> installing {} (Debian packages)",
        packages.join(" ")
    ));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "could not install {what}: apt-get install {}",
            packages.join(" ")
        );
    }
    Ok(())
}

/// Installs a cargo subcommand from the crate registry when it is missing.
pub(crate) fn ensure_tool(binary: &str, subcommand: &str, package: &str) -> Result<()> {
    let present = Command::new("cargo")
        .args([subcommand, "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    say(&format!(
        "==> installing {package} (missing: `cargo {subcommand}`); this happens once per machine"
    ));
    let status = Command::new("cargo")
        .args(["install", "--locked", package])
        .status()
        .with_context(|| format!("cannot run cargo install {package}"))?;
    if !status.success() {
        bail!("could not install {binary}; install it with `cargo install --locked {package}`");
    }
    Ok(())
}

fn run_steps(steps: &[Step]) -> Result<()> {
    let started = Instant::now();
    let mut done: Vec<(&str, Duration)> = Vec::new();
    for step in steps {
        say(&format!(
            "==> {}: {} {}",
            step.name,
            step.program,
            step.args
                .iter()
                .copied()
                .chain(step.extra.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let step_started = Instant::now();
        let status = Command::new(step.program)
            .args(step.args)
            .args(&step.extra)
            .envs(step.env.iter().copied())
            .status()
            .with_context(|| format!("cannot run {}", step.program))?;
        let took = step_started.elapsed();
        if !status.success() {
            summary(&done, Some((step.name, took)), started.elapsed());
            bail!("step `{}` failed ({status})", step.name);
        }
        done.push((step.name, took));
    }
    summary(&done, None, started.elapsed());
    Ok(())
}

fn summary(done: &[(&str, Duration)], failed: Option<(&str, Duration)>, total: Duration) {
    say("==> summary");
    for (name, took) in done {
        say(&format!(
            "    ok      {name:<12} {:>7.1}s",
            took.as_secs_f64()
        ));
    }
    if let Some((name, took)) = failed {
        say(&format!(
            "    FAILED  {name:<12} {:>7.1}s",
            took.as_secs_f64()
        ));
    }
    say(&format!("    total {:>19.1}s", total.as_secs_f64()));
}

pub(crate) fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn eprintln_safe(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
