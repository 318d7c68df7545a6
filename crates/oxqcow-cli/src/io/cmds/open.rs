//! The commands that open and close images, and `quit`.

use crate::app::io_open::OpenSpec;
use crate::app::qemu_opts::split_noisily;
use crate::io::cmds::args::{cmd, parse_args, CmdInfo};
use crate::io::session::{CmdResult, Failed, Session};

const OPEN_HELP: &str = "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read (not supported)
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
";

/// `open`.
pub const OPEN: CmdInfo = CmdInfo {
    no_file: true,
    help: Some(OPEN_HELP),
    ..cmd(
        "open",
        Some("o"),
        1,
        None,
        Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
        "open the file specified by path",
        open,
    )
};

/// `close`.
pub const CLOSE: CmdInfo =
    cmd("close", Some("c"), 0, Some(0), None, "close the current open file", |s, _, _| s.close_image());

/// `quit`.
pub const QUIT: CmdInfo = CmdInfo {
    no_file: true,
    ..cmd("quit", Some("q"), 0, None, None, "exit the program", |s, _, _| {
        s.quit = true;
        Ok(())
    })
};

fn open(s: &mut Session, info: &CmdInfo, argv: &[String]) -> CmdResult {
    let p = parse_args(argv, "snCro:ki:t:d:U");
    let mut spec = OpenSpec::for_command_line();
    for (c, v) in &p.opts {
        let (c, v) = (*c, v.as_str());
        if c == 'o' {
            if s.image_opts {
                println!("--image-opts and 'open -o' are mutually exclusive");
                return Err(Failed);
            }
            spec.options.extend(split_noisily(&s.ctx.prog, v));
        } else if let Err(msg) = spec.apply_flag(c, v) {
            s.ctx.error(&msg);
            return Err(Failed);
        }
    }
    p.check(info)?;
    let mut operands = p.operands.as_slice();
    if s.image_opts && operands.len() == 1 {
        spec.options.extend(split_noisily(&s.ctx.prog, &operands[0]));
        operands = &[];
    }
    match operands {
        [path] => s.open(spec, Some(path)),
        [] => s.open(spec, None),
        _ => info.usage(),
    }
}
