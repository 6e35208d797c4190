//! `openai-router`: the router as a program (see the library, `router_gateway`, for its
//! commands).
//!
//! The program allocates with mimalloc: under glibc's allocator the gateway's resident memory
//! climbed in steps after bursts (large answer buffers raise glibc's mmap threshold, and what
//! the heap then keeps is not returned), which the chaos soak saw as growth; mimalloc returns
//! freed pages. The library leaves the allocator to the program that embeds it; the feature
//! `mimalloc` (on by default) is only this line.

use std::process::ExitCode;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    router_gateway::run()
}
