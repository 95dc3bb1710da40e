//! The `tokenproxy` binary: parses the command line and hands off to [`tokenproxy::cli`].

use std::process::ExitCode;

use clap::Parser;
use tokenproxy::cli::{self, Cli, EXIT_USAGE};

/// jemalloc instead of glibc malloc: with an arena per proxy worker thread, glibc
/// fragmented 100k cached links into 65 MiB of resident memory (BENCHMARKS.md,
/// memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
