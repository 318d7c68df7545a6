//! QemuOpts' "noisy" parsing of an option string, as QEMU reads
//! `--image-opts` and qemu-io's `open -o`: the workspace's one splitter
//! ([`oxqcow::qemu_syntax`]) and QEMU's warning for every flag written
//! without `=` (qemu-img's `-o` is parsed quietly).

use oxqcow::qemu_syntax::{option_items, OptionItem};

/// Splits `s` into `(key, value)` pairs, warning (prefixed with `prog`) as
/// QEMU's `qemu_opts_parse_noisily` does about `key` and `nokey` flags.
pub fn split_noisily(prog: &str, s: &str) -> Vec<(String, String)> {
    option_items(s)
        .into_iter()
        .map(|item| {
            if let Some(text) = warning(&item) {
                eprint!("{prog}: {text}");
            }
            (item.key, item.value)
        })
        .collect()
}

/// QEMU's warning for a flag (after "PROG: "), if it warns.
fn warning(item: &OptionItem) -> Option<String> {
    if !item.deprecated_flag() {
        return None;
    }
    let advice = if item.key == "delay" {
        // QEMU's one special case: the replacement is the other flag.
        format!("nodelay={}", if item.value == "off" { "on" } else { "off" })
    } else {
        format!("{}={}", item.key, item.value)
    };
    Some(format!(
        "warning: short-form boolean option '{}' deprecated\nPlease use {advice} instead\n",
        item.as_written()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_as_qemu_prints_them() {
        let texts: Vec<Option<String>> =
            option_items("read-only,noauto,no,help,delay,k=v").iter().map(warning).collect();
        let w = |written: &str, advice: &str| {
            Some(format!("warning: short-form boolean option '{written}' deprecated\nPlease use {advice} instead\n"))
        };
        assert_eq!(
            texts,
            [
                w("read-only", "read-only=on"),
                w("noauto", "auto=off"),
                w("no", "=off"),
                None,
                w("delay", "nodelay=off"),
                None
            ]
        );
    }
}
