//! QEMU's raw format driver as a node of its own: `offset` and `size`
//! make it a window onto its file, either as the image's format
//! (`driver=raw,offset=1M,size=64M,file.filename=disk`) or between a
//! format and its file (`driver=qcow2,file.driver=raw,file.size=...,
//! file.file.filename=disk`). Taking those nodes out of flattened options
//! leaves the options of a format directly over its file.

use crate::qemu_syntax::parse_size_option;

/// One raw node's window: its byte 0 is its file's byte `offset`; with
/// `size` it ends there and cannot grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawWindow {
    /// Where the window starts in the file.
    pub offset: u64,
    /// The window's fixed length, if it has one.
    pub size: Option<u64>,
}

fn last<'a>(options: &'a [(String, String)], key: &str) -> Option<&'a str> {
    options.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Takes `{prefix}offset` and `{prefix}size` out of `options`; `None`
/// when neither is there.
fn take_window(options: &mut Vec<(String, String)>, prefix: &str) -> Result<Option<RawWindow>, String> {
    let offset_key = format!("{prefix}offset");
    let size_key = format!("{prefix}size");
    let offset = last(options, &offset_key).map(|v| parse_size_option("offset", v)).transpose()?;
    let size = last(options, &size_key).map(|v| parse_size_option("size", v)).transpose()?;
    options.retain(|(k, _)| *k != offset_key && *k != size_key);
    Ok((offset.is_some() || size.is_some()).then(|| RawWindow { offset: offset.unwrap_or(0), size }))
}

/// Takes the raw nodes out of flattened image options: the image's own
/// window when its driver is `raw`, then every `file.driver=raw` node,
/// whose own `file.file.*` options become the image's `file.*`. Returns
/// the windows outermost first. Errors are QEMU's for the values.
pub fn take_raw_windows(options: &mut Vec<(String, String)>) -> Result<Vec<RawWindow>, String> {
    let mut windows = Vec::new();
    if last(options, "driver") == Some("raw") {
        windows.extend(take_window(options, "")?);
    }
    while last(options, "file.driver") == Some("raw") {
        windows.push(take_window(options, "file.")?.unwrap_or_default());
        options.retain(|(k, _)| k != "file.driver");
        for (k, _) in options.iter_mut() {
            if let Some(rest) = k.strip_prefix("file.file.") {
                *k = format!("file.{rest}");
            }
        }
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_raw_file_node_becomes_a_window_over_its_own_file() {
        let mut o = opts(&[
            ("driver", "qcow2"),
            ("file.driver", "raw"),
            ("file.size", "1M"),
            ("file.file.driver", "file"),
            ("file.file.filename", "base"),
        ]);
        let w = take_raw_windows(&mut o).unwrap();
        assert_eq!(w, vec![RawWindow { offset: 0, size: Some(1 << 20) }]);
        assert_eq!(o, opts(&[("driver", "qcow2"), ("file.driver", "file"), ("file.filename", "base")]));
    }

    #[test]
    fn the_raw_format_takes_its_own_window_and_bad_values_are_refused() {
        let mut o = opts(&[("driver", "raw"), ("offset", "512"), ("file.filename", "x")]);
        assert_eq!(take_raw_windows(&mut o).unwrap(), vec![RawWindow { offset: 512, size: None }]);
        // A qcow2 image's `size` is not the raw driver's.
        let mut q = opts(&[("driver", "qcow2"), ("size", "512")]);
        assert!(take_raw_windows(&mut q).unwrap().is_empty());
        let mut bad = opts(&[("driver", "raw"), ("offset", "-1")]);
        assert_eq!(take_raw_windows(&mut bad).unwrap_err(), "Value '-1' is out of range for parameter 'offset'");
    }
}
