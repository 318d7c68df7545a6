//! A protocol node's options inside flattened image options
//! (`--image-opts`, `json:{...}`): `driver=https,url=...` for the node
//! itself, `file.driver=s3,file.url=...` for an image's file. Each
//! protocol (HTTP(S), object stores, RBD) takes its node's options out
//! the same way before reading them.

/// Takes the options of the node under `prefix` (`""` for the node
/// itself, `file.` for an image's file) out of `options` when its driver
/// (the last `{prefix}driver` given) is one `ours` accepts: the driver,
/// and the node's other options with their keys stripped of the prefix.
pub fn take_node(
    options: &mut Vec<(String, String)>,
    prefix: &str,
    ours: impl Fn(&str) -> bool,
) -> Option<(String, Vec<(String, String)>)> {
    let key = format!("{prefix}driver");
    let driver = options.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.clone())?;
    if !ours(&driver) {
        return None;
    }
    // At the node itself every option is the driver's; under `file.` only
    // those with the prefix.
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(options).into_iter().partition(|(k, _)| k.starts_with(prefix));
    *options = rest;
    let mine = mine.into_iter().filter(|(k, _)| *k != key).map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
    Some((driver, mine))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_node_s_options_are_taken_out_without_their_prefix() {
        let mut o = opts(&[("driver", "qcow2"), ("file.driver", "s3"), ("file.url", "s3://b/k"), ("cache", "x")]);
        let (driver, mine) = take_node(&mut o, "file.", |d| d == "s3").unwrap();
        assert_eq!((driver.as_str(), mine), ("s3", opts(&[("url", "s3://b/k")])));
        assert_eq!(o, opts(&[("driver", "qcow2"), ("cache", "x")]));
        // Another driver's node, or none, is left alone; the last driver given counts.
        assert_eq!(take_node(&mut o, "file.", |d| d == "s3"), None);
        let mut o = opts(&[("driver", "https"), ("driver", "rbd"), ("pool", "p")]);
        assert_eq!(take_node(&mut o, "", |d| d == "https"), None);
        assert_eq!(take_node(&mut o, "", |d| d == "rbd"), Some(("rbd".into(), opts(&[("pool", "p")]))));
        assert!(o.is_empty());
    }
}
