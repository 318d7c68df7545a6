//! What an image name says, read as QEMU reads the file name given for an
//! image (`bdrv_fill_options`, `bdrv_find_protocol` and the protocols'
//! filename parsers): a host file (`a.qcow2`, `file:a:b.qcow2`,
//! `host_device:/dev/sdb`), a `json:{...}` pseudo-filename that sets the
//! options itself, or a name another protocol parses (`nbd:unix:/s`,
//! `nbd+unix:///?socket=/s`, `null-co://`). Pure: no file is looked at.
//!
//! A name has a protocol when a colon comes before any slash: `a:b.qcow2`
//! names protocol `a` (unknown: refused), `./a:b.qcow2` and
//! `file:a:b.qcow2` name the file `a:b.qcow2`.

mod json;

/// QEMU's protocol prefixes that oxqcow implements, and the driver each
/// selects: the three `file-posix` drivers, NBD's three spellings, the
/// null drivers, the curl driver's `http` and `https`, `rbd`, and the object
/// stores oxqcow adds (`s3`, `gs`, `az`; QEMU has no such driver).
const PROTOCOLS: &[(&str, &str)] = &[
    ("file", "file"),
    ("host_device", "host_device"),
    ("host_cdrom", "host_cdrom"),
    ("nbd", "nbd"),
    ("nbd+tcp", "nbd"),
    ("nbd+unix", "nbd"),
    ("null-co", "null-co"),
    ("null-aio", "null-aio"),
    ("http", "http"),
    ("https", "https"),
    ("rbd", "rbd"),
    ("s3", "s3"),
    ("gs", "gs"),
    ("az", "az"),
];

/// What an image name names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageName {
    /// A host file, opened by one of QEMU's `file-posix` drivers (`file`,
    /// `host_device`, `host_cdrom`): its name without the protocol prefix
    /// (with `./` put in front when what is left would itself look like a
    /// protocol, as QEMU does: `file:a:b` is `./a:b`).
    File {
        /// The driver.
        driver: &'static str,
        /// The file name.
        filename: String,
    },
    /// `json:{...}`: the options it sets, flattened as QEMU flattens them
    /// (`file.filename`, `server.path`, ...), strings as written, numbers as
    /// written, booleans as `on`/`off`, in the order written.
    Json(Vec<(String, String)>),
    /// A name another protocol's driver parses (`nbd`, `null-co`,
    /// `null-aio`): the driver and the whole name.
    Protocol {
        /// The driver.
        driver: &'static str,
        /// The name as given.
        name: String,
    },
}

/// Whether `name` starts with a protocol prefix: a colon before any slash
/// (QEMU's `path_has_protocol`).
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/']).is_some_and(|i| name.as_bytes()[i] == b':')
}

/// Reads an image name as QEMU does. Errors are QEMU's texts ("Unknown
/// protocol 'a'", "Could not parse the JSON options: ...", "Invalid JSON
/// object given").
pub fn parse_image_name(name: &str) -> Result<ImageName, String> {
    if let Some(text) = name.strip_prefix("json:") {
        return parse_json_name(text).map(ImageName::Json);
    }
    if !has_protocol(name) {
        return Ok(ImageName::File { driver: "file", filename: name.to_string() });
    }
    let prefix = &name[..name.find(':').expect("has a protocol")];
    let Some(&(_, driver)) = PROTOCOLS.iter().find(|(p, _)| *p == prefix) else {
        return Err(format!("Unknown protocol '{prefix}'"));
    };
    match driver {
        "file" | "host_device" | "host_cdrom" => {
            Ok(ImageName::File { driver, filename: strip_protocol_prefix(&name[prefix.len() + 1..]) })
        }
        _ => Ok(ImageName::Protocol { driver, name: name.to_string() }),
    }
}

/// What is left of a name after its `file:` (or `host_device:`, ...)
/// prefix: a name that would then look like it has a protocol gets `./` in
/// front, so that `file:a:b` stays the file `a:b` wherever the name goes
/// next (QEMU's `bdrv_parse_filename_strip_prefix`).
fn strip_protocol_prefix(rest: &str) -> String {
    if has_protocol(rest) {
        format!("./{rest}")
    } else {
        rest.to_string()
    }
}

/// The options of a `json:` pseudo-filename (the text after `json:`).
pub fn parse_json_name(text: &str) -> Result<Vec<(String, String)>, String> {
    let value = json::parse(text).map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    let json::Value::Object(members) = value else {
        return Err("Invalid JSON object given".into());
    };
    json::flatten(&members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> ImageName {
        ImageName::File { driver: "file", filename: name.into() }
    }

    #[test]
    fn colons_and_the_file_prefix() {
        assert_eq!(parse_image_name("a.qcow2").unwrap(), file("a.qcow2"));
        assert_eq!(parse_image_name("dir/a:b.qcow2").unwrap(), file("dir/a:b.qcow2"));
        assert_eq!(parse_image_name("./a:b.qcow2").unwrap(), file("./a:b.qcow2"));
        assert_eq!(parse_image_name("a:b.qcow2").unwrap_err(), "Unknown protocol 'a'");
        assert_eq!(parse_image_name("file:a:b.qcow2").unwrap(), file("./a:b.qcow2"));
        assert_eq!(parse_image_name("file:/x/a:b.qcow2").unwrap(), file("/x/a:b.qcow2"));
        assert_eq!(parse_image_name("file:plain").unwrap(), file("plain"));
        assert_eq!(
            parse_image_name("host_device:/dev/sdb").unwrap(),
            ImageName::File { driver: "host_device", filename: "/dev/sdb".into() }
        );
    }

    #[test]
    fn other_protocols_keep_the_whole_name() {
        for (name, driver) in [
            ("nbd:unix:/s", "nbd"),
            ("nbd+unix:///?socket=/s", "nbd"),
            ("nbd://h/e", "nbd"),
            ("null-co://", "null-co"),
            ("https://h/x", "https"),
        ] {
            assert_eq!(parse_image_name(name).unwrap(), ImageName::Protocol { driver, name: name.into() });
        }
        assert_eq!(parse_image_name("nbd+vsock://1:2/").unwrap_err(), "Unknown protocol 'nbd+vsock'");
    }

    #[test]
    fn json_names() {
        let ImageName::Json(o) = parse_image_name("json:{'driver': 'raw', 'file': {'filename': 'x'}}").unwrap() else {
            panic!("not json")
        };
        assert_eq!(o, [("driver".to_string(), "raw".to_string()), ("file.filename".into(), "x".into())]);
        assert_eq!(parse_image_name("json:[1]").unwrap_err(), "Invalid JSON object given");
        assert_eq!(
            parse_image_name("json:{").unwrap_err(),
            "Could not parse the JSON options: JSON parse error, premature EOI"
        );
    }
}
