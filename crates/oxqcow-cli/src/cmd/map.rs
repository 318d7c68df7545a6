//! `map`: the allocation map of an image, as `qemu-img map` prints it.
//!
//! The engine's block status is fed through qemu-img's own merge step
//! (`entry_mergeable`) and printer (`dump_map_entry`), including the human
//! format's habit of treating every non-data run as plain zeros so that
//! more of them coalesce.
//!
//! On a backing chain each run carries the depth of the layer that
//! describes it, and the human format's File column names that layer's file
//! as QEMU names it (backing file names taken relative to the directory of
//! the image naming them).

use oxqcow::{BlockDevice, Extent};

use crate::app::block_status::status_up_to_error;
use crate::app::ctx::Ctx;
use crate::app::forbid_backing::FORBID_BACKING;
use crate::app::getopt::{self, HasArg, Opt};
use crate::app::image::chain_filenames;
use crate::app::messages::errno_text;
use crate::app::numbers::cvtnum;
use crate::app::output::OutputFormat;
use crate::app::CommonOpts;

/// Block status is asked for in windows of this many bytes, so the extent
/// list of a huge, fragmented image never sits in memory all at once.
const STATUS_WINDOW: u64 = 1 << 30;

/// qemu-img's `MapEntry`.
#[derive(Clone, Debug, Default)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl MapEntry {
    fn from_extent(e: &Extent) -> MapEntry {
        MapEntry {
            start: e.offset,
            length: e.length,
            depth: e.depth,
            present: e.present,
            zero: e.zero,
            data: e.data,
            compressed: e.compressed,
            offset: e.host_offset,
        }
    }

    /// qemu-img's `entry_mergeable` (every entry names the same file here).
    fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        if self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            _ => true,
        }
    }
}

fn help(prog: &str) {
    print!(
        "Usage:\n\
         Dump image metadata.  Usage:\n\n  \
         {prog} map [-f FMT] [--output human|json]\n        \
         [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME\n\n\
         Arguments:\n  \
         -h, --help\n     print this help and exit\n  \
         -f, --format FMT\n     specify FILENAME image format explicitly\n  \
         --start-offset OFFSET\n  \
         --max-length LENGTH\n  \
         --output human|json\n     specify output format name (default human)\n  \
         -U, --force-share\n     open image in shared mode for concurrent access\n  \
         --forbid-backing\n     refuse images that name a backing file (oxqcow)\n  \
         FILENAME\n     image file name\n"
    );
}

const LONGS: &[Opt] = &[
    Opt::alias("help", HasArg::No, "h"),
    Opt::alias("format", HasArg::Required, "f"),
    Opt::alias("output", HasArg::Required, "output"),
    Opt::alias("object", HasArg::Required, "object"),
    Opt::alias("image-opts", HasArg::No, "image-opts"),
    Opt::alias("force-share", HasArg::No, "U"),
    Opt::alias("start-offset", HasArg::Required, "start-offset"),
    Opt::alias("max-length", HasArg::Required, "max-length"),
    Opt::long(FORBID_BACKING, HasArg::No),
];

/// Runs `map`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let prog = &ctx.prog;
    let hint = format!("Try '{prog} map --help' for more info");
    let parsed = match getopt::parse_declared(prog, "map", args, "hf:U", LONGS) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return 1;
        }
    };
    let mut common = CommonOpts::default();
    let mut output = OutputFormat::Human;
    let mut start_offset = 0u64;
    let mut max_length: Option<u64> = None;
    for (key, value) in &parsed.opts {
        let value = value.as_deref().unwrap_or_default();
        match key.as_str() {
            "h" => {
                help(prog);
                return 0;
            }
            "output" => match OutputFormat::parse(value) {
                Ok(o) => output = o,
                Err(msg) => return ctx.fail(&format!("{msg}\n{hint}")),
            },
            "start-offset" => match cvtnum("start offset", value, 0, i64::MAX as u64) {
                Ok(n) => start_offset = n,
                Err(msg) => return ctx.fail(&msg),
            },
            "max-length" => match cvtnum("max length", value, 0, i64::MAX as u64) {
                Ok(n) => max_length = Some(n),
                Err(msg) => return ctx.fail(&msg),
            },
            _ => {
                if let Err(msg) = common.consume(key, value) {
                    return ctx.fail(&msg);
                }
            }
        }
    }
    let (format, image_opts, force_share) = (common.format, common.image_opts, common.force_share);
    let [filename] = parsed.operands.as_slice() else {
        return ctx.fail(&format!("Expecting one image file name\n{hint}"));
    };
    let (image, filename) =
        match crate::app::image::open_operand(filename, image_opts, format.as_deref(), true, force_share) {
            Ok(i) => i,
            Err(msg) => return ctx.fail(&msg),
        };
    let filename = &filename;
    let mut length = image.len();
    if let Some(max) = max_length {
        length = length.min(start_offset.saturating_add(max));
    }
    let files = data_filenames(&image, chain_filenames(&image, filename));
    match dump(&image, &files, output, start_offset, length) {
        Ok(()) => 0,
        Err(msg) => ctx.fail(&msg),
    }
}

