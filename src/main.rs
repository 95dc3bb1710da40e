//! The `tokenproxy` binary: parses the command line and hands off to [`tokenproxy::cli`].
fn main() {
    // SKELETON: the CLI helper wires clap here.
}
