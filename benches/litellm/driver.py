"""Runs one benchmark scenario through LiteLLM's Router, for `cargo xtask bench --compare litellm`.

The Rust scenario bench (benches/benches/scenarios.rs) owns the simulated endpoints and the
clock of the scenario; this script only offers the load through LiteLLM, the same load the Rust
side offers through openai-router (open loop: the same arrival times; closed loop: the same
number of callers, each sending its next request when its last is answered), and writes one
JSON line per request.

    driver.py SPEC.json RECORDS.jsonl

SPEC holds the strategy, the endpoints (name, OpenAI base URL, key, TPM, RPM), the arrival
times (open loop) or the number of callers (closed loop), the duration, the request shape, the
deadline and the retries. The script prints `ready` once
LiteLLM is imported and the Router built, waits for a line on stdin, then starts the clock.
"""

import asyncio
import json
import os
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOG", "ERROR")

import litellm  # noqa: E402
from litellm import Router  # noqa: E402

WORDS = ["route", "each", "call", "where", "quota", "room", "left", "fast"]


def prompt(i: int, words: int) -> str:
    """The same prompt the Rust side sends for request `i`."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + f" {i}"


def classify(error: BaseException) -> str:
    """One of the outcome classes the Rust side uses."""
    name = type(error).__name__
    if name.startswith("RouterRateLimitError"):
        # LiteLLM refused without calling an upstream: every deployment over its limit or
        # cooling down.
        return "throttled"
    if isinstance(error, litellm.RateLimitError):
        return "upstream_429"
    if isinstance(error, litellm.Timeout):
        return "timeout"
    return "error"


async def main() -> None:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    litellm.suppress_debug_info = True
    model = spec["model"]
    model_list = []
    for endpoint in spec["endpoints"]:
        params = {
            "model": f"openai/{model}",
            "api_base": endpoint["api_base"],
            "api_key": endpoint["api_key"],
        }
        if endpoint.get("tpm"):
            params["tpm"] = endpoint["tpm"]
        if endpoint.get("rpm"):
            params["rpm"] = endpoint["rpm"]
        model_list.append(
            {
                "model_name": model,
                "litellm_params": params,
                "model_info": {"id": endpoint["name"]},
            }
        )
    router = Router(
        model_list=model_list,
        routing_strategy=spec["strategy"],
        num_retries=spec["num_retries"],
        timeout=spec["timeout_s"],
    )
    records = []

    async def one(i: int, clock: float) -> None:
        started = time.perf_counter()
        record = {"t": started - clock}
        try:
            response = await router.acompletion(
                model=model,
                messages=[{"role": "user", "content": prompt(i, spec["prompt_words"])}],
                max_tokens=spec["max_tokens"],
            )
            record["outcome"] = "ok"
            record["endpoint"] = response._hidden_params.get("model_id")
        except Exception as error:  # every failure is a measured outcome
            record["outcome"] = classify(error)
            record["error"] = f"{type(error).__name__}: {error}"[:200]
        record["ms"] = (time.perf_counter() - started) * 1000.0
        records.append(record)

    print("ready", flush=True)
    sys.stdin.readline()
    clock = time.perf_counter()
    tasks = []
    callers = spec.get("callers")
    if callers:
        end = clock + spec["seconds"]

        async def caller(first: int) -> None:
            i = first
            while time.perf_counter() < end:
                await one(i, clock)
                i += callers

        tasks = [asyncio.create_task(caller(c)) for c in range(callers)]
    else:
        for i, at in enumerate(spec["arrivals"]):
            delay = clock + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, clock)))
    await asyncio.gather(*tasks)
    with open(out_path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
