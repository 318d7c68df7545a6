//! `oxqcow-probe FILE`: opens FILE read-only as qcow2, reads every extent
//! (bounded), runs check, and prints one line with the verdict.
//!
//! Exit status: 0 clean, 1 the image was refused or check found problems,
//! 2 usage. A panic exits with 101 and an allocation failure aborts: the
//! hostile-image test treats both as bugs.

use std::process::ExitCode;
use std::sync::Arc;

use oxqcow::FileStorage;
use oxqcow_testkit::probe::{probe_storage, ProbeLimits};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = &args[..] else {
        eprintln!("usage: oxqcow-probe FILE");
        return ExitCode::from(2);
    };
    let storage = match FileStorage::open(std::path::Path::new(path), false) {
        Ok(s) => s,
        Err(e) => {
            println!("cannot open {path}: {e}");
            return ExitCode::from(1);
        }
    };
    let verdict = probe_storage(Arc::new(storage), ProbeLimits::default());
    println!("{}", verdict.describe());
    if verdict.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
