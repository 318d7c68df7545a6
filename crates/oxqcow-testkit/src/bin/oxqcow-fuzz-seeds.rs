//! `oxqcow-fuzz-seeds DIR`: writes the seed corpus of the `open_read_check`
//! fuzz target (valid images of several geometries) into DIR.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir] = &args[..] else {
        eprintln!("usage: oxqcow-fuzz-seeds DIR");
        return ExitCode::from(2);
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("cannot create {dir}: {e}");
        return ExitCode::from(1);
    }
    for (name, bytes) in oxqcow_testkit::probe::seed_images() {
        let path = std::path::Path::new(dir).join(format!("seed-{name}.qcow2"));
        if let Err(e) = std::fs::write(&path, bytes) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
