//! Objects in object stores as images: `s3://BUCKET/KEY`, `gs://BUCKET/KEY`
//! and `az://CONTAINER/KEY` names, and `driver=s3|gs|az` nodes
//! (`--image-opts`, `json:{...}`, as the image itself or as its `file`)
//! with `url`, `readahead`, `timeout` and the store's own configuration
//! keys. QEMU has no such driver: the names and messages are oxqcow's.
//!
//! Objects are read in place and never written there: an open for
//! writing and `create` are refused. `convert` writes a new object
//! ([`NewObject`]), uploaded while it is written, as one multipart upload
//! that is completed when the conversion succeeded and aborted when
//! anything fails.

use std::sync::Arc;

use oxqcow::copy::for_each_data_run;
use oxqcow::storage::object::{ObjectOptions, ObjectStorage, NO_WRITES, SCHEMES};
use oxqcow::storage::ObjectWriter;
use oxqcow::{Image, Storage};

use crate::app::messages::{describe, strerror};
use crate::app::node_options::take_node;

/// Whether `driver` is one of the object stores oxqcow reads.
pub fn is_object_driver(driver: &str) -> bool {
    SCHEMES.contains(&driver)
}

/// The options an `s3://`, `gs://` or `az://` image name opens; `None`
/// for other names.
pub fn object_name(name: &str) -> Option<ObjectOptions> {
    match oxqcow::names::parse_image_name(name) {
        Ok(oxqcow::names::ImageName::Protocol { driver, .. }) if is_object_driver(driver) => {
            Some(ObjectOptions::from_url(name))
        }
        _ => None,
    }
}

/// Takes the options under `prefix` (`""` for the node itself, `file.` for
/// an image's file) out of `options` when `{prefix}driver` is an object
/// store's.
pub fn take_object(options: &mut Vec<(String, String)>, prefix: &str) -> Result<Option<ObjectOptions>, String> {
    let Some((driver, mine)) = take_node(options, prefix, is_object_driver) else { return Ok(None) };
    let mut object = ObjectOptions::default();
    for (k, value) in mine {
        object.apply(&k, &value)?;
    }
    match object.url.as_deref() {
        None => return Err(format!("the '{driver}' driver requires an 'url' option")),
        Some(url) if !url.starts_with(&format!("{driver}://")) => {
            return Err(format!("the '{driver}' driver cannot open '{url}' (does not start with '{driver}://')"))
        }
        Some(_) => {}
    }
    Ok(Some(object))
}

/// Opens the object `opts` name for an image opened `read_only` or not:
/// writes are refused, else the HEAD request's verdict.
pub fn open_object(opts: &ObjectOptions, read_only: bool) -> Result<Arc<dyn Storage>, String> {
    if !read_only {
        return Err(NO_WRITES.into());
    }
    Ok(Arc::new(ObjectStorage::open(opts)?))
}

/// The refusal to create an image (`create`, `dd`) named `name` when it
/// names an object: only `convert` writes objects.
pub fn no_creation(name: &str) -> Option<String> {
    let driver = name.split_once("://")?.0;
    object_name(name).map(|_| format!("Protocol driver '{driver}' does not support image creation: {NO_WRITES}"))
}

/// Whether flattened image options open an object anywhere (the node
/// itself or its file).
pub fn names_object(options: &[(String, String)]) -> bool {
    options.iter().any(|(k, v)| (k == "driver" || k == "file.driver") && is_object_driver(v))
}

/// A new object that `convert` writes, uploaded while it is written
/// ([`ObjectWriter`]): the image is made on [`NewObject::storage`], laid
/// out for a front-to-back copy by [`NewObject::prepare`], and the upload
/// completed by [`NewObject::finish`]. Dropped before that, the upload is
/// aborted: the key holds what it held before.
pub struct NewObject {
    writer: Arc<ObjectWriter>,
}

/// Data runs of the sources closer than this are reserved for as one
/// (the reservation's list stays short for fragmented sources; the few
/// clusters it overcounts cost a refcount block at most).
const MERGE_GAP: u64 = 1 << 20;

impl NewObject {
    /// Starts the upload at the key `name` names (so that a wrong
    /// endpoint, bucket or credentials fail before any work).
    pub fn start(name: &str) -> Result<Option<NewObject>, String> {
        let Some(opts) = object_name(name) else { return Ok(None) };
        let writer = ObjectWriter::start(&opts).map_err(|e| format!("Could not create '{name}': {e}"))?;
        Ok(Some(NewObject { writer: Arc::new(writer) }))
    }

    /// Where the image is made.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.writer.clone()
    }

    /// Readies the new image `target` for the copy of `sources` (`total`
    /// bytes, zeros runs of `min_sparse` bytes left out, as `-S` says): a
    /// qcow2 image gets the tables the copy will fill before its first
    /// data cluster; then the upload streams what follows.
    pub fn prepare(&self, target: &Image, sources: &[Image], total: u64, min_sparse: u64) -> Result<(), String> {
        if let Some(q) = target.as_qcow2() {
            let ranges = data_ranges(sources, min_sparse)?;
            q.reserve_for_copy(&ranges).map_err(|e| format!("error while laying out the target: {}", describe(&e)))?;
        }
        let made = self.writer.len().map_err(|e| e.to_string())?;
        self.writer.stream(made.max(total).saturating_add(total / 64));
        Ok(())
    }

    /// Completes the upload once the image is closed; the object appears
    /// whole or not at all.
    pub fn finish(self) -> Result<(), String> {
        match Arc::try_unwrap(self.writer) {
            Ok(writer) => writer.finish(),
            Err(_) => Err("error while uploading: the image was not closed".into()),
        }
    }
}

/// The runs of `sources` (concatenated) that a copy writes as data,
/// those less than [`MERGE_GAP`] apart joined.
fn data_ranges(sources: &[Image], min_sparse: u64) -> Result<Vec<(u64, u64)>, String> {
    let images: Vec<&Image> = sources.iter().collect();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let walked = for_each_data_run(&images, min_sparse, |start, len| match ranges.last_mut() {
        Some(last) if start - (last.0 + last.1) < MERGE_GAP => last.1 = start + len - last.0,
        _ => ranges.push((start, len)),
    });
    walked.map_err(|e| format!("error while reading block status at offset {}: {}", e.offset, strerror(&e.error)))?;
    Ok(ranges)
}
