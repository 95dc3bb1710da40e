//! The `tokenproxy` binary: parses the command line and hands off to [`tokenproxy::cli`].

use std::process::ExitCode;

use clap::Parser;
use tokenproxy::cli::{self, Cli, EXIT_USAGE};

/// jemalloc instead of glibc malloc: with an arena per proxy worker thread, glibc
/// fragmented 100k cached links into 65 MiB of resident memory (BENCHMARKS.md,
/// memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (read before `main`; `_RJEM_MALLOC_CONF` in the environment
/// still overrides them). Freed pages go back to the system within about a second,
/// from jemalloc's own thread rather than a worker's allocation: with the default
/// ten seconds, a burst of cache misses (rows, decryption, JSON) left ~17 MiB
/// resident after 100k links were cached (BENCHMARKS.md, memory).
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: Option<&'static u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0]);

fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(args) => cli::run(args),
        Err(e) => {
            // --help and --version are not errors; everything else is a usage error.
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
