//! Rebuilds the crate when a migration is added or edited: `sqlx::migrate!` embeds
//! the SQL files at compile time, but on stable Rust cargo does not know it read
//! them, so without this a new migration would silently be left out.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations-sqlite");
}
