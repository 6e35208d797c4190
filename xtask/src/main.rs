//! Project automation, run as `cargo xtask <task>` (the alias is in `.cargo/config.toml`).
//!
//! - `ci`: everything CI checks, in order: formatting, clippy with warnings denied, the whole
//!   test suite (nextest), doc tests, rustdoc with warnings denied, the examples, a short run of
//!   the demo (which fails on any caller-visible failure), and `cargo deny` (bans, licenses,
//!   sources). Tools it needs and can install from the crate registry
//!   (`cargo-deny`, `cargo-nextest`) are installed when missing.
//! - `test`: the test suite and the doc tests only.
//! - `bench`: the benchmarks: criterion in `benches/` (pick, overhead), the quota scenario,
//!   and the gateway under load (`router-gateway/benches/gateway.rs`).
//! - `demo`: `openai-router demo` in release mode.
//!
//! Each step prints its command and duration; a summary closes the run.

use std::env;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// One command of a task.
struct Step {
    name: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// A `cargo` step.
const fn cargo(name: &'static str, args: &'static [&'static str]) -> Step {
    Step {
        name,
        program: "cargo",
        args,
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
const BENCH: Step = cargo("bench", &["bench", "--locked", "-p", "benches"]);
const BENCH_GATEWAY: Step = cargo(
    "bench gateway",
    &[
        "bench",
        "--locked",
        "-p",
        "router-gateway",
        "--bench",
        "gateway",
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
            ensure_redis()?;
            let [example_a, example_b, example_c] = EXAMPLES;
            run_steps(&[
                FMT, CLIPPY, NEXTEST, DOCTEST, RUSTDOC, example_a, example_b, example_c, DEMO, DENY,
            ])
        }
        "test" => {
            ensure_tool("cargo-nextest", "nextest", "cargo-nextest")?;
            ensure_redis()?;
            run_steps(&[NEXTEST, DOCTEST])
        }
        "bench" => {
            ensure_redis()?;
            run_steps(&[BENCH, BENCH_GATEWAY])
        }
        "demo" => run_steps(&[DEMO_RELEASE]),
        "" | "help" | "--help" | "-h" => {
            say(concat!(
                "usage: cargo xtask <ci|test|bench|demo>\n",
                "  ci     format, clippy, tests, doc tests, rustdoc, examples, a short demo, cargo deny\n",
                "  test   tests and doc tests\n",
                "  bench  the criterion benchmarks (benches/)\n",
                "  demo   the demo, in release mode",
            ));
            Ok(())
        }
        other => bail!("unknown task `{other}`; try `cargo xtask help`"),
    }
}

/// The Redis tests start their own `redis-server`: install it from Debian's packages when it
/// is missing and this is root on a Debian-like machine; otherwise say how.
fn ensure_redis() -> Result<()> {
    let found = [
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
        "/usr/sbin/redis-server",
    ]
    .iter()
    .any(|path| std::path::Path::new(path).is_file())
        || Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = std::path::Path::new("/usr/bin/apt-get").is_file();
    if !(root && apt) {
        bail!(
            "redis-server is needed by the Redis tests; install it: sudo apt-get install redis-server"
        );
    }
    say("==> installing redis-server (Debian package) for the Redis tests");
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "redis-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        bail!("could not install redis-server; install it: apt-get install redis-server");
    }
    Ok(())
}

/// Installs a cargo subcommand from the crate registry when it is missing.
fn ensure_tool(binary: &str, subcommand: &str, package: &str) -> Result<()> {
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
            step.args.join(" ")
        ));
        let step_started = Instant::now();
        let status = Command::new(step.program)
            .args(step.args)
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

fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn eprintln_safe(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
