//! The state qemu-io's commands work on: the open image, the secrets
//! `--object` defined, whether `quit` ran; opening and closing the image.

use std::collections::HashMap;

use oxqcow::qemu_syntax::option_items_implied;

use crate::app::ctx::Ctx;
use crate::app::io_open::{self as open, OpenSpec, Opened};
use crate::app::messages::io_error_text;

/// What `run` returns when a command failed; the command printed why.
#[derive(Debug)]
pub struct Failed;

/// The result of one command.
pub type CmdResult = Result<(), Failed>;

/// The state commands work on.
pub struct Session<'a> {
    pub ctx: &'a Ctx,
    /// The open image, if any.
    pub image: Option<Opened>,
    /// How the open image was opened (its flags and options, and the name
    /// given), which `reopen` starts from.
    pub opened_with: Option<(OpenSpec, Option<String>)>,
    /// `--image-opts` was given: file names are option strings.
    pub image_opts: bool,
    /// Secrets defined with `--object secret,...`, by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// `quit` was run.
    pub quit: bool,
}

impl Session<'_> {
    /// Opens an image (`name` is `None` when the options name the file).
    pub fn open(&mut self, spec: OpenSpec, name: Option<&str>) -> CmdResult {
        if self.image.is_some() {
            self.ctx.error("file open already, try 'help close'");
            return Err(Failed);
        }
        match self.open_as(spec, name) {
            Ok(()) => Ok(()),
            Err(msg) => {
                match name {
                    Some(n) => self.ctx.error(&format!("can't open device {n}: {msg}")),
                    None => self.ctx.error(&format!("can't open: {msg}")),
                }
                Err(Failed)
            }
        }
    }

    /// Opens an image, keeping how for `reopen`; the error is the reason
    /// (what follows "can't open device NAME: ").
    pub fn open_as(&mut self, spec: OpenSpec, name: Option<&str>) -> Result<(), String> {
        let img = open::open(&spec, name, &self.secrets)?;
        self.image = Some(img);
        self.opened_with = Some((spec, name.map(str::to_string)));
        Ok(())
    }

    /// Flushes and closes the open image.
    pub fn close_image(&mut self) -> CmdResult {
        self.opened_with = None;
        match self.image.take() {
            Some(img) => img.close().map_err(|msg| {
                self.ctx.error(&msg);
                Failed
            }),
            None => Ok(()),
        }
    }

    /// Handles `--object`: secrets are kept for `encrypt.key-secret`, TLS
    /// credentials go to the shared keeper (for an NBD export's
    /// `tls-creds`), other object types are refused.
    pub fn add_object(&mut self, def: &str) -> Result<(), String> {
        let mut kind = None;
        let mut props = HashMap::new();
        // A leading item without '=' is the type.
        for item in option_items_implied(def, "qom-type") {
            if item.key == "qom-type" {
                kind = Some(item.value);
            } else {
                props.insert(item.key, item.value);
            }
        }
        let Some(kind) = kind else { return Err("Parameter 'qom-type' is missing".into()) };
        if kind == "help" {
            println!("List of user creatable objects:\n  secret");
            crate::app::stdout::flush();
            std::process::exit(0);
        }
        if kind == "tls-creds-x509" {
            return crate::app::objects::define(def);
        }
        const QEMU_TYPES: &[&str] = &[
            "authz-list",
            "authz-list-file",
            "authz-simple",
            "main-loop",
            "pr-manager-helper",
            "secret_keyring",
            "thread-context",
            "throttle-group",
            "tls-creds-anon",
            "tls-creds-psk",
            "tls-creds-x509",
        ];
        if QEMU_TYPES.contains(&kind.as_str()) {
            return Err(format!(
                "object type '{kind}' is not supported by oxqcow (only 'secret' and 'tls-creds-x509' are)"
            ));
        }
        if kind != "secret" {
            return Err(format!("Parameter 'qom-type' does not accept value '{kind}'"));
        }
        let Some(id) = props.remove("id") else { return Err("Parameter 'id' is missing".into()) };
        let data = match (props.remove("data"), props.remove("file")) {
            (Some(d), None) => d.into_bytes(),
            (None, Some(f)) => std::fs::read(&f).map_err(|e| format!("Unable to read {f}: {}", io_error_text(&e)))?,
            (Some(_), Some(_)) => return Err("'data' and 'file' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
        };
        let data = match props.remove("format").as_deref() {
            None | Some("raw") => data,
            Some("base64") => crate::app::secrets::decode_base64(&data)?,
            Some(other) => return Err(format!("Parameter 'format' does not accept value '{other}'")),
        };
        if let Some(k) = props.keys().next() {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        if self.secrets.contains_key(&id) {
            return Err(format!("attempt to add duplicate property '{id}' to object (type 'container')"));
        }
        self.secrets.insert(id, data);
        Ok(())
    }
}
