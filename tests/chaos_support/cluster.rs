//! A PostgreSQL cluster the chaos test owns, so it can stop and start the server
//! under the replicas without disturbing any other test's database.
//!
//! Built with Debian's `initdb`/`pg_ctl` (from `PATH` or `/usr/lib/postgresql/*/bin`)
//! in a temporary directory, on a free loopback port (the suite's one port picked
//! by bind-and-release; see [`PgCluster::start`]) with trust auth, as
//! `scripts/test`'s `start_cluster` does; PostgreSQL refuses to run as root, so
//! as root every command runs as the `postgres` account through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster; stopped (immediate) and removed when dropped.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    as_postgres: bool,
}

fn find_bin() -> PathBuf {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    };
    if let (Some(initdb), Some(_)) = (on_path("initdb"), on_path("pg_ctl")) {
        return initdb.parent().unwrap().to_path_buf();
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Highest major version first (directory names are the version numbers).
    dirs.sort_by_key(|d| {
        let v = d.parent().and_then(|p| p.file_name()).unwrap_or_default();
        std::cmp::Reverse(v.to_string_lossy().parse::<u32>().unwrap_or(0))
    });
    dirs.into_iter()
        .find(|d| d.join("initdb").is_file())
        .expect("initdb not found (install Debian's postgresql package; scripts/test does)")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

impl PgCluster {
    /// Creates and starts the cluster.
    pub fn start() -> Self {
        let bin = find_bin();
        let dir = tempfile::tempdir().unwrap();
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(
                ok,
                "chown postgres {} (does the account exist?)",
                dir.path().display()
            );
        }
        // The one port of the suite picked and released beforehand: `pg_ctl`
        // needs `-p` up front and a postmaster on port 0 would not say (in any
        // line its log promises) which port it got. The window is short (initdb
        // runs next), and a port taken in between fails `pg_ctl start` loudly.
        let port = crate::support::net::free_port();
        let me = Self {
            bin,
            dir,
            port,
            as_postgres,
        };
        let data = me.data();
        me.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        me.start_server();
        me
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    fn start_server(&self) {
        // `synchronous_commit=off` is deliberate, not only for speed: with it an
        // immediate stop rolls back commits the server already acknowledged, which
        // is what lost a stored rotation before the store forced synchronous
        // commits on its own sessions (`store::postgres::durable`).
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let (data, log) = (self.data(), self.log().display().to_string());
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &opts, "start",
            ],
        );
    }

    /// Stops the server the way a crash or failover would (`-m immediate`: every
    /// connection is cut, nothing is waited for).
    pub fn stop(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port.
    pub fn start_again(&self) {
        self.start_server();
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`, or on `port` (a relay).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    /// The data directory's parent (for logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
