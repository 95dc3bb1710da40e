//! Command-line interface: one file per subcommand.
//!
//! SKELETON: implemented by the CLI helper.
