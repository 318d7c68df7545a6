//! `check`: verify (and with `-r` repair) an image's metadata
//! (`qemu-img check`).
//!
//! Exit codes as qemu-img's: 0 clean, 1 the check could not be completed,
//! 2 corruptions, 3 only leaks, 63 the format cannot be checked.

use oxqcow::{CheckReport, Image, OpenOptions, RepairMode};
use serde_json::{json, Map, Value};

use crate::app::ctx::Ctx;
use crate::app::getopt::{HasArg, Opt};
use crate::app::image::parse_image_opts;
use crate::app::messages::describe;
use crate::app::output::{print_json, OutputFormat};
use crate::app::CommonOpts;

/// In qemu-img's order, which ambiguity messages list.
const SPEC: &[Opt] = &[
    Opt::both('h', "help", HasArg::No),
    Opt::both('f', "format", HasArg::Required),
    Opt::both('r', "repair", HasArg::Required),
    Opt::long("output", HasArg::Required),
    Opt::long("object", HasArg::Required),
    Opt::long("image-opts", HasArg::No),
    Opt::both('U', "force-share", HasArg::No),
    Opt::both('T', "cache", HasArg::Required),
    Opt::both('q', "quiet", HasArg::No),
];

const HELP: &str = "\
Check basic image integrity.  Usage:

  PROG check [-f FMT | --image-opts] [-T CACHE_MODE] [-r leaks|all] [-U] [-q]
        [--output human|json] [--object OBJDEF] FILENAME

  -q, --quiet             print nothing on stdout
  -f, --format FMT        format of FILENAME (probed when omitted)
  --image-opts            FILENAME is an option string (driver=...,file.filename=...)
  -T, --cache CACHE_MODE  cache mode of FILENAME (writeback)
  -U, --force-share       open the image in shared mode (not with -r)
  --output human|json     output format (default human)
  -r, --repair leaks|all  repair leaked clusters, or everything
  --object OBJDEF         QEMU user-creatable object (eg encryption key)

Exit status: 0 no errors, 1 the check did not complete, 2 corruptions,
3 leaked clusters only, 63 the format does not support checks.
";

/// Exit code when the format has no consistency check (qemu-img's 63).
const EXIT_NOT_SUPPORTED: i32 = 63;

