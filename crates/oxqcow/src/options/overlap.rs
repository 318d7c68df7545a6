//! The `overlap-check` option: which metadata structures (QEMU's
//! templates) a write is checked against before it reaches the image file.
//! The checks themselves are the metadata's (`qcow2/meta/overlap.rs`).

use super::parse_bool;
use crate::error::{Error, Result};

/// The image header.
pub const MAIN_HEADER: u32 = 1 << 0;
/// The active L1 table.
pub const ACTIVE_L1: u32 = 1 << 1;
/// L2 tables of the active L1.
pub const ACTIVE_L2: u32 = 1 << 2;
/// The refcount table.
pub const REFCOUNT_TABLE: u32 = 1 << 3;
/// Refcount blocks.
pub const REFCOUNT_BLOCK: u32 = 1 << 4;
/// The snapshot table.
pub const SNAPSHOT_TABLE: u32 = 1 << 5;
/// Snapshot L1 tables.
pub const INACTIVE_L1: u32 = 1 << 6;
/// L2 tables of snapshots.
pub const INACTIVE_L2: u32 = 1 << 7;
/// The persistent bitmap directory.
pub const BITMAP_DIRECTORY: u32 = 1 << 8;

/// Mode `constant`.
pub const CONSTANT: u32 = MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
/// Mode `cached` (the default).
pub const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK;
/// Mode `all`.
pub const ALL: u32 = CACHED | INACTIVE_L1 | INACTIVE_L2;

const TEMPLATES: [(u32, &str, &str); 9] = [
    (MAIN_HEADER, "main-header", "qcow2_header"),
    (ACTIVE_L1, "active-l1", "active L1 table"),
    (ACTIVE_L2, "active-l2", "active L2 table"),
    (REFCOUNT_TABLE, "refcount-table", "refcount table"),
    (REFCOUNT_BLOCK, "refcount-block", "refcount block"),
    (SNAPSHOT_TABLE, "snapshot-table", "snapshot table"),
    (INACTIVE_L1, "inactive-l1", "inactive L1 table"),
    (INACTIVE_L2, "inactive-l2", "inactive L2 table"),
    (BITMAP_DIRECTORY, "bitmap-directory", "bitmap directory"),
];

/// The name QEMU gives a template in its messages.
pub fn template_name(template: u32) -> &'static str {
    TEMPLATES.iter().find(|t| t.0 == template).map_or("metadata", |t| t.2)
}

/// The `overlap-check` options as given: the template (`overlap-check`
/// or its alias `overlap-check.template`) and the per-structure switches
/// (`overlap-check.main-header=off`, ...), which override the template
/// whatever their order, as QEMU reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapOptions {
    mode: Option<String>,
    template: Option<String>,
    switches: Vec<(u32, bool)>,
}

impl OverlapOptions {
    /// Records one `overlap-check*` option, with QEMU's messages for an
    /// unknown template, a template given twice differently and a switch
    /// that is not a boolean.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "overlap-check" => self.mode = Some(value.to_string()),
            "overlap-check.template" => self.template = Some(value.to_string()),
            _ => {
                let name = key
                    .strip_prefix("overlap-check.")
                    .ok_or_else(|| Error::InvalidArgument(format!("Invalid parameter '{key}'")))?;
                let bit = TEMPLATES
                    .iter()
                    .find(|t| t.1 == name)
                    .map(|t| t.0)
                    .ok_or_else(|| Error::InvalidArgument(format!("Invalid parameter '{key}'")))?;
                let on = parse_bool(key, value)?;
                self.switches.retain(|&(b, _)| b != bit);
                self.switches.push((bit, on));
                return Ok(());
            }
        }
        self.mask().map(|_| ())
    }

    /// The mask these options select (`cached` when no template is given).
    pub fn mask(&self) -> Result<u32> {
        if let (Some(mode), Some(template)) = (&self.mode, &self.template) {
            if mode != template {
                return Err(Error::InvalidArgument(format!(
                    "Conflicting values for qcow2 options 'overlap-check' ('{mode}') and 'overlap-check.template' ('{template}')"
                )));
            }
        }
        let name = self.mode.as_deref().or(self.template.as_deref()).unwrap_or("cached");
        let mut mask = match name {
            "none" => 0,
            "constant" => CONSTANT,
            "cached" => CACHED,
            "all" => ALL,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "Unsupported value '{other}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
                )))
            }
        };
        for &(bit, on) in &self.switches {
            if on {
                mask |= bit;
            } else {
                mask &= !bit;
            }
        }
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_override_the_template_in_any_order() {
        let mut o = OverlapOptions::default();
        o.apply("overlap-check.main-header", "off").unwrap();
        o.apply("overlap-check", "all").unwrap();
        assert_eq!(o.mask().unwrap(), ALL & !MAIN_HEADER);
    }

    #[test]
    fn conflicting_templates_are_refused_with_qemus_message() {
        let mut o = OverlapOptions::default();
        o.apply("overlap-check", "constant").unwrap();
        let e = o.apply("overlap-check.template", "all").unwrap_err().to_string();
        assert!(
            e.contains("Conflicting values for qcow2 options 'overlap-check' ('constant') and 'overlap-check.template' ('all')"),
            "{e}"
        );
        let mut o = OverlapOptions::default();
        let e = o.apply("overlap-check.template", "blubb").unwrap_err().to_string();
        assert!(e.contains("Unsupported value 'blubb' for qcow2 option 'overlap-check'"), "{e}");
    }
}