/// The files the layers' data lives in, top first: a layer with an
/// external data file maps its clusters into that file, which qemu-img's
/// File column names (resolved like a backing file name).
fn data_filenames(image: &oxqcow::Image, mut files: Vec<String>) -> Vec<String> {
    let mut layer = Some(image);
    for name in files.iter_mut() {
        let Some(q) = layer.and_then(|l| l.as_qcow2()) else { break };
        if let Some(data) = q.info().data_file.filter(|_| q.has_data_file()) {
            *name = oxqcow::backing::resolve_backing_path(std::path::Path::new(name.as_str()), &data)
                .to_string_lossy()
                .into_owned();
        }
        layer = q.backing().map(|b| &**b);
    }
    files
}

/// Prints the map of `[start, end)`, merging and printing as qemu-img does.
/// `files` names the layers of the chain, top first.
fn dump(image: &dyn BlockDevice, files: &[String], output: OutputFormat, start: u64, end: u64) -> Result<(), String> {
    let mut out = crate::app::stdout::Stdout;
    match output {
        OutputFormat::Human => writeln(&mut out, &format!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to"))?,
        OutputFormat::Json => write(&mut out, "[")?,
    }
    let mut curr = MapEntry { start, ..MapEntry::default() };
    let mut pending: std::collections::VecDeque<Extent> = Default::default();
    while curr.start + curr.length < end {
        let offset = curr.start + curr.length;
        if pending.front().is_none_or(|e| e.offset + e.length <= offset) {
            pending.clear();
            let len = (end - offset).min(STATUS_WINDOW);
            let extents = status_up_to_error(image, offset, len)
                .map_err(|e| format!("Could not read file metadata: {}", errno_text(&e)))?;
            pending.extend(extents.into_iter().filter(|e| e.length > 0));
            if pending.is_empty() {
                return Err("Could not read file metadata: no extents returned".into());
            }
        }
        let e = pending.pop_front().expect("filled above");
        let mut next = MapEntry::from_extent(&e);
        // The extent may begin before `offset` only if the engine returned
        // more than was asked; clip it to be safe.
        if next.start < offset {
            let cut = offset - next.start;
            next.start = offset;
            next.length -= cut;
            next.offset = next.offset.map(|o| o + cut);
        }
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            dump_entry(&mut out, output, &curr, Some(&mut next), files)?;
        }
        curr = next;
    }
    dump_entry(&mut out, output, &curr, None, files)?;
    if output == OutputFormat::Json {
        writeln(&mut out, "]")?;
    }
    Ok(())
}

/// qemu-img's `dump_map_entry`.
fn dump_entry(
    out: &mut impl std::io::Write,
    output: OutputFormat,
    e: &MapEntry,
    next: Option<&mut MapEntry>,
    files: &[String],
) -> Result<(), String> {
    match output {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err("File contains external, encrypted or compressed clusters.".into());
            }
            if e.data && !e.zero {
                // The layer at this depth; a run past the end of a shorter
                // backing file has depth 0 and reads as zeros, so this
                // always names an opened layer.
                let filename = files.get(e.depth as usize).or(files.last()).map_or("", String::as_str);
                let line = format!(
                    "{:<16}{:<16}{:<16}{}",
                    c_hex(e.start),
                    c_hex(e.length),
                    c_hex(e.offset.unwrap_or(0)),
                    filename
                );
                writeln(out, &line)?;
            }
            // The human format does not tell zero runs apart; treating them
            // all alike lets more of them merge.
            if let Some(next) = next {
                if !next.data || next.zero {
                    next.data = false;
                    next.zero = true;
                }
            }
        }
        OutputFormat::Json => {
            let mut line = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                line.push_str(&format!(", \"offset\": {o}"));
            }
            line.push('}');
            if next.is_some() {
                line.push_str(",\n");
            }
            write(out, &line)?;
        }
    }
    Ok(())
}

/// C's `%#x`: a `0x` prefix except for zero.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

fn write(out: &mut impl std::io::Write, s: &str) -> Result<(), String> {
    out.write_all(s.as_bytes()).map_err(|e| format!("Could not write the map: {e}"))
}

fn writeln(out: &mut impl std::io::Write, s: &str) -> Result<(), String> {
    write(out, s)?;
    write(out, "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_style_hex() {
        assert_eq!(c_hex(0), "0");
        assert_eq!(c_hex(0x10000), "0x10000");
    }

    #[test]
    fn merges_only_contiguous_host_offsets() {
        let a = MapEntry { start: 0, length: 10, present: true, data: true, offset: Some(100), ..Default::default() };
        let b = MapEntry { start: 10, length: 5, present: true, data: true, offset: Some(110), ..Default::default() };
        let c = MapEntry { start: 10, length: 5, present: true, data: true, offset: Some(200), ..Default::default() };
        assert!(a.mergeable(&b));
        assert!(!a.mergeable(&c));
        let empty = MapEntry { length: 0, ..a.clone() };
        assert!(!empty.mergeable(&b));
    }
}