/// Runs `check`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("check", args, SPEC) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut common = CommonOpts::default();
    let mut output = OutputFormat::Human;
    let mut repair = None;
    let mut cache = oxqcow::CacheMode::Writeback;
    for (key, value) in p.opts {
        let value = value.unwrap_or_default();
        match key.as_str() {
            "h" => {
                print!("{}", HELP.replace("PROG", &ctx.prog));
                return 0;
            }
            "r" => {
                repair = Some(match value.as_str() {
                    "leaks" => RepairMode::Leaks,
                    "all" => RepairMode::All,
                    other => {
                        return ctx
                            .usage_error("check", &format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"))
                    }
                })
            }
            "output" => match OutputFormat::parse(&value) {
                Ok(o) => output = o,
                Err(msg) => return ctx.usage_error("check", &msg),
            },
            // Checked as it is met, unlike the shared -T.
            "T" => match oxqcow::CacheMode::from_name(&value) {
                Ok(mode) => cache = mode,
                Err(_) => return ctx.fail(&format!("Invalid source cache option: {value}")),
            },
            _ => {
                if let Err(msg) = common.consume(&key, &value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let [filename] = p.operands.as_slice() else {
        return ctx.usage_error("check", "Expecting one image file name");
    };
    let (quiet, force_share) = (common.quiet, common.force_share);
    if common.image_opts && common.format.is_some() {
        return ctx.fail("--image-opts and --format are mutually exclusive");
    }
    let (path, format, mut opts) = if common.image_opts {
        match parse_image_opts(filename) {
            Ok(v) => v,
            Err(msg) => return ctx.fail(&msg),
        }
    } else {
        (filename.clone(), common.format, OpenOptions::new())
    };
    if repair.is_some() && force_share {
        return ctx.fail(&format!("Could not open '{path}': force-share=on can only be used with read-only images"));
    }
    opts.read_only = repair.is_none();
    opts.force_share |= force_share;
    opts.cache = cache;
    // Damaged refcount tables are what check is for: open tolerantly.
    opts.repair = true;
    let image = match crate::app::image::open_image_as(&path, filename, format.as_deref(), opts) {
        Ok(i) => i,
        Err(msg) => return ctx.fail(&msg),
    };
    // Only qcow2 has a checker (QEMU's raw, luks and qcow drivers have none).
    if !matches!(image, Image::Qcow2(_)) {
        ctx.error("This image format does not support checks");
        return EXIT_NOT_SUPPORTED;
    }
    // As qemu-img: a check (repairing when asked); when it fixed something,
    // the summary of the repairs and a second, plain check whose result is
    // the one reported.
    let mut report = match run_check(ctx, &image, repair) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if report.corruptions_fixed > 0 || report.leaks_fixed > 0 {
        let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
        if output == OutputFormat::Human && !quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {leaks_fixed} leaked clusters\n    \
                 {corruptions_fixed} corruptions\n\nDouble checking the fixed image now...\n"
            );
        }
        report = match run_check(ctx, &image, None) {
            Ok(r) => r,
            Err(code) => return code,
        };
        report.leaks_fixed = leaks_fixed;
        report.corruptions_fixed = corruptions_fixed;
    }
    if let Err(e) = crate::app::image::close_image(image) {
        return ctx.fail(&format!("Check failed: {}", describe(&e)));
    }
    if !quiet {
        match output {
            OutputFormat::Human => print!("{}", human(&report)),
            OutputFormat::Json => print_json(&to_json(&path, &report)),
        }
    }
    if report.check_errors > 0 {
        return ctx.fail("Check failed");
    }
    exit_code(&report)
}

/// One check: its messages on stderr as they are found (whatever the
/// output format, as qemu-img); a check that failed prints "Check failed:
/// REASON" and gives exit code 1.
fn run_check(ctx: &Ctx, image: &Image, repair: Option<RepairMode>) -> Result<CheckReport, i32> {
    let report = image
        .check_with(repair, &mut |line| crate::app::messages::stderr_line(line))
        .map_err(|e| ctx.fail(&format!("Check failed: {}", describe(&e))))?;
    match &report.error {
        Some(reason) => {
            if let Some(text) = &report.error_report {
                ctx.error(text);
            }
            Err(ctx.fail(&format!("Check failed: {reason}")))
        }
        None => Ok(report),
    }
}

/// 2 when corruptions remain, 3 when only leaks do, 0 when clean.
fn exit_code(r: &CheckReport) -> i32 {
    if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu's `ImageCheck`: counts that are zero are left out.
fn to_json(path: &str, r: &CheckReport) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(path));
    m.insert("format".into(), json!("qcow2"));
    m.insert("check-errors".into(), json!(r.check_errors));
    let optional = [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (key, value) in optional {
        if value != 0 {
            m.insert(key.into(), json!(value));
        }
    }
    Value::Object(m)
}

/// qemu-img's human summary (`dump_human_image_check`).
fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            out += &format!(
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            out += &format!(
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            out += &format!("\n{} internal errors have occurred during the check.\n", r.check_errors);
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let allocated = r.allocated_clusters as f64;
        out += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            allocated * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / allocated,
            r.compressed_clusters as f64 * 100.0 / allocated
        );
    }
    if r.image_end_offset != 0 {
        out += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let mut r = CheckReport::default();
        assert_eq!(exit_code(&r), 0);
        r.leaks = 1;
        assert_eq!(exit_code(&r), 3);
        r.corruptions = 1;
        assert_eq!(exit_code(&r), 2);
    }

    #[test]
    fn zero_counts_are_left_out_of_json() {
        let r = CheckReport { total_clusters: 16, image_end_offset: 4096, ..Default::default() };
        let v = to_json("x", &r);
        assert!(v.get("leaks").is_none());
        assert_eq!(v["total-clusters"], 16);
        assert_eq!(v["check-errors"], 0);
    }
}
