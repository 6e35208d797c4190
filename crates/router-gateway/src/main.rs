//! `openai-router`: the router as a program (see the library, `router_gateway`, for its
//! commands).

use std::process::ExitCode;

fn main() -> ExitCode {
    router_gateway::run()
}
