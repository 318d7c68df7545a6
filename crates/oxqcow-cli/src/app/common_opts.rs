//! The options most qemu-img subcommands declare with the same meaning,
//! consumed in one place: `-f`, `--image-opts`, `-U`, `-q`, `-p`, `-t`,
//! `-T`, `--object` and `--forbid-backing`.
//!
//! A subcommand hands each option getopt returned to
//! [`CommonOpts::consume`] after its own options: a command whose key means
//! something else (`check`'s `-T` is checked as it is met, `serve`'s `-t`
//! is `--persistent`) matches that key before, or does not use this type.
//! Recording has no effect of its own but for `--object`, which defines
//! the object at once, and `--forbid-backing`, which forbids backing files
//! from then on, both in command line order as qemu-img does.

use crate::app::forbid_backing::{forbid_backing, FORBID_BACKING};
use crate::app::objects;

/// What the shared options say, as given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommonOpts {
    /// `-f FMT`: the format of the image operand (the first one, where
    /// there are several).
    pub format: Option<String>,
    /// `--image-opts`: image operands are option strings.
    pub image_opts: bool,
    /// `-U`: open images in shared mode.
    pub force_share: bool,
    /// `-q`.
    pub quiet: bool,
    /// `-p`.
    pub progress: bool,
    /// `-t CACHE`: the cache mode of the image the command changes, as
    /// given (each command checks it, with its own message).
    pub cache: Option<String>,
    /// `-T CACHE`: the cache mode of the images the command only reads.
    pub source_cache: Option<String>,
}

impl CommonOpts {
    /// Takes one parsed option (`key` as [`crate::app::getopt::Opt::key`],
    /// `value` empty for a flag) when it is one of the shared ones:
    /// `Ok(true)` when it was, `Ok(false)` when the caller must handle it,
    /// `Err` with qemu-img's message for an `--object` it refuses.
    pub fn consume(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "f" => self.format = Some(value.to_string()),
            "image-opts" => self.image_opts = true,
            "U" => self.force_share = true,
            "q" => self.quiet = true,
            "p" => self.progress = true,
            "t" => self.cache = Some(value.to_string()),
            "T" => self.source_cache = Some(value.to_string()),
            "object" => objects::define(value)?,
            FORBID_BACKING => forbid_backing(),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Whether to show progress: `-p`, unless `-q` silences it.
    pub fn show_progress(&self) -> bool {
        self.progress && !self.quiet
    }

    /// The `-t` cache mode, or `default`.
    pub fn cache_or(&self, default: &str) -> String {
        self.cache.clone().unwrap_or_else(|| default.to_string())
    }

    /// The `-T` cache mode, or `default`.
    pub fn source_cache_or(&self, default: &str) -> String {
        self.source_cache.clone().unwrap_or_else(|| default.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_options_are_recorded_in_order() {
        let mut c = CommonOpts::default();
        for (k, v) in [("f", "raw"), ("t", "none"), ("f", "qcow2"), ("T", "unsafe"), ("U", ""), ("image-opts", "")] {
            assert_eq!(c.consume(k, v), Ok(true), "{k}");
        }
        assert_eq!(c.format.as_deref(), Some("qcow2"), "the last -f wins, as in qemu-img");
        assert_eq!((c.cache_or("writeback"), c.source_cache_or("writeback")), ("none".into(), "unsafe".into()));
        assert!(c.force_share && c.image_opts);
        assert_eq!(CommonOpts::default().cache_or("unsafe"), "unsafe");
    }

    #[test]
    fn other_options_are_left_to_the_command() {
        let mut c = CommonOpts::default();
        for k in ["h", "o", "O", "b", "output", "r", "c"] {
            assert_eq!(c.consume(k, "x"), Ok(false), "{k}");
        }
        assert_eq!(c, CommonOpts::default(), "nothing recorded for options that are not shared");
    }

    #[test]
    fn quiet_silences_progress() {
        let mut c = CommonOpts::default();
        c.consume("p", "").unwrap();
        assert!(c.show_progress());
        c.consume("q", "").unwrap();
        assert!(!c.show_progress() && c.progress && c.quiet);
    }

    #[test]
    fn objects_are_defined_when_met() {
        let mut c = CommonOpts::default();
        assert_eq!(c.consume("object", "secret,id=common_opts_s1,data=pw"), Ok(true));
        assert_eq!(crate::app::secrets::lookup("common_opts_s1").unwrap(), b"pw");
        assert_eq!(
            c.consume("object", "secret,id=common_opts_s2"),
            Err("Either 'file' or 'data' must be provided".into())
        );
    }
}
